"""The benchmark loop: for each (size, head) export once, then time every backend at every batch.

Results are appended to the JSON as they come (written atomically), so a long run that is cut
short still leaves every finished measurement on disk.
"""
from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import timing
from .backends import REFERENCE, BenchContext, Runner, Unavailable, open_runner
from .flops import VitShape, head_flops


@dataclass
class BenchConfig:
    heads: List[str]
    model: str = "ViT-B-16"
    pretrained: str = "none"
    sizes: List[int] = field(default_factory=lambda: [224])
    batches: List[int] = field(default_factory=lambda: [1, 4])
    backends: List[str] = field(default_factory=lambda: ["torch-ref", "torch-fused", "ort-cpu-fp32"])
    scope: str = "model"
    warmup: int = 2
    iters: int = 10
    max_seconds: Optional[float] = 60.0
    min_iters: int = 3
    threads: int = 2
    classes: List[List[str]] = field(default_factory=list)
    templates: str = "single"
    heads_ckpt: Optional[str] = None   # --heads checkpoint; key of the committed result documents
    quick_gelu: Optional[bool] = None   # None: decided by the weights (clipfuse.export.weights)
    seed: int = 0
    torch_device: str = "cpu"
    image: Optional[str] = None           # e2e input; None: a synthetic 640x480 JPEG
    workdir: Optional[str] = None         # where graphs go; None: a temp folder, removed after
    measure_peak: bool = True
    # e2e scope: also time a frame graph of the image's size (the host only decodes) on the GPU
    # backends ("gpu"), on every backend that runs .onnx/.engine frame graphs ("all"), or not ("off")
    frame_graphs: str = "gpu"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _say(msg: str) -> None:
    print(f"clipfuse bench: {msg}", file=sys.stderr, flush=True)


def synthetic_jpeg(path: Path, size=(480, 640), seed: int = 0) -> Path:
    """A smooth, photo-like test image (gradients + blobs + noise) saved as JPEG quality 90."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37 + yy / 53)], axis=-1) * 200
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(30, 120)
        img += (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None] * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


class _StagedCall:
    """One e2e call (decode -> protocol -> labels PNG) that keeps seconds per stage of every call."""

    STAGES = ("decode", "resize", "windows", "model", "protocol", "postprocess", "write")

    def __init__(self, seg, image_path: Path) -> None:
        self.seg, self.image_path = seg, image_path
        self.stage_samples: List[Dict[str, float]] = []

    def __call__(self) -> object:
        import io

        from PIL import Image

        from clipfuse.runtime.imageio import read_image
        stages: Dict[str, float] = {}
        t0 = time.perf_counter()
        image = read_image(self.image_path)
        stages["decode"] = time.perf_counter() - t0
        result = self.seg.segment(image, timings=stages)
        t1 = time.perf_counter()
        Image.fromarray(result.labels.astype(np.uint8), mode="L").save(io.BytesIO(), format="PNG")
        stages["write"] = time.perf_counter() - t1
        self.stage_samples.append(stages)
        return result


def stage_medians(samples: List[Dict[str, float]]) -> Dict[str, float]:
    """Median seconds per stage over the timed calls (stages absent in a call count as 0)."""
    names = [n for n in _StagedCall.STAGES if any(n in s for s in samples)]
    return {n: round(float(np.median([s.get(n, 0.0) for s in samples])), 6) for n in names}


def _e2e_call(runner: Runner, onnx_path: Path, manifest: dict, image_path: Path, batch: int) -> Callable[[], object]:
    """image file -> decode -> protocol (resize, windows of `batch` per call, average) -> labels."""
    from clipfuse.runtime.backends.base import Backend
    from clipfuse.runtime.protocol import protocol_from_manifest
    from clipfuse.runtime.segmenter import Segmenter

    class _Adapter(Backend):
        name = runner.name

        def run(self, feeds):
            return {"scores": runner.infer(feeds["image"])}

    seg = Segmenter(onnx_path, manifest, _Adapter(onnx_path, manifest), protocol_from_manifest(manifest),
                    batch=batch)
    return _StagedCall(seg, image_path)


@dataclass
class _Live:
    """One backend being measured at one batch size: its record and what one timed call is."""
    name: str
    runner: Runner
    rec: dict
    call: Callable[[], object]
    sync: Callable[[], None]
    event_timer: Optional[Callable]
    samples: List[float] = field(default_factory=list)


def warm_up(runner: Runner, cfg: BenchConfig, batch: int, images: np.ndarray, ctx: BenchContext,
            image_path: Optional[Path]) -> tuple:
    """Stage the batch and run the warm-up calls; returns (call, sync, event_timer, record so far).

    The host peak (VmHWM) is reset before and read after the warm-up, which runs the same shapes
    as the timed calls, so it is this backend's peak at this batch (+ everything already loaded).
    """
    rec: dict = {"status": "ok", "loadavg_before": timing.load_average(), "host_rss_before_mb": timing.host_rss_mb(),
                 "host_peak_reset": timing.reset_host_peak()}
    runner.reset_device_peak()
    t0 = time.perf_counter()
    if cfg.scope == "model":
        runner.prepare(images)
        call = runner.call
    else:
        call = _e2e_call(runner, ctx.onnx_path, ctx.manifest, image_path, batch)
    done = 0
    for done in range(1, max(1, cfg.warmup) + 1):  # cut after the first once half the budget is spent
        call()
        runner.sync()
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds / 2:
            break
    if isinstance(call, _StagedCall):
        call.stage_samples.clear()   # only the timed calls count
    rec.update(warmup_done=done, host_peak_rss_mb=timing.host_peak_rss_mb(), device_peak_mb=runner.device_peak_mb())
    event_timer = runner.event_timer if cfg.scope == "model" else None
    return call, runner.sync, event_timer, rec


def measure_interleaved(live: List[_Live], cfg: BenchConfig, batch: int) -> None:
    """Timed calls in rounds, one call per backend per round, the starting backend rotating.

    On a shared machine the load drifts during a run; interleaving spreads the drift over every
    backend alike, so the ratios between backends (the speed-ups) stay meaningful. The time cap
    is per backend: the rounds stop once the total exceeds max_seconds x backends (and min_iters).
    """
    started = time.perf_counter()
    for rnd in range(max(1, cfg.iters)):
        active = [lv for lv in live if lv.rec["status"] == "ok"]
        if not active:
            break
        shift = rnd % len(active)
        for lv in active[shift:] + active[:shift]:
            try:
                lv.samples.append(timing.timed_call(lv.call, lv.sync, lv.event_timer))
            except Exception as exc:
                lv.rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        if (cfg.max_seconds is not None and rnd + 1 >= cfg.min_iters
                and time.perf_counter() - started > cfg.max_seconds * len(active)):
            break
    for lv in live:
        lv.rec["loadavg_after"] = timing.load_average()
        if lv.rec["status"] == "ok":
            lv.rec["samples_s"] = [round(x, 6) for x in lv.samples]
            lv.rec["latency"] = timing.latency_stats(lv.samples, batch if cfg.scope == "model" else 1).to_dict()
            lv.rec["device_peak_mb"] = lv.runner.device_peak_mb() or lv.rec.get("device_peak_mb")
            if isinstance(lv.call, _StagedCall) and lv.call.stage_samples:
                lv.rec["stages_p50_s"] = stage_medians(lv.call.stage_samples)


def _export(cfg: BenchConfig, head: str, size: int, workdir: Path, clip) -> tuple:
    """Fused build (torch runners) + ONNX export of the same build; returns (build, onnx, manifest)."""
    from clipfuse.export.api import build_fused, write_image_graph
    from clipfuse.export.spec import ImageExportSpec
    from clipfuse.runtime.artifact import open_artifact

    spec = ImageExportSpec(method=head, model=cfg.model, pretrained=cfg.pretrained, classes=cfg.classes,
                           size=size, templates=cfg.templates, heads_checkpoint=cfg.heads_ckpt,
                           seed=cfg.seed)
    build = build_fused(spec, clip=clip)
    onnx_path = write_image_graph(build, workdir / f"{head}-{size}")
    return build, onnx_path, open_artifact(onnx_path, kinds=("image",)).manifest


@contextmanager
def _workdir(cfg: BenchConfig) -> Iterator[Path]:
    """cfg.workdir (kept), or a temporary folder removed afterwards."""
    if cfg.workdir:
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    tmp = tempfile.mkdtemp(prefix="clipfuse-bench-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_check(runner: Runner, name: str, probe: np.ndarray, reference_out: Optional[np.ndarray],
                  base: dict) -> Optional[np.ndarray]:
    """Same image through the reference and this backend; returns the reference's output once seen."""
    try:
        out = runner.infer(probe)
        if name == REFERENCE:
            reference_out = out
        elif reference_out is not None:
            base["max_abs_diff_vs_reference"] = float(np.max(np.abs(out.astype(np.float64) - reference_out)))
    except Exception as exc:
        base["max_abs_diff_vs_reference"] = f"{type(exc).__name__}: {exc}"
    base.setdefault("max_abs_diff_vs_reference", None)
    return reference_out


def _open_runners(cfg: BenchConfig, ctx: BenchContext, head: str, size: int, flops_total: int,
                  probe: np.ndarray, emit: Callable[[dict], None]) -> Tuple[Dict[str, Runner], Dict[str, dict]]:
    """Open every backend (unavailable ones are recorded as skipped) and check its output."""
    runners: Dict[str, Runner] = {}
    bases: Dict[str, dict] = {}
    reference_out = None
    for name in cfg.backends:
        base = {"head": head, "size": size, "backend": name, "scope": cfg.scope, "flops_per_image": flops_total}
        t_open = time.perf_counter()
        try:
            runner = open_runner(name, ctx)
        except Unavailable as exc:
            reason = str(exc)
            _say(f"[{head} {size}] {name}: skipped ({reason})")
            for batch in cfg.batches:
                emit(dict(base, batch=batch, status="skipped", reason=reason))
            continue
        base.update(label=runner.label, device=runner.device, precision=runner.precision,
                    setup_s=round(time.perf_counter() - t_open, 3))
        reference_out = _output_check(runner, name, probe, reference_out, base)
        runners[name], bases[name] = runner, base
    return runners, bases


def _measure_batch(cfg: BenchConfig, ctx: BenchContext, runners: Dict[str, Runner], bases: Dict[str, dict],
                   head: str, size: int, batch: int, images: np.ndarray, image_path: Optional[Path],
                   emit: Callable[[dict], None]) -> None:
    """Warm every runner up at `batch`, time them interleaved, emit one record per runner."""
    live: List[_Live] = []
    for name, runner in runners.items():
        try:
            call, sync, timer, rec = warm_up(runner, cfg, batch, images, ctx, image_path)
        except Exception as exc:  # e.g. torch.compile failing at its first call
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
            _say(f"[{head} {size}] {name} b{batch}: failed ({reason[:200]})")
            emit(dict(bases[name], batch=batch, status="failed", reason=reason))
            continue
        live.append(_Live(name, runner, dict(bases[name], batch=batch, **rec), call, sync, timer))
    measure_interleaved(live, cfg, batch)
    for lv in live:
        if lv.rec["status"] == "ok":
            lat = lv.rec["latency"]
            _say(f"[{head} {size}] {lv.name} b{batch}: p50 {lat['p50_s'] * 1e3:.1f} ms, "
                 f"{lat['images_per_s']:.2f} img/s ({lat['iters']} iters, load "
                 f"{(lv.rec['loadavg_before'] or ['?'])[0]})")
        else:
            _say(f"[{head} {size}] {lv.name} b{batch}: failed ({lv.rec['reason'][:200]})")
        emit(lv.rec)


def _bench_graph(cfg: BenchConfig, head: str, size: int, clip, shape: VitShape, rng: np.random.Generator,
                 workdir: Path, image_path: Optional[Path], emit: Callable[[dict], None]) -> None:
    """Export one (head, size) graph, then measure every backend at every batch size."""
    t0 = time.perf_counter()
    _say(f"[{head} {size}] exporting the graph")
    build, onnx_path, manifest = _export(cfg, head, size, workdir, clip)
    n_names = sum(len(c) for c in cfg.classes)
    flops = head_flops(head, shape, size, n_names, build.head_params)
    ctx = BenchContext(build=build, onnx_path=onnx_path, manifest=manifest, workdir=workdir,
                       threads=cfg.threads, torch_device=cfg.torch_device, max_batch=max(cfg.batches))
    _say(f"[{head} {size}] ready in {time.perf_counter() - t0:.0f} s; "
         f"{flops['total'] / 1e9:.1f} GFLOP per image")
    probe = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    runners, bases = _open_runners(cfg, ctx, head, size, flops["total"], probe, emit)
    try:
        for batch in cfg.batches:
            images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            _measure_batch(cfg, ctx, runners, bases, head, size, batch, images, image_path, emit)
    finally:
        for runner in runners.values():
            runner.close()
        runners.clear()
        gc.collect()
    if cfg.scope == "e2e":
        from .frame_e2e import bench_frame_graphs
        bench_frame_graphs(cfg, head, size, clip, workdir, image_path, flops["total"], emit, _say)


def _free_graphs(workdir: Path, head: str, size: int) -> None:
    """Free the disk: a ViT-B graph is ~350 MB (+ FP16 copy)."""
    for f in workdir.glob(f"{head}-{size}*"):
        if f.is_file():
            f.unlink()
        else:
            shutil.rmtree(f, ignore_errors=True)


def run_suite(cfg: BenchConfig, on_result: Callable[[dict], None]) -> List[dict]:
    """Run everything in `cfg`; `on_result(record)` is called after each measurement."""
    import torch

    from clipfuse.export.weights import load_clip

    torch.set_num_threads(cfg.threads)
    records: List[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        on_result(rec)

    with _workdir(cfg) as workdir:
        image_path = None
        if cfg.scope == "e2e":
            image_path = Path(cfg.image) if cfg.image else synthetic_jpeg(workdir / "bench-input.jpg")
        _say(f"loading {cfg.model} (pretrained: {cfg.pretrained})")
        clip = load_clip(cfg.model, cfg.pretrained, quick_gelu=cfg.quick_gelu, seed=cfg.seed)
        shape = VitShape.from_visual(clip.model.visual)
        rng = np.random.default_rng(cfg.seed)
        for size in cfg.sizes:
            for head in cfg.heads:
                _bench_graph(cfg, head, size, clip, shape, rng, workdir, image_path, emit)
                gc.collect()   # the build and its context are gone with _bench_graph's frame
                if not cfg.workdir:
                    _free_graphs(workdir, head, size)
    return records
