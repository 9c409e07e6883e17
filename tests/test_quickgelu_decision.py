"""QuickGELU is never guessed: an open_clip-format checkpoint of a plain architecture does not
record its activation, so every exporter refuses it without `--quick-gelu on|off` (exit 2, one
line, no files) and honours the flag (the manifest records it, the graph computes it)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from clipfuse.export.weights import load_clip  # noqa: E402
from clipfuse.runtime.cli import main  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402

from conftest import TINY  # noqa: E402

EXPORTERS = {
    "export": ["export", "--head", "maskclip", "--classes", "a,b", "--size", "224"],
    "export-text": ["export-text"],
    "export-refer": ["export-refer", "--no-text"],
}


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(load_clip(TINY, "none", seed=5).model.state_dict(), path)
    return path


def _act(model) -> str:
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_load_clip_refuses_to_guess(open_clip_file):
    with pytest.raises(ClipfuseError, match=r"does not record .*QuickGELU.*--quick-gelu on\|off"):
        load_clip(TINY, str(open_clip_file))
    assert _act(load_clip(TINY, str(open_clip_file), quick_gelu=True).model) == "QuickGELU"
    assert _act(load_clip(TINY, str(open_clip_file), quick_gelu=False).model) == "GELU"


@pytest.mark.parametrize("command", sorted(EXPORTERS))
def test_every_exporter_requires_the_flag(command, open_clip_file, tmp_path, capsys):
    out = tmp_path / "m"
    argv = EXPORTERS[command] + ["--model", TINY, "--pretrained", str(open_clip_file), "-o", str(out), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--quick-gelu on|off" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_flag_reaches_the_manifest_and_the_graph(open_clip_file, tmp_path):
    """export-text with --quick-gelu on: manifest says so, and the graph equals the QuickGELU
    model's text features (not the GELU one's, which differ by far more than the tolerance)."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import open_clip

    out = tmp_path / "t"
    assert main(["export-text", "--model", TINY, "--pretrained", str(open_clip_file), "--quick-gelu", "on",
                 "-o", str(out), "-q"]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["quick_gelu"] is True
    sess = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    tokens = open_clip.tokenize(["a photo of a cat"])
    feeds = {i.name: tokens.numpy().astype(np.int64 if "int64" in i.type else np.int32)
             for i in sess.get_inputs()}
    got = sess.run(None, feeds)[0].reshape(-1)
    with torch.no_grad():
        quick = load_clip(TINY, str(open_clip_file), quick_gelu=True).model.encode_text(tokens)[0].numpy()
        plain = load_clip(TINY, str(open_clip_file), quick_gelu=False).model.encode_text(tokens)[0].numpy()
    assert np.abs(quick - plain).max() > 1e-3
    np.testing.assert_allclose(got, quick, atol=1e-4)       # the text graph's output is raw


def test_hugging_face_cache_folder_of_a_tag_decides(open_clip_file, tmp_path):
    """open_clip's OpenAI tag for ViT-B-32 lives on the hub as timm/vit_base_patch32_clip_224.openai:
    a file under that cache folder is those weights (QuickGELU); the same file elsewhere is not."""
    import open_clip

    from clipfuse.export.weights import quick_gelu_of_file

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    cached = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc" / "model.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert quick_gelu_of_file(cached, "open_clip", "ViT-B-32", False) is True
    assert quick_gelu_of_file(tmp_path / "model.bin", "open_clip", "ViT-B-32", False) is None
    laion = [t for t in open_clip.list_pretrained_tags_by_model("ViT-B-32")
             if open_clip.get_pretrained_cfg("ViT-B-32", t).get("hf_hub") and t != "openai"
             and not open_clip.get_pretrained_cfg("ViT-B-32", t).get("quick_gelu")][0]
    repo = open_clip.get_pretrained_cfg("ViT-B-32", laion)["hf_hub"].strip("/")
    other = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc" / "model.bin"
    assert quick_gelu_of_file(other, "open_clip", "ViT-B-32", False) is False
