"""clipfuse.runtime.text: class embeddings from the text graph vs the exporter's torch computation."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
open_clip = pytest.importorskip("open_clip")

from clipfuse.export.text_embed import encode_names as torch_encode_names  # noqa: E402
from clipfuse.export.text_graph import export_text_graph  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.templates import IMAGENET80  # noqa: E402
from clipfuse.runtime.text import TextEncoder, class_embeddings, l2_normalize  # noqa: E402
from hidden_modules import hide_modules  # noqa: E402

VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass", "lawn"], ["traffic light"]]


@pytest.fixture(scope="module")
def graphs(tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("text-rt")
    return {p: export_text_graph(out / f"tiny-text-{p}", precision=p, clip=tiny_clip) for p in ("fp32", "fp16")}


def _torch_embeddings(clip, names, templates):
    """Independent reference: open_clip's tokenizer + encode_text in torch (what gets baked)."""
    return torch_encode_names(clip.model, open_clip.get_tokenizer("ViT-T-16-test"), names, templates).numpy()


def test_class_embeddings_equal_torch(tiny_clip, graphs):
    with TextEncoder.open(graphs["fp32"]) as enc:
        got = class_embeddings(enc, VOCAB, "imagenet80", chunk=64)
    names = [n for c in VOCAB for n in c]
    ref = _torch_embeddings(tiny_clip, names, IMAGENET80)
    assert got.embeddings.shape == (7, 64) and got.embeddings.dtype == np.float32
    assert got.names == names and got.class_of_name == [0, 1, 1, 2, 3, 3, 4]
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, atol=1e-6)
    assert np.abs(got.embeddings - ref).max() < 1e-5, np.abs(got.embeddings - ref).max()


def test_single_template_and_custom_list(tiny_clip, graphs):
    with TextEncoder.open(graphs["fp32"]) as enc:
        single = class_embeddings(enc, [["sky"], ["tree", "bush"]], "single").embeddings
        custom = class_embeddings(enc, [["sky"], ["tree", "bush"]], ["a photo of a {}.", "{} in the wild"])
    ref_single = _torch_embeddings(tiny_clip, ["sky", "tree", "bush"], ["a photo of a {}."])
    ref_custom = _torch_embeddings(tiny_clip, ["sky", "tree", "bush"], ["a photo of a {}.", "{} in the wild"])
    assert np.abs(single - ref_single).max() < 1e-5
    assert np.abs(custom.embeddings - ref_custom).max() < 1e-5 and custom.templates == "custom"


def test_fp16_text_graph_embeddings(graphs):
    with TextEncoder.open(graphs["fp32"]) as e32, TextEncoder.open(graphs["fp16"]) as e16:
        a = class_embeddings(e32, VOCAB, "imagenet80").embeddings
        b = class_embeddings(e16, VOCAB, "imagenet80").embeddings
    assert np.isfinite(b).all()
    assert (a * b).sum(1).min() > 0.999


def test_l2_normalize_matches_torch():
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    x[2] = 0.0  # torch clamps the norm at eps: zero rows stay zero, no NaN
    ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_allclose(l2_normalize(x), ref, atol=1e-7)


def test_open_errors(graphs, tmp_path):
    with pytest.raises(ClipfuseError, match="text graph not found"):
        TextEncoder.open(tmp_path / "missing.onnx")
    # a tampered graph is refused by hash
    bad = tmp_path / "bad.onnx"
    shutil.copy(graphs["fp32"], bad)
    shutil.copy(graphs["fp32"].with_suffix(".json"), bad.with_suffix(".json"))
    with open(bad, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ClipfuseError, match="does not match its manifest"):
        TextEncoder.open(bad)
    # an image manifest is not a text graph
    man = json.loads(graphs["fp32"].with_suffix(".json").read_text())
    man["kind"] = "image"
    other = tmp_path / "img.onnx"
    shutil.copy(graphs["fp32"], other)
    other.with_suffix(".json").write_text(json.dumps(man))
    with pytest.raises(ClipfuseError, match="needs a text graph|need a text graph"):
        TextEncoder.open(other)
    with TextEncoder.open(graphs["fp32"]) as enc:
        with pytest.raises(ClipfuseError, match="duplicate name"):
            class_embeddings(enc, [["cat"], ["Cat"]])
        with pytest.raises(ClipfuseError, match="'{}'"):
            class_embeddings(enc, [["cat"]], ["no placeholder"])


def test_runtime_text_path_without_torch(graphs):
    """Tokenizer + text graph + averaging with torch/open_clip blocked, equal to the in-process result."""
    with TextEncoder.open(graphs["fp32"]) as enc:
        expected = class_embeddings(enc, VOCAB, "single").embeddings
    code = hide_modules("torch", "open_clip", "onnx", "regex", "ftfy") + textwrap.dedent(f"""
        import sys
        import numpy as np
        from clipfuse.runtime.text import TextEncoder, class_embeddings
        enc = TextEncoder.open({str(graphs['fp32'])!r})
        emb = class_embeddings(enc, {VOCAB!r}, 'single').embeddings
        np.save(sys.argv[1], emb)
        assert 'torch' not in sys.modules
    """)
    out = graphs["fp32"].parent / "emb.npy"
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
