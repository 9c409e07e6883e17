"""Shared pieces of the Triton serving tests: skip reason, free loopback ports, smooth images."""
from __future__ import annotations

import socket
from pathlib import Path
import time
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
