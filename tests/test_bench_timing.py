"""Timing loop, statistics and memory probes of clipfuse.benchmarks.timing."""
from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from clipfuse.benchmarks import timing


def test_latency_stats_against_hand_values():
    samples = [0.010, 0.020, 0.030, 0.040, 0.100]
    st = timing.latency_stats(samples, batch=4)
    assert st.iters == 5
    assert st.p50_s == pytest.approx(0.030)
    # linear interpolation: p90 at rank 3.6 -> 0.04 + 0.6 * 0.06; p99 at rank 3.96
    assert st.p90_s == pytest.approx(0.076)
    assert st.p99_s == pytest.approx(0.0976)
    assert st.mean_s == pytest.approx(0.040)
    assert st.min_s == 0.010 and st.max_s == 0.100
    assert st.images_per_s == pytest.approx(4 * 5 / 0.2)
    assert st.p50_s <= st.p90_s <= st.p99_s


def test_latency_stats_rejects_empty_or_nonpositive():
    with pytest.raises(ValueError):
        timing.latency_stats([], 1)
    with pytest.raises(ValueError):
        timing.latency_stats([0.1, 0.0], 1)


def test_time_calls_counts_warmup_syncs_and_measures_sleep():
    calls, syncs = [], []
    samples = timing.time_calls(lambda: (calls.append(1), time.sleep(0.01)), lambda: syncs.append(1),
                                warmup=2, iters=4)
    assert len(samples) == 4 and len(calls) == 6 and len(syncs) == 6
    assert all(0.009 < s < 0.5 for s in samples)


def test_time_calls_budget_stops_early_but_keeps_min_iters():
    samples = timing.time_calls(lambda: time.sleep(0.02), lambda: None, warmup=0, iters=100,
                                max_seconds=0.01, min_iters=3)
    assert len(samples) == 3


def test_host_peak_rss_sees_an_allocation_and_resets():
    if timing.host_peak_rss_mb() is None:
        pytest.skip("no /proc/self/status on this platform")
    if not timing.reset_host_peak():
        pytest.skip("/proc/self/clear_refs not writable: the peak cannot be reset here")
    before = timing.host_peak_rss_mb()
    # 64 MiB, touched, in its own mapping: freed memory goes back to the OS whatever malloc the
    # process runs (OpenVINO's TBB allocator, loaded by earlier tests, keeps freed heap blocks)
    block = mmap.mmap(-1, 64 * 2 ** 20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    peak = timing.host_peak_rss_mb()
    assert peak - before > 56
    block.close()
    assert timing.reset_host_peak()
    assert timing.host_peak_rss_mb() < peak - 56


def test_load_average_is_three_numbers():
    load = timing.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))


def test_cpu_matmul_peak_is_plausible():
    peak = timing.measure_matmul_peak("cpu", "float32", n=256, iters=3, warmup=1)
    assert peak["flops_per_s"] == pytest.approx(2 * 256 ** 3 / peak["seconds"])
    assert 1e8 < peak["flops_per_s"] < 1e13


def test_gpu_fp16_matmul_peak():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the device peak (one large FP16 matmul) is measured only on GPU machines")
    peak = timing.measure_matmul_peak("cuda", "float16", n=4096, iters=5)
    assert peak["flops_per_s"] > 1e12  # any tensor-core GPU does > 1 TFLOP/s in FP16
