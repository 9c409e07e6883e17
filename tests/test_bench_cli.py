"""`clipfuse bench` end to end on the tiny model: JSON schema, ordered positive numbers, outputs
checked against the reference, Markdown and PNG written; GPU parts skip with their reason."""
from __future__ import annotations

import json

import pytest

from clipfuse.runtime.cli import build_parser, main

TINY = "ViT-T-16-test"
RECORD_KEYS = {"head", "size", "batch", "backend", "label", "scope", "status", "device", "precision",
               "latency", "samples_s", "flops_per_image", "speedup_vs_reference", "fraction_of_floor",
               "host_peak_rss_mb", "host_rss_before_mb", "loadavg_before", "loadavg_after",
               "max_abs_diff_vs_reference", "warmup_done", "setup_s"}
LATENCY_KEYS = {"iters", "mean_s", "std_s", "min_s", "max_s", "p50_s", "p90_s", "p99_s", "images_per_s"}


def _bench(tmp_path, *extra):
    out = tmp_path / "res" / "tiny"
    argv = ["bench", "--model", TINY, "--size", "32", "--batch", "1,2", "--warmup", "1", "--iters", "4",
            "--threads", "1", "--classes", "background;cat,kitty;dog", "-o", str(out), *extra]
    assert main(argv) == 0
    return out, json.loads((out.parent / "tiny.json").read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("bench"), "--head", "sclip,clip-dinoiser", "--backends", "cpu")


def test_json_schema_and_ordered_positive_numbers(cpu_run):
    out, doc = cpu_run
    assert doc["schema"] == "clipfuse-bench/1"
    assert {"config", "machine", "git", "device_peak", "flops", "results", "caveats", "created"} <= set(doc)
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["versions"]["torch"]
    assert doc["device_peak"]["cpu_fp32"]["flops_per_s"] > 0
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    # 2 heads x 4 CPU backends x 2 batches, unless the FP16 converter is unusable (then: skipped + reason)
    fp16 = [r for r in doc["results"] if r["backend"] == "ort-cpu-fp16"]
    assert len(doc["results"]) == 16 and len(ok) >= 12
    assert all(r["status"] == "ok" or r["reason"] for r in fp16)
    for rec in ok:
        assert RECORD_KEYS <= set(rec), RECORD_KEYS - set(rec)
        lat = rec["latency"]
        assert set(lat) == LATENCY_KEYS
        assert lat["iters"] == len(rec["samples_s"]) >= 3
        assert all(s > 0 for s in rec["samples_s"])
        assert 0 < lat["min_s"] <= lat["p50_s"] <= lat["p90_s"] <= lat["p99_s"] <= lat["max_s"]
        assert lat["mean_s"] > 0 and lat["images_per_s"] > 0
        assert lat["images_per_s"] == pytest.approx(rec["batch"] * lat["iters"] / sum(rec["samples_s"]), rel=1e-3)
        assert rec["flops_per_image"] > 0 and rec["fraction_of_floor"] > 0 and rec["speedup_vs_reference"] > 0
        assert rec["host_peak_rss_mb"] > 0
        assert len(rec["loadavg_before"]) == 3
        assert rec["flops_per_image"] == doc["flops"][rec["head"]]["32"]["total"]
        if rec["backend"] == "torch-ref":
            assert rec["speedup_vs_reference"] == pytest.approx(1.0)
        else:
            assert rec["speedup_vs_reference"] == pytest.approx(
                _ref(doc, rec)["latency"]["p50_s"] / lat["p50_s"])


def _ref(doc, rec):
    return next(r for r in doc["results"] if r["backend"] == "torch-ref" and r["head"] == rec["head"]
                and r["size"] == rec["size"] and r["batch"] == rec["batch"])


def test_every_backend_computes_the_reference_scores(cpu_run):
    _, doc = cpu_run
    for rec in (r for r in doc["results"] if r["status"] == "ok" and r["backend"] != "torch-ref"):
        diff = rec["max_abs_diff_vs_reference"]
        assert isinstance(diff, float), diff
        # FP32: float rounding only; FP16 graph: half precision with FP32 islands, scores in [-1, 1] / [0, 1]
        assert diff < (5e-2 if rec["precision"] == "fp16" else 1e-4), (rec["backend"], rec["head"], diff)


def test_markdown_and_plots_written(cpu_run):
    out, doc = cpu_run
    md = (out.parent / "tiny.md").read_text()
    assert "Caveat" in md and "SHARED" in md
    assert "| 32 | sclip |" in md and "PyTorch reference FP32" in md and "ONNX Runtime CPU FP32" in md
    png = (out.parent / "tiny-32.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_render_only_reproduces_the_markdown(cpu_run):
    out, _ = cpu_run
    md_path = out.parent / "tiny.md"
    before = md_path.read_text()
    md_path.unlink()
    assert main(["bench", "--render-only", "--no-plots", "-o", str(out)]) == 0
    assert md_path.read_text() == before


def test_unavailable_backends_are_recorded_with_reasons(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU backends are measured, not skipped")
    _, doc = _bench(tmp_path, "--head", "naclip", "--backends", "torch-ref,torch-fused-fp16,ort-cuda-fp32",
                    "--batch", "1", "--no-peak", "--no-plots")
    by_name = {r["backend"]: r for r in doc["results"]}
    assert by_name["torch-ref"]["status"] == "ok"
    assert by_name["torch-fused-fp16"]["status"] == "skipped" and "GPU" in by_name["torch-fused-fp16"]["reason"]
    assert by_name["ort-cuda-fp32"]["status"] == "skipped"
    assert "CUDAExecutionProvider" in by_name["ort-cuda-fp32"]["reason"]
    assert doc["device_peak"] == {}


def test_e2e_scope_times_decode_protocol_and_labels(tmp_path):
    _, doc = _bench(tmp_path, "--head", "maskclip", "--backends", "ort-cpu-fp32", "--size", "64", "--scope", "e2e",
                    "--batch", "8", "--iters", "3", "--no-peak", "--no-plots")
    (rec,) = doc["results"]
    assert rec["status"] == "ok" and rec["scope"] == "e2e"
    assert rec["latency"]["images_per_s"] == pytest.approx(1 / rec["latency"]["mean_s"], rel=1e-3)
    assert rec["fraction_of_floor"] is None  # windows per image depend on the image


def test_help_documents_every_backend_and_option(capsys):
    from clipfuse.benchmarks.backends import BENCH_BACKENDS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    for name in BENCH_BACKENDS:
        assert name in text, name
    for opt in ("--head", "--model", "--size", "--batch", "--backends", "--scope", "--iters", "--warmup",
                "--max-seconds", "--render-only", "examples:", "(default: 1,4)"):
        assert opt in text, opt


@pytest.mark.parametrize("argv", [["--head", "nope"], ["--batch", "0"], ["--backends", "ort-foo"],
                                  ["--size", "x"]])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv):
    assert main(["bench", "--model", TINY, "-o", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipfuse bench: error:")
    assert not (tmp_path / "x.json").exists()


def test_gpu_backends_run_on_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: FP16 autocast, torch.compile on GPU and the CUDA/TensorRT backends are "
                    "measured only on GPU machines")
    _, doc = _bench(tmp_path, "--head", "sclip", "--backends", "torch-ref,torch-fused,torch-fused-fp16",
                    "--torch-device", "cuda", "--no-plots")
    for rec in doc["results"]:
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["device_peak_mb"] > 0
    assert doc["device_peak"]["cuda_fp16"]["flops_per_s"] > 1e12


def test_append_adds_a_second_run_to_the_same_document(tmp_path):
    out, first = _bench(tmp_path, "--head", "clearclip", "--backends", "torch-ref", "--batch", "1", "--no-peak",
                        "--no-plots")
    assert main(["bench", "--model", TINY, "--head", "clearclip", "--backends", "torch-ref,ort-cpu-fp32",
                 "--size", "64", "--batch", "1", "--warmup", "1", "--iters", "3", "--threads", "1", "--no-peak",
                 "--no-plots", "--classes", "background;cat,kitty;dog", "--append", "-o", str(out)]) == 0
    doc = json.loads((out.parent / "tiny.json").read_text())
    assert len(doc["runs"]) == 2 and doc["runs"][1]["sizes"] == [64]
    assert [(r["size"], r["backend"], r["run"]) for r in doc["results"]] == [
        (32, "torch-ref", 0), (64, "torch-ref", 1), (64, "ort-cpu-fp32", 1)]
    assert doc["config"]["sizes"] == [32, 64] and set(doc["flops"]["clearclip"]) == {"32", "64"}
    assert doc["results"][2]["speedup_vs_reference"] > 0
    assert "Run 1: sizes [64]" in (out.parent / "tiny.md").read_text()
    # re-measuring the same head/size/batch/backend replaces the earlier record
    assert main(["bench", "--model", TINY, "--head", "clearclip", "--backends", "torch-ref", "--size", "32",
                 "--batch", "1", "--warmup", "1", "--iters", "3", "--threads", "1", "--no-plots",
                 "--classes", "background;cat,kitty;dog", "--append", "-o", str(out)]) == 0
    doc = json.loads((out.parent / "tiny.json").read_text())
    assert sorted((r["size"], r["backend"], r["run"]) for r in doc["results"]) == [
        (32, "torch-ref", 2), (64, "ort-cpu-fp32", 1), (64, "torch-ref", 1)]
    assert doc["device_peak"]["cpu_fp32"]["measurements"] == 2  # measured at start and end of run 2


def test_e2e_scope_times_frame_graphs_with_model_only_throughput_and_host_share(tmp_path):
    """`--frame-graphs all` adds ONNX Runtime CPU to the GPU backends that get a frame graph of the
    image's size (the host only decodes); the record's ratios follow from its own timings."""
    from PIL import Image
    image = tmp_path / "frame.jpg"
    Image.new("RGB", (320, 240), (90, 140, 60)).save(image)   # 2 x 2 windows of 224 (SCLIP's 336 short side)
    out, doc = _bench(tmp_path, "--head", "sclip", "--size", "224", "--backends", "ort-cpu-fp32", "--scope", "e2e",
                      "--image", str(image), "--batch", "2", "--frame-graphs", "all", "--no-peak", "--no-plots")
    by_name = {r["backend"]: r for r in doc["results"]}
    assert set(by_name) == {"ort-cpu-fp32", "ort-cpu-fp32+frame"}
    rec = by_name["ort-cpu-fp32+frame"]
    assert rec["status"] == "ok" and rec["scope"] == "e2e" and rec["batch"] == 2
    fg = rec["frame_graph"]
    assert fg["frame"] == [320, 240] and fg["backend"] == "ort-cpu"
    assert fg["e2e_over_model"] == pytest.approx(fg["model_p50_s"] / fg["e2e_p50_s"], abs=1e-3)
    assert fg["host_share"] == pytest.approx(max(0.0, 1 - fg["model_p50_s"] / fg["e2e_p50_s"]), abs=1e-3)
    assert fg["targets"]["host_share<=0.10"] == (fg["host_share"] <= 0.10)
    assert fg["model_frames_per_s"] == pytest.approx(2 / fg["model_p50_s"], rel=1e-2)
    assert rec["latency"]["p50_s"] == pytest.approx(fg["e2e_p50_s"] / 2, rel=0.5)   # per frame
    md = (out.parent / "tiny.md").read_text()
    assert "## Frame graphs end to end" in md and "| ort-cpu-fp32+frame | 2 |" in md
    # default: frame graphs only on GPU backends (none here)
    _, doc = _bench(tmp_path / "d", "--head", "sclip", "--size", "224", "--backends", "ort-cpu-fp32", "--scope",
                    "e2e", "--image", str(image), "--batch", "2", "--no-peak", "--no-plots")
    assert [r["backend"] for r in doc["results"]] == ["ort-cpu-fp32"]
