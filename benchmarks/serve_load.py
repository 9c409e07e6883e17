"""Load test of `clipfuse serve`: concurrent tritonclient clients against an in-process server."""
from __future__ import annotations

import datetime as _dt
import json
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .report import LOAD_CAVEAT, git_info, load_average, machine_info


@dataclass
class LoadConfig:
    artifact: str
    clients: int = 8
    requests: int = 25
    size: Tuple[int, int] = (480, 640)
    protocol: str = "http"
    instances: int = 1
    max_batch_size: int = 8
    queue_delay_us: int = 2000
    window_batch: Optional[int] = None
    backend: str = "auto"
    threads: Optional[int] = None
    baseline_requests: int = 5


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Low-frequency RGB test image (bilinear upsampling of a 4 x 5 random grid)."""
    from clipfuse.runtime.protocol import resize_image
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return resize_image(coarse, (height, width))


def _percentiles(samples: List[float]) -> dict:
    a = np.asarray(samples) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(a.size)}


def _client(protocol: str, port: int):
    # No client-side timeouts that a slow (ViT-B on 2 shared cores) batch could hit: the HTTP
    # client's default network timeout is 60 s.
    if protocol == "grpc":
        import tritonclient.grpc as mod
        return mod, mod.InferenceServerClient(f"127.0.0.1:{port}")
    import tritonclient.http as mod
    return mod, mod.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=120.0, network_timeout=3600.0)


def run_load_test(cfg: LoadConfig) -> dict:
    from clipfuse.runtime import Segmenter
    from clipfuse.runtime.serve.server import ClipfuseTriton, ServeOptions

    image = smooth_image(*cfg.size)
    backend_options = {"threads": cfg.threads} if cfg.threads else {}
    with Segmenter.open(cfg.artifact, backend=cfg.backend, batch=cfg.window_batch,
                        backend_options=backend_options) as seg:
        reference = seg.segment(image)
        baseline = []
        for _ in range(cfg.baseline_requests):
            t0 = time.perf_counter()
            seg.segment(image)
            baseline.append(time.perf_counter() - t0)

    http, grpc, metrics = _free_ports(3)
    options = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, instances=cfg.instances,
                           max_batch_size=cfg.max_batch_size, queue_delay_us=cfg.queue_delay_us,
                           window_batch=cfg.window_batch, backend=cfg.backend, threads=cfg.threads,
                           exit_timeout_s=15)
    port = grpc if cfg.protocol == "grpc" else http
    load_before = load_average()
    server = ClipfuseTriton([f"model={cfg.artifact}"], options).start()
    latencies: List[List[float]] = [[] for _ in range(cfg.clients)]
    mismatches = [0] * cfg.clients
    errors: List[str] = []
    try:
        barrier = threading.Barrier(cfg.clients + 1)

        def client(i: int) -> None:
            mod, c = _client(cfg.protocol, port)
            try:
                x = mod.InferInput("image", [1, *image.shape], "UINT8")
                x.set_data_from_numpy(image[None])
                c.infer("model", [x])  # warm-up: connection, first batch
                barrier.wait()
                for _ in range(cfg.requests):
                    t0 = time.perf_counter()
                    labels = c.infer("model", [x]).as_numpy("labels")[0]
                    latencies[i].append(time.perf_counter() - t0)
                    mismatches[i] += int(not np.array_equal(labels, reference.labels))
            except Exception as exc:  # recorded, the report says so
                errors.append(f"client {i}: {type(exc).__name__}: {exc}")
                barrier.abort()
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(cfg.clients)]
        for t in threads:
            t.start()
        try:
            barrier.wait()  # every client has had its warm-up answer
        except threading.BrokenBarrierError:
            pass  # a client failed; its error is in `errors` and the report
        history_start = len(server.models["model"].history)
        t_start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        batches = server.models["model"].history[history_start:] if not errors else []
    finally:
        server.stop()
    samples = [s for per in latencies for s in per]
    done = len(samples)
    doc = {
        "schema": "clipfuse-serve-load/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "machine": machine_info(cfg.threads or 0),
        "versions_serve": _serve_versions(),
        "git": git_info(),
        "load_average": {"before": load_before, "after": load_average()},
        "image": {"size": list(cfg.size), "windows": reference.num_windows,
                  "processing_size": list(reference.processing_size)},
        "results": {
            "requests": done, "wall_s": wall, "throughput_rps": done / wall if wall else None,
            "latency": _percentiles(samples) if samples else None,
            "baseline_no_server": {**_percentiles(baseline), "throughput_rps": 1.0 / float(np.mean(baseline))},
            "labels_mismatch": int(sum(mismatches)), "errors": errors,
            "server_batches": {
                "executions": len(batches),
                "mean_images_per_execution": float(np.mean([b.images for b in batches])) if batches else None,
                "max_images_per_execution": max((b.images for b in batches), default=None),
                "mean_windows_per_backend_call": (float(sum(b.windows for b in batches)
                                                        / sum(b.backend_calls for b in batches))
                                                  if batches else None),
            },
        },
        "caveats": [LOAD_CAVEAT],
    }
    return doc


def _serve_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("nvidia-pytriton", "tritonclient", "numpy", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["tritonserver"] = "2.51 (bundled with nvidia-pytriton 0.7)"
    return out


def write_report(doc: dict, out: Optional[str]) -> str:
    cfg, res, mach = doc["config"], doc["results"], doc["machine"]
    lat, base, bat = res["latency"] or {}, res["baseline_no_server"], res["server_batches"]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions_serve"].items())
    lines = [
        f"# clipfuse serve load test: {Path(cfg['artifact']).name}",
        "",
        f"- Machine: {mach['cpu_model']}, {mach['cpu_count']} logical CPUs, GPU: {mach.get('gpu') or 'none'}; "
        f"{mach['platform']}",
        f"- Versions: {versions}",
        f"- Commit {doc['git'].get('commit')}{' (+ uncommitted changes)' if doc['git'].get('dirty') else ''}; "
        f"created {doc['created']}; load average before/after {doc['load_average']['before']} / "
        f"{doc['load_average']['after']}",
        f"- Load: {cfg['clients']} clients x {cfg['requests']} requests over {cfg['protocol'].upper()}, image "
        f"{cfg['size'][0]}x{cfg['size'][1]} ({doc['image']['windows']} windows of the protocol), "
        f"{cfg['instances']} instance(s), max batch {cfg['max_batch_size']} images, queue delay "
        f"{cfg['queue_delay_us']} us, backend {cfg['backend']}",
        "",
        f"**Caveat.** {doc['caveats'][0]}",
        "",
        "| setup | requests | throughput req/s | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|---|---|",
    ]
    if lat:
        lines.append(f"| clipfuse serve, {cfg['clients']} concurrent clients | {res['requests']} | "
                     f"{res['throughput_rps']:.2f} | {lat['p50_ms']:.1f} | {lat['p90_ms']:.1f} | "
                     f"{lat['p99_ms']:.1f} | {lat['mean_ms']:.1f} |")
    lines.append(f"| Segmenter in-process, one at a time (baseline) | {base['n']} | {base['throughput_rps']:.2f} | "
                 f"{base['p50_ms']:.1f} | {base['p90_ms']:.1f} | {base['p99_ms']:.1f} | {base['mean_ms']:.1f} |")
    lines += ["",
              f"Server batching: {bat['executions']} model executions, "
              f"{bat['mean_images_per_execution'] or 0:.2f} images per execution on average "
              f"(max {bat['max_images_per_execution']}), {bat['mean_windows_per_backend_call'] or 0:.1f} windows "
              f"per backend call. Responses differing from the local labels: {res['labels_mismatch']}. "
              f"Errors: {len(res['errors'])}.", ""]
    text = "\n".join(lines)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        Path(f"{out}.md").write_text(text, encoding="utf-8")
    return text
