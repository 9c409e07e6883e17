"""`clipfuse run` with a --vocab dynamic image graph and an exported text graph: the vocabulary
embedded on the device gives the same label maps as the graph with that vocabulary baked in."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from clipfuse.export.api import ImageExportSpec, export_image_graph
from clipfuse.export.text_graph import export_text_graph
from clipfuse.runtime.cli import main

from conftest import TINY


def _labels(path):
    return np.array(Image.open(path))


def test_run_dynamic_vocab_equals_baked(tmp_path, capsys):
    vocab = [["background"], ["cat", "kitty"], ["dog"]]
    common = dict(model=TINY, pretrained="none", size=224, templates="single")
    dynamic = export_image_graph(ImageExportSpec("sclip", classes=[["placeholder"]], vocab_mode="dynamic", **common),
                                 tmp_path / "dyn")
    baked = export_image_graph(ImageExportSpec("sclip", classes=vocab, **common), tmp_path / "baked")
    text = export_text_graph(tmp_path / "text", model=TINY, pretrained="none", quiet=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "img.png")

    assert main(["run", str(baked), str(tmp_path / "img.png"), "-o", str(tmp_path / "a")]) == 0
    assert main(["run", str(dynamic), str(tmp_path / "img.png"), "-o", str(tmp_path / "b"),
                 "--text-model", str(text), "--classes", "background;cat,kitty;dog"]) == 0
    want, got = _labels(tmp_path / "a" / "img.labels.png"), _labels(tmp_path / "b" / "img.labels.png")
    assert len(np.unique(want)) > 1
    assert (want == got).mean() >= 0.999

    capsys.readouterr()
    assert main(["run", str(dynamic), str(tmp_path / "img.png"), "-o", str(tmp_path / "c")]) == 2
    assert "pass --text-model" in capsys.readouterr().err
    assert main(["run", str(baked), str(tmp_path / "img.png"), "-o", str(tmp_path / "c"),
                 "--classes", "a,b"]) == 2
    assert "baked vocabulary" in capsys.readouterr().err


def test_torch_backend_takes_the_fed_embeddings_like_the_dynamic_graph(tmp_path, perturbed_tiny):
    """backend 'torch' on a --vocab dynamic manifest scores the class_embeddings fed at run time,
    one output row per embedding row (no synonym max), as the ONNX graph does."""
    import onnxruntime as ort

    from clipfuse.export.api import build_fused
    from clipfuse.runtime.artifact import open_artifact
    from clipfuse.runtime.backends import open_backend

    from conftest import VOCAB
    from parity_inputs import smooth_images

    spec = perturbed_tiny.spec("sclip", classes=VOCAB, size=224, templates="single")
    dynamic = export_image_graph(replace(spec, classes=[["placeholder"]], vocab_mode="dynamic"), tmp_path / "dyn",
                                 clip=perturbed_tiny.clip)
    rows = build_fused(spec, clip=perturbed_tiny.clip).name_embeddings.numpy()
    images = smooth_images(2, 224, seed=4)
    session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])
    torch_backend = open_backend(dynamic, open_artifact(dynamic).manifest, "torch")
    for picked in ([0, 1, 2, 3, 4], [3, 1]):       # 5 names of 4 classes; a reordered subset
        feeds = {"image": images, "class_embeddings": rows[picked]}
        want = session.run(["scores"], feeds)[0]
        got = torch_backend.run(feeds)["scores"]
        assert got.shape == want.shape == (2, len(picked), 14, 14)
        assert len(np.unique(want.argmax(axis=1))) > 1
        assert np.abs(got - want).max() <= 1e-4
