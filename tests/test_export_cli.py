"""`clipfuse export` / `clipfuse heads` from the command line: good runs and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipfuse.runtime.cli import main

from conftest import TINY
from hidden_modules import hide_modules

BASE = ["export", "--model", TINY, "--pretrained", "none", "--templates", "single"]


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_export_writes_graph_and_manifest(tmp_path, capsys):
    out = tmp_path / "eng" / "m"
    rc = main(BASE + ["--head", "clearclip", "--classes", "sky;tree,bush;road", "--size", "224", "-o", str(out)])
    assert rc == 0
    assert _files(out.parent) == ["m.json", "m.onnx"]
    manifest = json.loads((out.parent / "m.json").read_text())
    assert manifest["classes"] == [["sky"], ["tree", "bush"], ["road"]]
    assert manifest["head"]["params"]["residual"] is False
    # non-default size for clearclip (448) -> window follows the export size
    assert manifest["protocol"]["window"] == 224 and manifest["protocol"]["stride"] == 112
    assert "wrote" in capsys.readouterr().err


def test_head_parameter_overrides_reach_the_manifest(tmp_path):
    out = tmp_path / "m"
    assert main(BASE + ["--head", "naclip", "--classes", "a,b", "--attn", "qk", "--gaussian-sigma", "0",
                        "--ffn", "on", "-o", str(out)]) == 0
    params = json.loads(out.with_suffix(".json").read_text())["head"]["params"]
    assert params == {"attn": "qk", "gaussian_sigma": None, "residual": False, "ffn": True}


@pytest.mark.parametrize("args,message", [
    (["--head", "sclip", "--classes", "a,b", "--size", "230"], "not a positive multiple of the patch size 16"),
    (["--head", "sclip", "--classes", " , "], "--classes is empty"),
    (["--head", "sclip", "--classes", "cat,dog,Cat"], "duplicate name 'Cat'"),
    (["--head", "sclip", "--classes-file", "/no/such/classes.txt"], "classes file not found"),
    (["--head", "sclip", "--classes", "a", "--model", "ViT-B-99"], "unknown model 'ViT-B-99'"),
    (["--head", "sclip", "--classes", "a", "--pretrained", "laion9000"], "unknown pretrained tag 'laion9000'"),
    (["--head", "sclip", "--classes", "a", "--heads", "x.pt"], "--heads only applies to clip-dinoiser"),
    (["--head", "clip-dinoiser", "--classes", "a", "--heads", "/no/last.pt"], "heads checkpoint not found"),
])
def test_bad_input_gives_one_line_error_and_no_files(tmp_path, capsys, args, message):
    out = tmp_path / "out" / "m"
    argv = list(BASE)
    if "--pretrained" in args:  # the case supplies its own
        i = argv.index("--pretrained")
        del argv[i:i + 2]
    rc = main(argv + args + ["-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert _files(out.parent) == []


def test_unreadable_classes_file(tmp_path, capsys):
    bad = tmp_path / "classes.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    rc = main(BASE + ["--head", "sclip", "--classes-file", str(bad), "-o", str(tmp_path / "m")])
    assert rc == 2 and "cannot read classes file" in capsys.readouterr().err
    assert _files(tmp_path) == ["classes.txt"]


def test_failure_during_export_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    import onnx.checker

    def broken(*a, **k):
        raise RuntimeError("simulated crash after the graph was written")
    monkeypatch.setattr(onnx.checker, "check_model", broken)
    rc = main(BASE + ["--head", "sclip", "--classes", "a,b", "-o", str(tmp_path / "m")])
    assert rc == 3
    assert "simulated crash" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_unknown_head_is_rejected_by_the_parser(capsys):
    assert main(BASE + ["--head", "segformer", "--classes", "a", "-o", "x"]) == 2  # main returns exit codes
    assert "invalid choice: 'segformer'" in capsys.readouterr().err


def test_heads_lists_every_head_as_json():
    out = subprocess.run([sys.executable, "-m", "clipfuse.runtime.cli", "heads", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["head"]: r for r in json.loads(out)}
    assert set(rows) == {"maskclip", "sclip", "clip-dinoiser", "clearclip", "naclip", "sc-clip", "rcs"}
    assert rows["clip-dinoiser"]["default_pretrained"] == "laion2b_s34b_b88k"
    assert rows["sclip"]["dataset_overrides"]["voc21"] == {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1}
    assert rows["naclip"]["block"]["gaussian_sigma"] == 5.0
    assert rows["rcs"]["dataset_head_params"]["voc20"] == {"lam": 0.6}
    assert "whole image" in rows["rcs"]["summary"]


def test_heads_needs_no_torch():
    """The method table is torch-free: `clipfuse heads` runs on a device without the export extra."""
    script = hide_modules("torch", "open_clip", "onnx", "torchvision") + (
        "import sys, json\n"
        "from clipfuse.runtime.cli import main\n"
        "rc = main(['heads', '--json'])\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["head"]: r for r in json.loads(proc.stdout)}
    assert rows["naclip"]["block"] == {"attn": "kk", "gaussian_sigma": 5.0, "residual": False, "ffn": False}
    assert rows["clip-dinoiser"]["block"] == {"background_rule": True}
    assert rows["sclip"]["pos_embed_rule"] == "scale" and rows["maskclip"]["pos_embed_rule"] == "size"
    assert all(r["default_size"] == r["protocol"]["window"] for r in rows.values())
