"""`clipfuse run` with a --vocab dynamic image graph and an exported text graph: the vocabulary
embedded on the device gives the same label maps as the graph with that vocabulary baked in."""
from __future__ import annotations

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
