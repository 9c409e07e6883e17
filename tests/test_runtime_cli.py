"""`clipfuse run`, the Segmenter's checks, outputs, the dynamic-vocabulary hook, torch-free import."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipfuse.runtime.cli import main
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.outputs import class_shares, palette, save_label_png
from hidden_modules import hide_modules

CLASSES = [["background"], ["sky"], ["tree", "bush"], ["road"]]

# Hides torch / open_clip / onnx (not onnxruntime) from a fresh interpreter.
HIDE_TORCH = hide_modules("torch", "open_clip", "onnx", "torchvision", "onnxscript")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    root = tmp_path_factory.mktemp("runtime_cli")
    return export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none", classes=CLASSES,
                                              templates="single", seed=0), root / "sclip")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    arrays = {}
    for name, (h, w) in {"a.png": (120, 160), "sub/b.jpg": (150, 100)}.items():
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays[name] = np.asarray(Image.open(folder / name).convert("RGB"))
    return folder, arrays


def run_cli(argv, capsys):
    code = main(["run", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


# --- happy path ------------------------------------------------------------------------------
def test_run_writes_label_map_overlay_and_shares(model, images, tmp_path, capsys):
    from clipfuse.runtime.segmenter import Segmenter
    folder, arrays = images
    out = tmp_path / "out"
    code, _ = run_cli([model, folder, "-o", out, "--threads", "1"], capsys)
    assert code == 0
    with Segmenter.open(model) as seg:
        for name, arr in arrays.items():
            stem = out / name.rsplit(".", 1)[0]
            labels = np.array(Image.open(f"{stem}.labels.png"))
            expected = seg.segment(arr).labels
            assert np.array_equal(labels, expected)                 # pixel value = class index
            overlay = Image.open(f"{stem}.overlay.png")
            assert overlay.height >= arr.shape[0] and overlay.width > arr.shape[1]   # legend on the right
            shares = json.loads(open(f"{stem}.json").read())
            assert shares["height"] == arr.shape[0] and shares["width"] == arr.shape[1]
            counts = {c["id"]: c["pixels"] for c in shares["classes"]}
            assert counts == {k: int((expected == k).sum()) for k in np.unique(expected)}
            assert abs(sum(c["share"] for c in shares["classes"]) - 1) < 1e-5
    assert not list(out.rglob("*.part"))                            # atomic writes left nothing


def test_protocol_overrides_reach_the_segmenter(model, images, tmp_path, capsys):
    folder, arrays = images
    out = tmp_path / "o"
    code, _ = run_cli([model, folder / "a.png", "-o", out, "--short-side", "448", "--prob-thd", "0.99",
                       "--no-overlay"], capsys)
    assert code == 0
    shares = json.loads((out / "a.json").read_text())
    assert shares["processing_size"] == [448, 597]
    # prob_thd 0.99 with logit_scale 40 on random weights: nearly everything falls back to class 0
    assert shares["classes"][0]["id"] == 0 and shares["classes"][0]["share"] > 0.9
    assert not (out / "a.overlay.png").exists()


# --- bad inputs: one line on stderr, exit code 2 -------------------------------------------------
def _one_line_error(code, err, pattern):
    import re
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("clipfuse run: error: "), err
    assert re.search(pattern, err[0]), err[0]


def test_corrupt_image(model, tmp_path, capsys):
    good = tmp_path / "g.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    code, err = run_cli([model, bad, "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"cannot decode image .*bad\.jpg")


def test_non_image_file(model, tmp_path, capsys):
    bad = tmp_path / "readme.png"
    bad.write_text("hello")
    code, err = run_cli([model, bad, "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"not an image Pillow can read")


def test_folder_with_one_bad_file_segments_the_rest(model, images, tmp_path, capsys):
    folder, _ = images
    (folder / "zz.png").write_text("not a png")
    out = tmp_path / "o"
    code = main(["run", str(model), str(folder), "-o", str(out), "--no-overlay"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 3 images could not be read" in err
    assert (out / "a.labels.png").exists() and (out / "sub" / "b.labels.png").exists()


def test_missing_model(images, tmp_path, capsys):
    folder, _ = images
    code, err = run_cli([tmp_path / "nope.onnx", folder, "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"model not found: .*nope\.onnx")


def test_missing_manifest(model, images, tmp_path, capsys):
    lone = tmp_path / "lone.onnx"
    shutil.copy(model, lone)
    code, err = run_cli([lone, images[0], "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"manifest not found")


def test_onnx_hash_mismatch(model, images, tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    shutil.copy(model, copy)
    manifest = json.loads(model.with_suffix(".json").read_text())
    manifest["onnx_sha256"] = "0" * 64
    copy.with_suffix(".json").write_text(json.dumps(manifest))
    code, err = run_cli([copy, images[0], "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"m\.onnx does not match its manifest \(onnx sha256")
    code, _ = run_cli([copy, images[0] / "a.png", "-o", tmp_path / "o", "--no-verify"], capsys)
    assert code == 0


def test_engine_hash_mismatch(model, tmp_path):
    """.engine files are checked against manifest["engine"]["sha256"] before any backend loads."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    manifest = json.loads(model.with_suffix(".json").read_text())
    manifest["engine"] = {"file": engine.name, "sha256": "f" * 64}
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    from clipfuse.runtime.segmenter import Segmenter
    with pytest.raises(ClipfuseError, match=r"m\.engine does not match its manifest \(engine sha256"):
        Segmenter.open(engine)


def test_wrong_backend_for_suffix(model, images, tmp_path, capsys):
    code, err = run_cli([model, images[0], "-o", tmp_path / "o", "--backend", "tensorrt"], capsys)
    _one_line_error(code, err, r"backend 'tensorrt' opens \.engine files, not sclip\.onnx")
    code, err = run_cli([model, images[0], "-o", tmp_path / "o", "--backend", "ort-cuda"], capsys)
    _one_line_error(code, err, r"CUDAExecutionProvider")   # this onnxruntime is the CPU build
    code, err = run_cli([model, images[0], "-o", tmp_path / "o", "--backend", "bogus"], capsys)
    _one_line_error(code, err, r"unknown backend 'bogus'")


def test_bad_overrides(model, images, tmp_path, capsys):
    code, err = run_cli([model, images[0], "-o", tmp_path / "o", "--window-stride", "300"], capsys)
    _one_line_error(code, err, r"stride 300 > window 224")
    code, err = run_cli([model, tmp_path / "missing.jpg", "-o", tmp_path / "o"], capsys)
    _one_line_error(code, err, r"image not found")


def test_real_process_exit_code_and_single_line(model, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "clipfuse.runtime.cli", "run", str(model), str(bad),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not an image" in proc.stderr


# --- dynamic vocabulary hook -------------------------------------------------------------------
def test_dynamic_vocab_hook_equals_baked_graph(model, tmp_path):
    """set_class_embeddings feeds `class_embeddings` and max-reduces synonym rows per window."""
    from clipfuse.export.api import ImageExportSpec, build_fused, export_image_graph
    from clipfuse.runtime.segmenter import Segmenter
    dyn = export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none", classes=CLASSES,
                                             templates="single", vocab_mode="dynamic", seed=0), tmp_path / "dyn")
    build = build_fused(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none", classes=CLASSES,
                                        templates="single", vocab_mode="dynamic", seed=0))
    image = np.random.default_rng(5).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    with Segmenter.open(dyn) as seg_dyn, Segmenter.open(model) as seg_baked:
        with pytest.raises(ClipfuseError, match="dynamic vocabulary"):
            seg_dyn.segment(image)
        with pytest.raises(ClipfuseError, match="one row per class name"):
            seg_dyn.set_class_embeddings(build.name_embeddings.numpy()[:2])
        seg_dyn.set_class_embeddings(build.name_embeddings.numpy())      # 5 rows for 4 classes
        a = seg_dyn.segment(image, return_scores=True)
        b = seg_baked.segment(image, return_scores=True)
        with pytest.raises(ClipfuseError, match="baked vocabulary"):
            seg_baked.set_class_embeddings(build.name_embeddings.numpy())
    assert np.abs(a.scores - b.scores).max() <= 1e-5
    assert np.array_equal(a.labels, b.labels)


# --- outputs -----------------------------------------------------------------------------------
def test_label_png_palette_and_many_classes(tmp_path):
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    save_label_png(tmp_path / "l.png", labels, 12)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P" and np.array_equal(np.array(img), labels)
    assert np.array_equal(np.array(img.convert("RGB"))[0, 1], palette(12)[1])
    big = np.array([[0, 300], [299, 5]], dtype=np.int32)
    save_label_png(tmp_path / "b.png", big, 301)
    assert np.array_equal(np.array(Image.open(tmp_path / "b.png")), big)
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]   # VOC colours
    shares = class_shares(np.array([[1, 1, 2, 1]]), ["a", "b", "c"])
    assert [(s["id"], s["pixels"], s["share"]) for s in shares] == [(1, 3, 0.75), (2, 1, 0.25)]


# --- torch-free import and run ------------------------------------------------------------------
def test_runtime_imports_and_runs_without_torch(model, images, tmp_path):
    folder, _ = images
    script = HIDE_TORCH + textwrap.dedent(f"""
        import clipfuse.runtime, clipfuse.runtime.segmenter, clipfuse.runtime.protocol
        import clipfuse.runtime.imageio, clipfuse.runtime.outputs, clipfuse.runtime.commands.run
        import clipfuse.runtime.backends.onnxruntime, clipfuse.export.torch_backend
        from clipfuse.runtime.errors import ClipfuseError
        from clipfuse.runtime.segmenter import Segmenter
        try:
            Segmenter.open({str(model)!r}, backend="torch")
            raise SystemExit("torch backend opened without torch")
        except ClipfuseError as exc:
            assert "needs the export extra" in str(exc), exc
        from clipfuse.runtime.cli import main
        code = main(["run", {str(model)!r}, {str(folder)!r}, "-o", {str(tmp_path / 'out')!r}])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in _Hide.BLOCKED)
        print("CODE", code, "HEAVY", heavy)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "CODE 0 HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "a.labels.png").exists()
