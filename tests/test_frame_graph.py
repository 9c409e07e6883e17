"""Frame graphs (issue 16): the whole protocol in one graph for a fixed frame size.

Parity against the runtime's window graph + host protocol (labels >= 99.9 %, confidence 1e-4),
at three frame sizes, every head, baked and dynamic vocabulary; FP16 >= 99.5 %; TensorRT-legal ops.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_HEAD_PARAMS, registry_heads

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.segmenter import Segmenter  # noqa: E402
from test_runtime_parity import synthetic_photo  # noqa: E402

from clipfuse.runtime.methods import METHODS  # noqa: E402

VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass", "lawn"], ["sky"]]
VOC_RULES = {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1}
LABELS_MIN, CONF_ATOL = 0.999, 1e-4


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_clip):
    """(head, frame, rules, vocab) -> (window graph, frame graph), exported once per module."""
    from clipfuse.export.api import ImageExportSpec, export_image_graph

    root = tmp_path_factory.mktemp("frame_graphs")
    cache = {}

    def get(head, frame=(480, 640), rules=None, vocab="baked"):
        key = (head, frame, tuple(sorted((rules or {}).items())), vocab)
        if key not in cache:
            spec = ImageExportSpec(head, model="ViT-T-16-test", pretrained="none", classes=VOCAB,
                                   templates="single", seed=0, vocab_mode=vocab,
                                   head_params=TINY_HEAD_PARAMS.get(head, {}))
            name = f"{head}_{vocab}_{len(cache)}"
            win = export_image_graph(spec, root / f"{name}_win", clip=tiny_clip)
            frm = export_image_graph(replace(spec, frame=frame, frame_protocol=dict(rules or {})),
                                     root / f"{name}_frame", clip=tiny_clip)
            cache[key] = (win, frm)
        return cache[key]
    return get


def real_photo(frame):
    """tests/data/street.jpg (a real 500x375 photo) resized to the frame size."""
    from pathlib import Path
    from PIL import Image
    photo = Image.open(Path(__file__).parent / "data" / "street.jpg").convert("RGB")
    return np.asarray(photo.resize((frame[1], frame[0]), Image.BILINEAR))


def _compare(win, frm, image, rules=None, embeddings=None):
    with Segmenter.open(win, **(rules or {})) as a, Segmenter.open(frm) as b:
        if embeddings is not None:
            a.set_class_embeddings(*embeddings)
            b.set_class_embeddings(*embeddings)
        ra = a.segment(image, return_scores=True, return_confidence=True)
        rb = b.segment(image, return_scores=True, return_confidence=True)
    assert rb.labels.shape == image.shape[:2] and rb.labels.dtype == np.int32
    agree = float((ra.labels == rb.labels).mean())
    conf = float(np.abs(ra.confidence - rb.confidence).max())
    score = float(np.abs(ra.scores - rb.scores).max())
    return agree, conf, score, ra.labels


@pytest.mark.parametrize("head", registry_heads())
def test_frame_graph_equals_runtime_every_head(graphs, head):
    win, frm = graphs(head)
    agree, conf, score, labels = _compare(win, frm, synthetic_photo(480, 640, seed=list(METHODS).index(head)))
    assert len(np.unique(labels)) >= 2          # the comparison can fail: a structured label map
    assert agree >= LABELS_MIN, f"{head}: labels agree on {agree:.4%}"
    assert conf <= CONF_ATOL and score <= CONF_ATOL, (conf, score)


@pytest.mark.parametrize("head,frame", [("sclip", (480, 640)), ("sclip", (720, 1280)), ("sclip", (1024, 2048)),
                                        ("clip-dinoiser", (720, 1280)), ("clip-dinoiser", (1024, 2048))])
def test_frame_graph_equals_runtime_at_three_sizes(graphs, head, frame):
    rules = VOC_RULES if head == "sclip" else None   # the VOC rules: area_thd + prob_thd in the graph
    win, frm = graphs(head, frame, rules)
    agree, conf, score, labels = _compare(win, frm, real_photo(frame), rules)
    assert len(np.unique(labels)) >= 2
    assert agree >= LABELS_MIN, f"{head} {frame}: labels agree on {agree:.4%}"
    assert conf <= CONF_ATOL and score <= CONF_ATOL, (conf, score)


def test_frame_graph_voc_rules_at_640x480(graphs):
    win, frm = graphs("sclip", (480, 640), VOC_RULES)
    agree, conf, score, _ = _compare(win, frm, synthetic_photo(480, 640, seed=5), VOC_RULES)
    assert agree >= LABELS_MIN and conf <= CONF_ATOL


def test_frame_graph_dynamic_vocabulary_with_synonyms(graphs):
    win, frm = graphs("sclip", vocab="dynamic")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((7, 32)).astype(np.float32)   # one row per NAME (7 names, 5 classes)
    with Segmenter.open(win) as s:
        emb = rng.standard_normal((7, int(s.manifest["embed_dim"]))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    agree, conf, score, labels = _compare(win, frm, synthetic_photo(480, 640, seed=9), embeddings=(emb, VOCAB))
    assert len(np.unique(labels)) >= 2
    assert agree >= LABELS_MIN and conf <= CONF_ATOL and score <= CONF_ATOL


def test_frame_graph_is_tensorrt_legal(graphs):
    from clipfuse.export.graph_checks import run_checks

    _, frm = graphs("clip-dinoiser")
    model = onnx.load(str(frm))
    assert run_checks(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "NonZero", "Scan", "If", "Resize"}, ops
    consumers = [n.op_type for n in model.graph.node if "frames" in n.input]
    assert consumers == ["Cast"], consumers       # TensorRT accepts uint8 only into a Cast
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [480, 640, 3]


def test_frame_graph_fp16_keeps_labels(graphs, tmp_path):
    from clipfuse.export import fp16 as fp16_pass
    import onnxruntime as ort

    _, frm = graphs("sclip")
    dst = tmp_path / "frame.fp16.onnx"
    fp16_pass.convert_file(frm, dst)
    image = synthetic_photo(480, 640, seed=11)[None]
    outs = []
    for path, extra in ((frm, {}), (dst, {"disabled_optimizers": ["NchwcTransformer"]})):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], **extra)
        outs.append(sess.run(None, {"frames": image}))
    (l32, c32, s32), (l16, c16, s16) = outs
    assert np.isfinite(c16).all() and np.isfinite(s16).all()
    assert float((l32 == l16).mean()) >= 0.995


def test_segmenter_refuses_other_sizes_and_overrides(graphs):
    _, frm = graphs("naclip")
    with Segmenter.open(frm) as seg:
        with pytest.raises(ClipfuseError, match="frame graph for 640x480 frames.*--frame 500x375"):
            seg.segment(np.zeros((375, 500, 3), np.uint8))
    with pytest.raises(ClipfuseError, match="cannot be overridden"):
        Segmenter.open(frm, prob_thd=0.2)


def test_docs_example_runs_without_clipfuse(graphs, tmp_path):
    """The frame-graph example of docs/deployment.md is complete: it segments the test photo with onnxruntime
    alone (clipfuse, torch and onnx made unimportable) and writes the same labels as the runtime."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from hidden_modules import hide_modules
    from PIL import Image

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- frame-graph-example -->\s*```python\n(.*?)```", doc, re.S).group(1)
    _, frm = graphs("naclip")
    photo = Path(__file__).parent / "data" / "street.jpg"
    script = tmp_path / "example.py"
    script.write_text(hide_modules("clipfuse", "torch", "onnx", "open_clip") + code)
    run = subprocess.run([sys.executable, str(script), str(frm), str(photo)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "of pixels" in run.stdout
    got = np.asarray(Image.open(tmp_path / "labels.png"))
    frame = np.asarray(Image.open(photo).convert("RGB").resize((640, 480), Image.BILINEAR))
    with Segmenter.open(frm) as seg:
        want = seg.segment(frame).labels
    assert np.array_equal(got, want)


def test_frame_option_parsing_and_refusals(tmp_path):
    import subprocess
    import sys

    from clipfuse.export.frame_graph import parse_frame
    assert parse_frame("1280x720") == (720, 1280)
    for bad in ("1280", "0x720", "axb", "12x-3"):
        with pytest.raises(ClipfuseError, match="--frame"):
            parse_frame(bad)
    run = subprocess.run([sys.executable, "-m", "clipfuse.runtime.cli", "export", "--head", "sclip", "--classes", "a,b",
                          "--pretrained", "none", "--prob-thd", "0.2", "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "frame graphs only" in run.stderr, run.stderr
    assert not list(tmp_path.iterdir())
