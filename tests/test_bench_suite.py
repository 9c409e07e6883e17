"""Interleaved measurement rounds and backend-set parsing (no model needed)."""
from __future__ import annotations

import time

import pytest

from clipfuse.benchmarks.backends import CPU_SET, REFERENCE, parse_backends
from clipfuse.benchmarks.suite import BenchConfig, _Live, measure_interleaved
from clipfuse.runtime.errors import ClipfuseError


class _FakeRunner:
    def __init__(self, log, name, seconds, fail_at=None):
        self.log, self.name, self.seconds, self.fail_at, self.calls = log, name, seconds, fail_at, 0

    def call(self):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("device lost")
        self.log.append(self.name)
        time.sleep(self.seconds)

    def sync(self):
        pass

    def device_peak_mb(self):
        return None


def _live(runner):
    return _Live(runner.name, runner, {"status": "ok"}, runner.call, runner.sync, None)


def test_rounds_interleave_with_rotating_start_and_survive_a_failure():
    log = []
    a, b, c = (_FakeRunner(log, "a", 0.002), _FakeRunner(log, "b", 0.006),
               _FakeRunner(log, "c", 0.001, fail_at=2))
    live = [_live(a), _live(b), _live(c)]
    measure_interleaved(live, BenchConfig(heads=["sclip"], iters=4, max_seconds=None), batch=2)
    # round 0: a b c; round 1 starts at b (c fails there); rounds 2, 3 rotate over a, b
    assert log == ["a", "b", "c", "b", "a", "a", "b", "b", "a"]
    ra, rb, rc = (lv.rec for lv in live)
    assert ra["status"] == rb["status"] == "ok" and rc["status"] == "failed" and "device lost" in rc["reason"]
    assert ra["latency"]["iters"] == rb["latency"]["iters"] == 4 and "latency" not in rc
    assert ra["latency"]["p50_s"] < rb["latency"]["p50_s"]   # 2 ms vs 6 ms sleeps, measured per backend
    assert rb["latency"]["p50_s"] >= 0.006
    assert ra["latency"]["images_per_s"] == pytest.approx(2 * 4 / sum(ra["samples_s"]), rel=1e-3)


def test_time_cap_is_per_backend_and_keeps_min_iters():
    log = []
    live = [_live(_FakeRunner(log, "a", 0.01)), _live(_FakeRunner(log, "b", 0.01))]
    measure_interleaved(live, BenchConfig(heads=["sclip"], iters=50, max_seconds=0.001, min_iters=3), batch=1)
    assert [lv.rec["latency"]["iters"] for lv in live] == [3, 3]


def test_parse_backends_sets_order_and_errors():
    assert parse_backends("cpu") == list(CPU_SET)
    assert parse_backends("ort-cpu-fp32,torch-ref")[0] == REFERENCE
    assert parse_backends("torch-fused,torch-fused") == ["torch-fused"]
    with pytest.raises(ClipfuseError):
        parse_backends("ort-gpu")
    with pytest.raises(ClipfuseError):
        parse_backends(" , ")
