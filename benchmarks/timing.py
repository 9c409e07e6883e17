"""Timing loop, latency statistics and memory probes.

Every timed call ends with the runner's synchronisation (CUDA stream/device sync on GPU), so a
latency is the time until the result exists, not until the launch returned. On GPU a torch runner
may time with CUDA events instead (`Runner.event_timer`). Warm-up calls are run and discarded.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class LatencyStats:
    """Seconds per call; images_per_s = images timed / seconds spent (not 1 / p50)."""
    iters: int
    mean_s: float
    std_s: float
    min_s: float
    max_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(samples: Sequence[float], batch: int) -> LatencyStats:
    """Percentiles by linear interpolation (numpy's default), so p50 <= p90 <= p99 always."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0 or np.any(arr <= 0):
        raise ValueError("latency samples must be a non-empty list of positive seconds")
    p50, p90, p99 = (float(np.percentile(arr, q)) for q in PERCENTILES)
    return LatencyStats(iters=int(arr.size), mean_s=float(arr.mean()), std_s=float(arr.std()),
                        min_s=float(arr.min()), max_s=float(arr.max()), p50_s=p50, p90_s=p90, p99_s=p99,
                        images_per_s=float(batch * arr.size / arr.sum()))


def time_calls(call: Callable[[], object], sync: Callable[[], None], warmup: int, iters: int,
               max_seconds: Optional[float] = None, min_iters: int = 3,
               event_timer: Optional[Callable[[Callable[[], object]], float]] = None) -> List[float]:
    """Run `call` `warmup` times untimed, then up to `iters` timed times (seconds each).

    `max_seconds` caps the timed phase (at least `min_iters` calls still run): on a slow or shared
    machine a fixed count of large calls can take far longer than the numbers are worth.
    `event_timer(call) -> seconds` replaces the wall clock (CUDA events around the call).
    """
    for _ in range(max(0, warmup)):
        call()
        sync()
    samples: List[float] = []
    started = time.perf_counter()
    for _ in range(max(1, iters)):
        samples.append(timed_call(call, sync, event_timer))
        if (max_seconds is not None and len(samples) >= min_iters
                and time.perf_counter() - started > max_seconds):
            break
    return samples


def timed_call(call: Callable[[], object], sync: Callable[[], None],
               event_timer: Optional[Callable[[Callable[[], object]], float]] = None) -> float:
    """Seconds of one call until its result exists (synchronised), or by `event_timer`."""
    if event_timer is not None:
        return event_timer(call)
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0


def torch_cuda_event_timer(torch) -> Callable[[Callable[[], object]], float]:
    """CUDA-event timing of one call on the current stream (seconds)."""
    def timer(call: Callable[[], object]) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return timer


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def host_rss_mb() -> Optional[float]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def host_peak_rss_mb() -> Optional[float]:
    """Peak resident set size of this process (VmHWM) since start or the last reset."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def reset_host_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if not possible,
    in which case the peak is the process-lifetime peak."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Device peak (GPU): the floor each result is compared with
# ---------------------------------------------------------------------------------------------
def measure_matmul_peak(device: str = "cpu", dtype: str = "float32", n: Optional[int] = None,
                        iters: int = 10, warmup: int = 3) -> dict:
    """Achieved FLOP/s of one large square matmul (2 n^3 FLOPs), the practical compute peak.

    GPU: FP16 n=8192 (tensor cores; what FP16 engines run on). CPU: FP32 n=2048 with torch's
    threads (the precision the CPU backends compute in). Returns {flops_per_s, n, dtype, device,
    seconds (median)}.
    """
    import torch
    torch_dtype = getattr(torch, dtype)
    if n is None:
        n = 8192 if device.startswith("cuda") else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
    on_gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    timer = torch_cuda_event_timer(torch) if on_gpu else None
    with torch.inference_mode():
        samples = time_calls(lambda: torch.matmul(a, b), sync, warmup, iters, event_timer=timer)
    best = float(np.min(samples))  # a peak is the best the device did, not its typical (shared) state
    library = "torch"
    if not on_gpu:  # numpy's BLAS is sometimes the faster CPU GEMM: the floor is the best one available
        an, bn = a.numpy(), b.numpy()
        np_best = float(np.min(time_calls(lambda: an @ bn, lambda: None, warmup, iters)))
        if np_best < best:
            best, library = np_best, "numpy"
    return {"flops_per_s": 2.0 * n ** 3 / best, "n": n, "dtype": dtype, "device": device, "seconds": best,
            "median_seconds": float(np.median(samples)), "threads": torch.get_num_threads(), "library": library}
