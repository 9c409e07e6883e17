"""Issue 13: the defects a hostile-user probe of the CLI found, one test (or more) per item.

Each test states the probed behaviour it pins; on the code before the fix each of them fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfuse.runtime.cli import build_parser, main
from clipfuse.runtime.errors import ClipfuseError

CLASSES = [["background"], ["sky"], ["tree", "bush"], ["road"]]
OTHER = [["background"], ["car"], ["person"], ["road"]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_clip):
    """engines/sclip.onnx (CLASSES) and engines/other.onnx (OTHER), same weights, same size."""
    pytest.importorskip("onnxruntime")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    root = tmp_path_factory.mktemp("hardening") / "engines"
    for name, classes in (("sclip", CLASSES), ("other", OTHER)):
        export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none", classes=classes,
                                           templates="single", seed=0), root / name, clip=tiny_clip)
    return root


@pytest.fixture
def workdir(tmp_path, engines):
    """A private copy of the engines folder and a photo, so tests may damage them."""
    local = tmp_path / "engines"
    shutil.copytree(engines, local)
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 4, (60, 80, 3)), axis=1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "street.png")
    return tmp_path


def cli(argv, capsys):
    """(exit code, stderr lines) of `clipfuse ARGV`; argparse exits count as exit codes."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 1. outputs never leave -o, never replace a manifest -----------------------------------------
@pytest.mark.parametrize("name", ["..png", "...png", ".hidden.png"])
def test_dot_named_images_write_inside_out(workdir, capsys, name):
    photos = workdir / "photos"
    photos.mkdir()
    shutil.copy(workdir / "street.png", photos / name)
    before = snapshot(workdir / "engines")
    out = workdir / "engines" / "sclip"
    code, err = cli(["run", workdir / "engines/sclip.onnx", photos / name, "-o", out, "--no-overlay"], capsys)
    assert code == 0, err
    after = snapshot(workdir / "engines")
    written = [p for p in after if p not in before or after[p] != before[p]]
    assert written and all(out in p.parents for p in written), written   # all inside -o
    assert sorted(p.name for p in written) == sorted(["_" + name[:-4] + s for s in (".labels.png", ".json")])


def test_run_refuses_to_replace_a_model_manifest(workdir, capsys):
    shutil.copy(workdir / "street.png", workdir / "sclip.png")
    manifest = (workdir / "engines/sclip.json").read_bytes()
    code, err = cli(["run", workdir / "engines/sclip.onnx", workdir / "sclip.png", "-o", workdir / "engines"],
                    capsys)
    assert code == 2 and len(err) == 1 and "model manifest" in err[0], err
    assert (workdir / "engines/sclip.json").read_bytes() == manifest
    assert not (workdir / "engines/sclip.labels.png").exists()


# --- 2. build checks the pair it is given, like every reader -------------------------------------
def test_build_refuses_a_graph_with_another_exports_manifest(workdir, capsys):
    eng = workdir / "engines"
    shutil.copy(eng / "other.json", eng / "sclip.json")          # graph of sclip, manifest of other
    code, err = cli(["build", eng / "sclip.onnx", "--dry-run", "--target-trt", "10.3", "--target-sm", "87"],
                    capsys)
    assert code == 2 and len(err) == 1 and "does not match its manifest" in err[0], err
    assert not list(eng.glob("sclip.fp16.*"))                     # nothing laundered


def test_build_fp16_graph_carries_the_contract(workdir, capsys):
    from clipfuse.runtime.artifact import CONTRACT_KEY, contract_of, read_onnx_metadata
    eng = workdir / "engines"
    code, err = cli(["build", eng / "sclip.onnx", "--dry-run", "--target-trt", "10.3", "--target-sm", "87"],
                    capsys)
    assert code == 0, err
    fp16 = eng / "sclip.fp16.onnx"
    manifest = json.loads((eng / "sclip.fp16.json").read_text())
    assert json.loads(read_onnx_metadata(fp16)[CONTRACT_KEY]) == contract_of(manifest)
    assert contract_of(manifest)["classes"] == CLASSES
    # and the FP16 pair is opened with the same checks
    manifest["classes"][1] = ["ocean"]
    (eng / "sclip.fp16.json").write_text(json.dumps(manifest))
    code, err = cli(["run", fp16, workdir / "street.png", "-o", workdir / "out"], capsys)
    assert code == 2 and "disagrees with sclip.fp16.onnx on 'classes'" in err[0], err


# --- 3. the graph describes itself; an edited manifest is refused ---------------------------------
def test_renamed_class_in_manifest_is_refused(workdir, capsys):
    path = workdir / "engines/sclip.json"
    manifest = json.loads(path.read_text())
    manifest["classes"][1] = ["ocean"]                            # same count, new name
    path.write_text(json.dumps(manifest))
    for extra in ([], ["--no-verify"]):                           # the contract check is not the hash's
        code, err = cli(["run", workdir / "engines/sclip.onnx", workdir / "street.png", "-o", workdir / "o",
                         *extra], capsys)
        assert code == 2 and len(err) == 1, err
        assert "disagrees with sclip.onnx on 'classes'" in err[0] and "ocean" in err[0], err
    assert not (workdir / "o").exists() or not list((workdir / "o").iterdir())


def test_class_names_readable_from_the_model_file_by_onnxruntime(engines):
    """What a C++ user does (Ort::ModelMetadata): the contract with the classes, from the file."""
    import onnxruntime as ort
    from clipfuse.runtime.artifact import CONTRACT_KEY
    sess = ort.InferenceSession(str(engines / "sclip.onnx"), providers=["CPUExecutionProvider"])
    contract = json.loads(sess.get_modelmeta().custom_metadata_map[CONTRACT_KEY])
    manifest = json.loads((engines / "sclip.json").read_text())
    assert contract["classes"] == CLASSES
    assert contract["protocol"] == manifest["protocol"] and contract["head"] == manifest["head"]
    assert contract["clipfuse_version"] == manifest["clipfuse_version"]


def test_metadata_reader_agrees_with_onnx_and_needs_neither_torch_nor_onnx(engines, tmp_path):
    import onnx
    from clipfuse.runtime.artifact import read_onnx_metadata
    model = onnx.load(str(engines / "sclip.onnx"))
    assert read_onnx_metadata(engines / "sclip.onnx") == {p.key: p.value for p in model.metadata_props}
    from hidden_modules import hide_modules
    script = hide_modules("torch", "onnx", "open_clip") + (
        "from clipfuse.runtime.artifact import open_artifact\n"
        f"print(open_artifact({str(engines / 'sclip.onnx')!r}, kinds=('image',)).manifest['classes'][1])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "['sky']", proc.stderr


def test_engine_manifest_contract_digest(tmp_path):
    from clipfuse.runtime.artifact import check_contract, contract_sha256
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    manifest = {"kind": "image", "classes": CLASSES, "protocol": {"window": 224}, "engine": {}}
    assert check_contract(engine, manifest) is False               # built before contracts: skipped
    manifest["engine"]["contract_sha256"] = contract_sha256(manifest)
    assert check_contract(engine, manifest) is True
    manifest["classes"] = [["background"], ["ocean"], ["tree", "bush"], ["road"]]
    with pytest.raises(ClipfuseError, match="edited after m.engine was built"):
        check_contract(engine, manifest)


# --- 4. --allow-duplicate-names works with --classes ----------------------------------------------
def test_allow_duplicate_names_with_classes(tmp_path, capsys):
    out = tmp_path / "dup"
    code, err = cli(["export", "--head", "sclip", "--model", "ViT-T-16-test", "--pretrained", "none",
                     "--templates", "single", "--classes", "sky,sky,road", "--allow-duplicate-names",
                     "-o", out, "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "dup.json").read_text())["classes"] == [["sky"], ["sky"], ["road"]]
    code, err = cli(["export", "--head", "sclip", "--model", "ViT-T-16-test", "--pretrained", "none",
                     "--classes", "sky,sky,road", "-o", tmp_path / "nodup"], capsys)
    assert code == 2 and "--allow-duplicate-names accepts this" in err[0]


# --- 5. every numeric option is checked when parsed -----------------------------------------------
BAD_OPTIONS = [
    ("run", "--long-side-max", "-1"), ("run", "--long-side-max", "0"), ("run", "--logit-scale", "nan"),
    ("run", "--logit-scale", "-40"), ("run", "--logit-scale", "0"), ("run", "--max-pixels", "0"),
    ("run", "--threads", "0"), ("run", "--threads", "-1"), ("run", "--area-thd", "-1"),
    ("run", "--prob-thd", "inf"), ("run", "--short-side", "0"), ("run", "--window-stride", "-5"),
    ("run", "--batch", "0"), ("export", "--size", "0"), ("export", "--gaussian-sigma", "-1"),
    ("export", "--opset", "3"), ("export", "--seed", "-1"), ("export-text", "--opset", "nan"),
    ("export-refer", "--alpha", "1.5"), ("export-refer", "--masked-blocks", "0"),
    ("build", "--workspace-gb", "nan"), ("build", "--workspace-gb", "0"), ("bench", "--iters", "0"),
    ("bench", "--max-seconds", "inf"), ("bench", "--max-seconds", "-1"), ("bench", "--warmup", "-1"), ("bench", "--threads", "0"),
    ("eval", "--limit", "0"), ("refer", "--alpha", "nan"), ("eval-refer", "--alpha", "-0.1"),
    ("eval-refer", "--limit", "-3"),
]
REQUIRED = {"run": ["m.onnx", "img.png", "-o", "out"], "export": ["--head", "sclip", "--classes", "a,b", "-o", "x"],
            "export-text": ["-o", "x"], "export-refer": ["-o", "x"], "build": ["m.onnx"], "bench": [],
            "eval": ["m.onnx"], "refer": [], "eval-refer": []}


@pytest.mark.parametrize("command,option,value", BAD_OPTIONS)
def test_bad_numbers_are_refused_at_parse_time(command, option, value, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, *REQUIRED[command], f"{option}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0], err                  # one line naming the option


# --- 6. user errors about -o and bad graphs are exit 2, found before any inference -----------------
def test_out_is_a_file_fails_before_opening_the_model(workdir, capsys, monkeypatch):
    from clipfuse.runtime import segmenter

    def never(*a, **k):
        raise AssertionError("opened the model before checking -o")
    monkeypatch.setattr(segmenter.Segmenter, "open", classmethod(never))
    (workdir / "taken").write_text("x")
    for out in (workdir / "taken", workdir / "taken" / "sub"):
        code, err = cli(["run", workdir / "engines/sclip.onnx", workdir / "street.png", "-o", out], capsys)
        assert code == 2 and len(err) == 1 and "-o folder" in err[0], err


def test_unwritable_out_is_exit_2_before_inference(workdir, capsys, monkeypatch):
    """Read-only folders cannot be made as root (these tests' user): the OS's refusal is simulated."""
    import tempfile as tf
    from clipfuse.runtime import segmenter
    real = tf.mkstemp

    def refuse(*a, **k):
        if str(k.get("dir", "")).startswith(str(workdir / "ro")):
            raise PermissionError(13, "Permission denied", k["dir"])
        return real(*a, **k)
    monkeypatch.setattr(tf, "mkstemp", refuse)
    opened = []
    monkeypatch.setattr(segmenter.Segmenter, "open", classmethod(lambda *a, **k: opened.append(1)))
    code, err = cli(["run", workdir / "engines/sclip.onnx", workdir / "street.png", "-o", workdir / "ro"], capsys)
    assert code == 2 and len(err) == 1 and "Permission denied" in err[0], err
    assert not opened


def test_build_on_a_truncated_graph_is_one_line_exit_2(workdir, capsys):
    onnx_path = workdir / "engines/sclip.onnx"
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    code, err = cli(["build", onnx_path, "--dry-run", "--target-trt", "10.3", "--target-sm", "87"], capsys)
    assert code == 2 and len(err) == 1 and "does not match its manifest" in err[0], err
    # without the hash (run --no-verify) the reader itself says what is wrong
    code, err = cli(["run", onnx_path, workdir / "street.png", "-o", workdir / "o", "--no-verify"], capsys)
    assert code == 2 and len(err) == 1 and "not a complete ONNX model" in err[0], err


# --- 8. running into the input folder does not segment the outputs ---------------------------------
def test_rerun_into_the_input_folder(workdir, capsys):
    photos = workdir / "photos"
    photos.mkdir()
    shutil.copy(workdir / "street.png", photos / "a.png")
    for _ in range(2):
        code, err = cli(["run", workdir / "engines/sclip.onnx", photos, "-o", photos], capsys)
        assert code == 0, err
    assert sorted(p.name for p in photos.iterdir()) == ["a.json", "a.labels.png", "a.overlay.png", "a.png"]


# --- 9. temporaries are ours, cleaned when stale; an image's outputs are complete or absent --------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    from clipfuse.runtime.fileio import write_text_atomic
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".a.json.clipfuse-{dead}-x1.part"
    live = tmp_path / f".a.json.clipfuse-{alive}-x2.part"          # another writer, still running
    other = tmp_path / f".b.json.clipfuse-{dead}-x3.part"          # another target's
    foreign = tmp_path / ".a.json.xyz.part"                        # not ours
    nested = tmp_path / f".{stale.name}.clipfuse-{dead}-y.part"    # a temporary of that temporary
    for p in (stale, live, other, foreign, nested):
        p.write_bytes(b"0" * 100)
    write_text_atomic(tmp_path / "a.json", "{}")
    assert not stale.exists() and not nested.exists()
    assert live.exists() and other.exists() and foreign.exists()
    assert (tmp_path / "a.json").read_text() == "{}"


def test_killed_export_leaves_nothing_after_the_next_export(tmp_path):
    """SIGKILL during `clipfuse export` (no cleanup can run), then the same export again."""
    out = tmp_path / "m"
    argv = [sys.executable, "-m", "clipfuse.runtime.cli", "export", "--head", "sclip", "--model", "ViT-T-16-test",
            "--pretrained", "none", "--templates", "single", "--classes", "a,b", "-o", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".m.onnx.clipfuse-*.part")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".m.onnx.clipfuse-*.part")), "export finished before it could be killed"
    assert subprocess.run(argv, timeout=300).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


def test_interrupted_image_leaves_no_partial_output_set(workdir, capsys, monkeypatch):
    from clipfuse.runtime import outputs

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(outputs, "overlay_image", interrupt)       # after the label map is encoded
    out = workdir / "out"
    code, err = cli(["run", workdir / "engines/sclip.onnx", workdir / "street.png", "-o", out], capsys)
    assert code == 130
    assert not out.exists()   # no labels without json, no temps, and the -o it created is gone again
