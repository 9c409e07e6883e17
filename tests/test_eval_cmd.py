"""`clipfuse eval` end to end on tiny VOC layouts with fake segmenters; mIoU checked by hand."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipfuse.runtime.commands import eval as cmd_eval
from clipfuse.runtime.cli import build_parser, main
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.eval import datasets as ds
from clipfuse.runtime.manifest import new_manifest, write_manifest
from clipfuse.runtime.methods import METHODS

from test_eval_layouts import make_voc

# Ground truth (test_eval_layouts.VOC_LABELS), sorted ids:
#   2007_000033: [[0, 0, 15], [15, 255, 1]]     2007_000042: [[1, 1], [0, 255]]
VOC21_PRED = [np.array([[0, 15, 15], [15, 0, 1]]), np.array([[1, 0], [0, 3]])]
# confusion (gt -> pred): 0->0 x2, 0->15 x1 | 15->15 x2 | 1->1 x2, 1->0 x1; the two void pixels
# (predicted 0 and 3) are not scored, so class 3 has zero union (excluded).
# IoU0 = 2/(3+3-2) = 1/2, IoU15 = 2/(2+3-2) = 2/3, IoU1 = 2/(3+2-2) = 2/3
VOC21_MIOU = 100 * (1 / 2 + 2 / 3 + 2 / 3) / 3   # 61.111
VOC21_AACC = 100 * 6 / 8
# Reference: correct on every scored pixel (7 and 3 fall on void pixels) -> mIoU 100 over 0, 1, 15.
REF_PRED = [np.array([[0, 0, 15], [15, 7, 1]]), np.array([[1, 1], [0, 3]])]
AGREEMENT = 100 * 6 / 8  # deployed and reference differ on 2 of the 8 scored pixels

# VOC20 from the same files: 0 -> void, k -> k-1. Scored: [_, _, 14 / 14, _, 0] and [0, 0 / _, _]
VOC20_PRED = [np.array([[3, 14, 14], [14, 0, 0]]), np.array([[0, 5], [2, 3]])]
# confusion: 14->14 x2 | 0->0 x2, 0->5 x1.  IoU14 = 1, IoU0 = 2/(3+2-2) = 2/3, IoU5 = 0/1 = 0
VOC20_MIOU = 100 * (1 + 2 / 3 + 0) / 3           # 55.556
VOC20_AACC = 100 * 4 / 5


class FakeSegmenter:
    """Returns the given label maps in call order; optionally interrupts at call `stop_at`."""

    def __init__(self, preds, class_names, stop_at=None):
        self.preds, self.class_names, self.stop_at, self.calls = list(preds), class_names, stop_at, 0
        self.backend = SimpleNamespace(name="fake-backend")

    def segment(self, image):
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        labels = self.preds[self.calls]
        assert image.shape[:2] == labels.shape
        self.calls += 1
        return SimpleNamespace(labels=labels.astype(np.int32), class_names=self.class_names)


def fake_model(tmp_path: Path, head: str, classes, pretrained="openai", protocol=None) -> Path:
    """A stand-in image artifact: a one-node ONNX graph carrying the manifest's contract (eval
    opens it like any artifact; the fake segmenters never run it)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from clipfuse.runtime.artifact import CONTRACT_KEY, contract_json
    from clipfuse.runtime.fileio import sha256_file

    model = tmp_path / "models" / f"{head}-test.onnx"
    model.parent.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(
        "image", inputs=[], outputs=[], head={"name": head, "params": {}}, classes=classes,
        pretrained=pretrained, precision="fp32", onnx_sha256=None,
        protocol=dict(METHODS[head].protocol.to_dict(), **(protocol or {})))
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "fake",
                              [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph)
    helper.set_model_props(proto, {CONTRACT_KEY: contract_json(manifest)})
    onnx.save(proto, str(model))
    manifest["onnx_sha256"] = sha256_file(model)
    write_manifest(model.with_suffix(".json"), manifest)
    return model


def classes_of(dataset, head):
    lines = ds.classes_file(dataset, head).read_text().splitlines()
    return [[n.strip() for n in line.split(",")] for line in lines if line.strip()]


def run_eval(argv, factory):
    args = build_parser().parse_args(["eval", *argv, "--no-progress"])
    return cmd_eval.evaluate_command(args, segmenter_factory=factory)


def factory_of(segmenters, calls):
    def factory(model, backend, overrides):
        calls.append((Path(model).name, backend, dict(overrides)))
        return segmenters[backend]
    return factory


def test_voc21_by_hand_with_sclip_protocol_and_report(tmp_path, capsys):
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "sclip", classes_of("voc21", "sclip"))
    names = [c[0] for c in classes_of("voc21", "sclip")]
    calls = []
    out = tmp_path / "out"
    rc = run_eval([str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(out)],
                  factory_of({"auto": FakeSegmenter(VOC21_PRED, names)}, calls))
    assert rc == 0
    # SCLIP's VOC21 settings from methods.py reach the segmenter
    assert calls == [("sclip-test.onnx", "auto", {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1})]
    data = json.loads((out / "results.json").read_text())
    res = data["results"]["deployed"]
    assert res["mIoU"] == pytest.approx(VOC21_MIOU, abs=1e-3)
    assert res["aAcc"] == pytest.approx(VOC21_AACC, abs=1e-3)
    iou = res["per_class_IoU"]
    assert iou["background"] == pytest.approx(50.0, abs=1e-3)
    assert iou["aeroplane"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert iou["person"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert iou["bird"] is None and iou["bicycle"] is None  # absent everywhere (3 only on void)
    assert data["finished"] is True and data["done_ids"] == ["2007_000033", "2007_000042"]
    assert data["meta"]["backends"] == {"deployed": "fake-backend"}
    assert data["meta"]["protocol"]["logit_scale"] == 65.0
    report = (out / "report.md").read_text()
    # paper SCLIP VOC21 = 59.1; 61.11 - 59.10 = +2.01
    assert "| deployed | 61.11 | 75.00 | 59.10 | +2.01 |" in report
    assert "| background | 50.00 |" in report and "unfinished" not in report
    assert "mIoU 61.11 (paper 59.1, +2.01)" in capsys.readouterr().out


def test_voc20_background_is_ignored_and_classes_shift(tmp_path):
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "clip-dinoiser", classes_of("voc20", None), pretrained="x")
    calls = []
    names = ds.first_names(ds.classes_file("voc20"))
    out = tmp_path / "out20"
    run_eval([str(model), "--dataset", "voc20", "--root", str(tmp_path / "data"), "--out", str(out)],
             factory_of({"auto": FakeSegmenter(VOC20_PRED, names)}, calls))
    assert calls[0][2] == {}  # CLIP-DINOiser has no per-dataset settings
    res = json.loads((out / "results.json").read_text())["results"]["deployed"]
    assert res["mIoU"] == pytest.approx(VOC20_MIOU, abs=1e-3)
    assert res["aAcc"] == pytest.approx(VOC20_AACC, abs=1e-3)
    assert res["per_class_IoU"]["aeroplane"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert res["per_class_IoU"]["person"] == pytest.approx(100.0, abs=1e-3)
    assert res["per_class_IoU"]["bus"] == 0.0
    report = (out / "report.md").read_text()
    assert "| deployed | 55.56 | 80.00 | 80.90 | -25.34 |" in report
    assert "Weights `x` differ from the paper's `laion2b_s34b_b88k`" in report


def test_compare_reference_delta_and_agreement(tmp_path, capsys):
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "sclip", classes_of("voc21", "sclip"))
    names = [c[0] for c in classes_of("voc21", "sclip")]
    calls = []
    segs = {"ort-cpu": FakeSegmenter(VOC21_PRED, names), "torch": FakeSegmenter(REF_PRED, names)}
    out = tmp_path / "cmp"
    run_eval([str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(out),
              "--backend", "ort-cpu", "--compare-reference"], factory_of(segs, calls))
    assert [c[1] for c in calls] == ["ort-cpu", "torch"] and calls[0][2] == calls[1][2]
    data = json.loads((out / "results.json").read_text())
    assert data["results"]["reference"]["mIoU"] == pytest.approx(100.0, abs=1e-9)
    assert data["agreement"]["percent"] == pytest.approx(AGREEMENT, abs=1e-9)
    assert data["agreement"]["pixels"] == 8
    printed = capsys.readouterr().out
    assert f"deployed - reference: {VOC21_MIOU - 100:+.2f} mIoU points, pixel agreement 75.00%" in printed
    assert "| reference | 100.00 |" in (out / "report.md").read_text()


def test_interrupt_then_resume_matches_one_shot(tmp_path):
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "sclip", classes_of("voc21", "sclip"))
    names = [c[0] for c in classes_of("voc21", "sclip")]
    out = tmp_path / "out"
    argv = [str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        run_eval(argv, factory_of({"auto": FakeSegmenter(VOC21_PRED, names, stop_at=1)}, []))
    partial = json.loads((out / "results.json").read_text())
    assert partial["finished"] is False and partial["done_ids"] == ["2007_000033"]
    # first image alone: 0->0 x1, 0->15 x1, 15->15 x2, 1->1 x1 (void skipped)
    assert np.array(partial["confusion"]["deployed"]).sum() == 5
    assert "unfinished" in (out / "report.md").read_text()
    with pytest.raises(ClipfuseError, match="already holds results; pass --resume"):
        run_eval(argv, factory_of({"auto": FakeSegmenter(VOC21_PRED, names)}, []))
    second_only = FakeSegmenter(VOC21_PRED[1:], names)
    run_eval(argv + ["--resume"], factory_of({"auto": second_only}, []))
    assert second_only.calls == 1  # the scored image was not run again
    data = json.loads((out / "results.json").read_text())
    assert data["finished"] is True
    assert data["results"]["deployed"]["mIoU"] == pytest.approx(VOC21_MIOU, abs=1e-3)
    # --limit 1 then resume without a limit continues with the rest
    out2 = tmp_path / "out2"
    argv2 = argv[:-1] + [str(out2)]
    run_eval(argv2 + ["--limit", "1"], factory_of({"auto": FakeSegmenter(VOC21_PRED, names)}, []))
    report = (out2 / "report.md").read_text()
    assert "1 of 2 validation images" in report and "Only 1 of 2 images: not comparable" in report
    assert "unfinished" not in report  # the requested subset is complete
    run_eval(argv2 + ["--resume"], factory_of({"auto": FakeSegmenter(VOC21_PRED[1:], names)}, []))
    assert json.loads((out2 / "results.json").read_text())["results"]["deployed"]["mIoU"] == \
        pytest.approx(VOC21_MIOU, abs=1e-3)


def test_resume_refuses_a_different_run(tmp_path):
    make_voc(tmp_path / "data")
    names = [c[0] for c in classes_of("voc21", "sclip")]
    model = fake_model(tmp_path, "sclip", classes_of("voc21", "sclip"))
    out = tmp_path / "out"
    argv = [str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(out)]
    run_eval(argv, factory_of({"auto": FakeSegmenter(VOC21_PRED, names)}, []))
    with pytest.raises(ClipfuseError, match="cannot resume .*runs="):
        run_eval(argv + ["--resume", "--compare-reference"],
                 factory_of({"auto": FakeSegmenter(VOC21_PRED, names),
                             "torch": FakeSegmenter(VOC21_PRED, names)}, []))


def test_vocabulary_size_mismatch_is_a_clear_error(tmp_path, capsys):
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "sclip", [["sky"], ["tree"], ["road"]])
    argv = [str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    with pytest.raises(ClipfuseError, match=r"3 classes but VOC21 has 21.*--classes-file .*sclip_voc21\.txt"):
        run_eval(argv, factory_of({}, []))
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 21" in err[0]
    assert not (tmp_path / "o").exists()


def test_wrong_root_and_reordered_classes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    model = fake_model(tmp_path, "sclip", classes_of("voc21", "sclip"))
    assert main(["eval", str(model), "--dataset", "voc21", "--root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation" in err and len(err.strip().splitlines()) == 1
    # same count, two classes swapped: evaluated, but warned about
    make_voc(tmp_path / "data")
    swapped = classes_of("voc21", "sclip")
    swapped[1], swapped[2] = swapped[2], swapped[1]
    model = fake_model(tmp_path, "sclip", swapped)
    names = [c[0] for c in swapped]
    run_eval([str(model), "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out",
              str(tmp_path / "o")], factory_of({"auto": FakeSegmenter(VOC21_PRED, names)}, []))
    assert "2 class name(s) of the model differ from VOC21's, e.g. class 1" in capsys.readouterr().err


def test_print_classes_file(capsys):
    assert main(["eval", "--print-classes-file", "VOC21", "--head", "sclip"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "sclip_voc21.txt" and len(ds.first_names(path)) == 21
    assert main(["eval", "--print-classes-file", "ade20k"]) == 0
    assert Path(capsys.readouterr().out.strip()).name == "ade20k.txt"


def test_real_segmenter_deployed_vs_reference(tmp_path):
    """Tiny real-architecture SCLIP graph through ORT vs the PyTorch reference on a VOC layout."""
    pytest.importorskip("onnxruntime")
    api = pytest.importorskip("clipfuse.export.api")
    rng = np.random.default_rng(0)
    labels = {f"2007_00{i:04d}": rng.integers(0, 21, size=(40, 56)).astype(np.uint8) for i in range(2)}
    make_voc(tmp_path / "data", labels)
    spec = api.ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                               classes=classes_of("voc20", "sclip"), size=224, templates="single")
    onnx_path = api.export_image_graph(spec, tmp_path / "m" / "tiny")
    out = tmp_path / "out"
    rc = main(["eval", str(onnx_path), "--dataset", "voc20", "--root", str(tmp_path / "data"),
               "--out", str(out), "--backend", "ort-cpu", "--compare-reference", "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["backends"] == {"deployed": "ort-cpu", "reference": "torch"}
    # same weights, same protocol: the two label maps must (almost) coincide
    assert data["agreement"]["percent"] >= 99.0, data["agreement"]
    d = data["results"]["deployed"]["mIoU"] - data["results"]["reference"]["mIoU"]
    assert abs(d) <= 0.5, d


@pytest.mark.parametrize("dataset, rule, expected", [
    ("voc21", False, "the paper applies CLIP-DINOiser's background rule on voc21 but this graph does not"),
    ("voc20", True, "this graph applies CLIP-DINOiser's background rule, which the paper does not use on voc20"),
    ("voc21", True, None),
    ("voc20", False, None),
])
def test_dinoiser_background_rule_warning(tmp_path, capsys, dataset, rule, expected):
    """The exported rule is compared with the paper's per-dataset protocol, warned about, and evaluated."""
    make_voc(tmp_path / "data")
    model = fake_model(tmp_path, "clip-dinoiser", classes_of(dataset, None), protocol={"background_rule": rule})
    preds = VOC21_PRED if dataset == "voc21" else VOC20_PRED
    names = ds.first_names(ds.classes_file(dataset))
    rc = run_eval([str(model), "--dataset", dataset, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")],
                  factory_of({"auto": FakeSegmenter(preds, names)}, []))
    assert rc == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "background rule" in line]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("clipfuse eval: warning: ") and expected in warnings[0]
    meta = json.loads((tmp_path / "o" / "results.json").read_text())["meta"]
    assert meta["protocol"]["background_rule"] is rule
