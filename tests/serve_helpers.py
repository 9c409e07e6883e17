"""Shared pieces of the Triton serving tests: skip reason, free loopback ports, smooth images."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

import parity_inputs

LOOPBACK = "127.0.0.1"


def serve_deps_missing() -> str:
    """'' when nvidia-pytriton and tritonclient[http,grpc] import, else the exact reason."""
    try:
        import pytriton.triton  # noqa: F401
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return f"needs nvidia-pytriton and tritonclient[http,grpc] (pip install 'clipfuse[serve]'): {exc}"
    return ""


def free_ports(count: int) -> list:
    """`count` distinct free TCP ports on 127.0.0.1 (bound, read, released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Low-frequency RGB image: neighbouring patches look alike, as in photos (several classes win)."""
    return parity_inputs.smooth_image(height, width, seed, coarse=(4, 5), noise=0.0)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout_s} s")


def listening_addresses(port: int) -> set:
    """Local addresses with a LISTEN socket on `port` (from /proc/net/tcp{,6}); IPv4-mapped IPv6
    addresses (::ffff:127.0.0.1, how gRPC binds) are given as IPv4."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, prt = fields[1].split(":")
            if int(prt, 16) == port and fields[3] == "0A":
                if len(addr) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    text = socket.inet_ntop(socket.AF_INET6, raw)
                    found.add(text[7:] if text.startswith("::ffff:") and "." in text else text)
    return found


_EXPORTED: dict = {}


def tiny_sclip(root) -> "Path":
    """The tiny-ViT SCLIP graph (4 classes), exported once per test session under `root`."""
    if "sclip" not in _EXPORTED:
        from clipfuse.export.api import ImageExportSpec, export_image_graph
        spec = ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                               classes=[["background"], ["cat"], ["dog"], ["grass"]], templates="single", seed=0)
        _EXPORTED["sclip"] = Path(export_image_graph(spec, Path(root) / "serve_tiny" / "sclip"))
    return _EXPORTED["sclip"]


FRAME = (120, 160)  # H, W of the tiny frame graph


def tiny_sclip_frame(root) -> "Path":
    """The same tiny SCLIP as a frame graph for FRAME-sized images (protocol inside the graph)."""
    if "sclip_frame" not in _EXPORTED:
        from clipfuse.export.api import ImageExportSpec, export_image_graph
        _EXPORTED["sclip_frame"] = Path(export_image_graph(
            ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                            classes=[["background"], ["cat"], ["dog"], ["grass"]], templates="single", seed=0,
                            frame=FRAME),
            Path(root) / "serve_tiny" / "sclip_frame"))
    return _EXPORTED["sclip_frame"]


def concurrently(call: Callable[[int], object], n: int, timeout: float = 120.0) -> list:
    """[call(0), ..., call(n-1)], each in its own thread, all released at once (a barrier) so the
    server sees them together; fails if any did not finish in `timeout` seconds."""
    import threading
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert all(r is not None for r in results), "a concurrent client did not finish"
    return results


class CliServer:
    """`clipfuse serve` in a subprocess with its own TMPDIR; `leftovers()` lists what survived."""

    def __init__(self, artifact, tmp_path, *extra: str, max_pixels: int = 1200 * 1200) -> None:
        self.ports = free_ports(3)
        tmp_path.mkdir(parents=True, exist_ok=True)
        # short: multiprocessing puts AF_UNIX sockets (108-byte paths) under TMPDIR
        self.base = Path(tempfile.mkdtemp(prefix="cfs", dir="/tmp"))
        self.tmpdir = self.base / "t"
        self.tmpdir.mkdir()
        self.log_path = tmp_path / "serve.log"
        self.log = open(self.log_path, "wb")
        self.home = self.base / "h"     # PyTriton's workspaces (and their sockets) go here
        self.home.mkdir()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(self.tmpdir), PYTRITON_HOME=str(self.home))
        cmd = [sys.executable, "-m", "clipfuse.runtime.cli", "serve", f"tiny={artifact}",
               "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
               "--metrics-port", str(self.ports[2]), "--threads", "1", "--max-pixels", str(max_pixels), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.children: set = set()
        self.shm: set = set()

    def wait_ready(self, timeout: float = 120) -> "CliServer":
        wait_until(lambda: self.ready(), timeout, "clipfuse serve ready")
        self.snapshot()
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            _fail(f"server exited early:\n{self.text()[-3000:]}")
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports[0]}/v2/models/tiny/ready", timeout=2) as r:
            return r.status == 200

    def snapshot(self) -> None:
        from clipfuse.runtime.serve.server import _descendants, _shm_mapped
        pids = _descendants(self.proc.pid)
        self.children |= pids
        for pid in pids | {self.proc.pid}:
            self.shm |= _shm_mapped(pid)

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def leftovers(self) -> dict:
        alive = {p for p in self.children if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z"}
        # `.ses`: a 51-byte session-id file the inference library writes under TMPDIR when a
        # session opens (`clipfuse run` writes it too); reused, not a server resource
        tmp = [p for p in self.tmpdir.iterdir() if p.name != ".ses"] + list(self.home.iterdir())
        return {"processes": sorted(_describe(p) for p in alive), "shm": sorted(p for p in self.shm if os.path.exists(p)),
                "tmp": sorted(str(p) for p in tmp)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)




def _describe(pid: int) -> str:
    """`pid: command line`, so a leftover process in a CI log says what it was."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return f"{pid}: (exited)"


def _fail(message: str) -> None:
    import pytest
    pytest.fail(message)


def rss_kb(pids, field: str = "VmRSS") -> int:
    """Sum of `field` (VmRSS, RssAnon, RssShmem; kB) of the live processes among `pids`."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total
