"""`clipfuse serve`: one Triton Inference Server (nvidia-pytriton) serving clipfuse artifacts.

Each artifact becomes one Triton model with dynamic batching:
  input  image       uint8   [-1, -1, 3]   (+ Triton's batch axis: send [1, H, W, 3])
  output labels      int32   [-1, -1]      class index per pixel (names in the config)
         confidence  float32 [-1, -1]      the winning class's score (see labels_and_confidence)
  config parameters  clipfuse_classes, clipfuse_protocol, clipfuse_kind, clipfuse_window, ...
Triton batches concurrent requests of equal image shape (its rule for non-ragged inputs); one
model instance then puts all their windows through the backend together (core.segment_batch).

Traps handled here rather than left to users:
- PyTriton binds every endpoint to 0.0.0.0 by default; ServeOptions.host defaults to 127.0.0.1.
- Triton's Python-backend stub links the libpython3.X it finds on the loader path; where that is
  another build of 3.X than the running interpreter, model loading dies with
  "'_thread.RLock' object has no attribute '_recursion_count'" (docs/serving.md#serving-one-machine). The running
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH before the server starts.
- SIGTERM (docker stop, Kubernetes) becomes PyTriton's orderly stop: Triton stops taking new
  requests and waits up to exit_timeout_s for the ones in flight.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..segmenter import Segmenter
from .core import (DEFAULT_MAX_PIXELS, INPUT, OUTPUTS, BatchStats, check_images, model_parameters,
                   segment_batch)

LOG = logging.getLogger("clipfuse.serve")
SERVED_KINDS = ("image", "frame")  # window graphs (protocol here) and frame graphs (protocol inside)

# PyTriton 0.7's proxy: instance 0 of a model binds a unix socket and only then listens on it; the
# other instances connect as soon as the file exists. One that connects in between gets
# ECONNREFUSED (one that finds no file within 1 s, a timeout) and Triton fails the whole model.
# Seen with --instances >= 2 on loaded 2-core machines (1 start in 8 with 4 instances and the
# cores busy). Nothing outside PyTriton can close that gap, so a start that failed this way is
# retried with a fresh server; any other start failure is reported at once.
HANDSHAKE_RACE = "get_config_from_handshake_server"
START_ATTEMPTS = 3


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1             # model instances (threads) per artifact
    max_batch_size: int = 8        # images per Triton batch (dynamic batcher)
    queue_delay_us: int = 2000     # how long Triton waits to fill a batch
    window_batch: Optional[int] = None  # windows per backend call; None: the backend's max
    backend: str = "auto"
    threads: Optional[int] = None  # ONNX Runtime intra-op threads
    max_pixels: int = DEFAULT_MAX_PIXELS
    exit_timeout_s: int = 30       # drain time on SIGTERM / stop
    log_verbose: int = 0
    verify: bool = True


def python_libdir_first(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Put the running interpreter's LIBDIR first on LD_LIBRARY_PATH (in place; returned).

    Triton's Python-backend stub then links the same libpython as this interpreter instead of
    whichever libpython3.X the system loader finds first.
    """
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return env


def _pytriton_libs_on_path(env: Optional[Dict[str, str]] = None) -> None:
    """Add the wheel's bundled libraries (nvidia_pytriton.libs, beside the package) to
    LD_LIBRARY_PATH. PyTriton adds them itself only when its package lies in one of the running
    interpreter's site-packages; in a venv layered on another one (--system-site-packages, .pth)
    it takes itself for an editable install and tritonserver cannot load libcudart."""
    env = os.environ if env is None else env
    try:
        import pytriton
    except ImportError:
        return
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libs.is_dir() and str(libs) not in parts:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(parts + [str(libs)])


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
# A model name is a folder name in Triton's repository and a URL path segment: plain characters,
# starting with a letter or digit (no '.', '..', hidden or option-like names), bounded length.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_model_name(name: str, spec: str = "") -> str:
    """`name` if it is a safe Triton model name, else one ClipfuseError line."""
    from ..limits import MODEL_NAME_CHARS

    if len(name) > MODEL_NAME_CHARS.value:
        raise MODEL_NAME_CHARS.exceeded(len(name), f"model name of {spec or name!r}")
    if not _NAME_RE.fullmatch(name):
        raise ClipfuseError(f"model name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
                            "and start with a letter or digit")
    return name


def parse_artifacts(specs: Sequence[str]) -> List[Tuple[str, Path]]:
    """`PATH` or `NAME=PATH` -> [(model name, path)]; the name defaults to the file's stem.

    An explicit NAME is checked as given (it becomes a folder: `..` would write outside the
    repository); a stem is made safe (odd characters -> '_') and then checked the same way."""
    out: List[Tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = _NAME_OK.sub("_", Path(spec).stem).strip("_.-"), spec
            if not name:
                raise ClipfuseError(f"cannot derive a model name from {spec!r}; use NAME=PATH")
        check_model_name(name, spec)
        if any(name == n for n, _ in out):
            raise ClipfuseError(f"two artifacts would be served as model {name!r}; name them with NAME=PATH")
        out.append((name, Path(path)))
    return out


class ServedModel:
    """One artifact behind a Triton model: a Segmenter and the batch function PyTriton calls.

    Dispatch on the manifest's kind: window graphs (kind "image") run the protocol here with
    windows batched across requests; frame graphs (kind "frame", protocol inside the graph) take
    the frames of concurrent requests in one graph call, up to the window batch, and accept only
    images of their frame size.
    """

    def __init__(self, name: str, artifact: Path, options: ServeOptions) -> None:
        backend_options = {"threads": options.threads} if options.threads else {}
        self.name = name
        self.segmenter = Segmenter.open(artifact, backend=options.backend, batch=options.window_batch,
                                        backend_options=backend_options, verify=options.verify)
        kind = self.segmenter.meta.kind
        if kind not in SERVED_KINDS:
            raise ClipfuseError(f"{artifact.name}: kind {kind!r} cannot be served (window or frame graphs only)")
        if self.segmenter.dynamic_vocab:
            raise ClipfuseError(f"{artifact.name} has a dynamic vocabulary; serve a graph with baked "
                                "classes (clipfuse export --vocab baked)")
        self.options = options
        self.parameters = model_parameters(self.segmenter.meta, self.segmenter.protocol, artifact.name)
        self.lock = threading.Lock()
        self.history: List[BatchStats] = []   # bounded: the last 1000 batches

    def infer(self, requests: list) -> List[Dict[str, np.ndarray]]:
        """PyTriton infer function: a list of requests (each image [n, H, W, 3]) -> responses."""
        arrays = [np.asarray(req[INPUT]) for req in requests]
        for arr in arrays:
            check_images(arr, self.options.max_pixels)
        images = [img for arr in arrays for img in arr]
        if self.segmenter.frame_size is not None:
            results, stats = self._frames(images)
        else:
            results, stats = segment_batch(images, self.segmenter.infer_windows, self.segmenter.protocol,
                                           self.segmenter.window, self.segmenter.batch)
        with self.lock:
            self.history = (self.history + [stats])[-1000:]
        responses, start = [], 0
        for arr in arrays:
            chunk = results[start:start + len(arr)]
            start += len(arr)
            responses.append({OUTPUTS[0]: np.stack([r[0] for r in chunk]),
                              OUTPUTS[1]: np.stack([r[1] for r in chunk])})
        return responses

    def _frames(self, images: List[np.ndarray]) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], BatchStats]:
        """Frame graph: all requests' frames through the graph, `segmenter.batch` frames a call."""
        frames = np.stack(images) if len({img.shape for img in images}) == 1 else None
        if frames is None:
            raise ClipfuseError("frames of one batch differ in size")
        step = self.segmenter.batch or len(frames)
        results: List[Tuple[np.ndarray, np.ndarray]] = []
        for i in range(0, len(frames), step):
            out = self.segmenter.segment_frames(frames[i:i + step])
            results.extend(zip(out["labels"], out["confidence"]))
        calls = -(-len(frames) // step)
        return results, BatchStats(images=len(frames), windows=len(frames), backend_calls=calls,
                                   largest_call=min(step, len(frames)))

    def close(self) -> None:
        self.segmenter.close()


def _import_pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ClipfuseError(f"serving needs nvidia-pytriton: pip install 'clipfuse[serve]' ({exc})") from None
    return Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor


def _as_triton_error(infer: Callable) -> Callable:
    """Bad input -> a PyTriton error (the client gets a Triton error; the server goes on)."""
    from pytriton.exceptions import PyTritonBadParameterError

    def wrapped(requests):
        try:
            return infer(requests)
        except ClipfuseError as exc:
            raise PyTritonBadParameterError(str(exc)) from None
        except MemoryError:
            LOG.error("out of memory in a batch of %d request(s)", len(requests))
            raise PyTritonBadParameterError("the server has not enough memory for this request now; "
                                            "retry, or send a smaller image") from None
    return wrapped


class ClipfuseTriton:
    """The server: `start()` (returns once models are ready), `serve_forever()`, `stop()`.

    Layout: tritonserver listens on private loopback ports; the public HTTP and gRPC endpoints are
    the front (front.py), which checks request shapes against the limits, drains on SIGTERM and
    keeps errors to one line. Metrics are Triton's own endpoint. What the server creates (PyTriton's
    workspace, child processes, the /dev/shm segments they map) is removed by `stop()`.
    """

    def __init__(self, artifacts: Sequence[str], options: Optional[ServeOptions] = None) -> None:
        from .front import split_ports

        self.options = options or ServeOptions()
        _import_pytriton()  # before any work: the install hint when PyTriton is missing
        python_libdir_first()
        _pytriton_libs_on_path()
        o = self.options
        if o.instances < 1 or o.max_batch_size < 1:
            raise ClipfuseError("--instances and --max-batch-size must be >= 1")
        _check_bounds(o)
        split_ports(o.host, o.http_port, o.grpc_port, o.metrics_port)
        for what, port in (("HTTP", o.http_port), ("gRPC", o.grpc_port), ("metrics", o.metrics_port)):
            _check_port_free(o.host, port, what)
        self._front = None
        self._stopped = False
        self._shm: set = set()
        self._children: set = set()
        # children and shared memory the embedding process had before the server: not ours
        self._foreign: set = _descendants(os.getpid())
        self._foreign_shm: set = _shm_mapped(os.getpid())
        self.models: Dict[str, ServedModel] = {}
        specs = parse_artifacts(artifacts)
        try:
            for name, path in specs:
                self.models[name] = ServedModel(name, path, o)
            self._new_triton()
        except BaseException:
            self._cleanup()
            raise

    def _new_triton(self) -> None:
        """`self.triton`: a PyTriton server (not started) with every model bound, on fresh private
        ports. Set before binding, so that _cleanup finds its workspace if binding fails."""
        Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor = _import_pytriton()
        o = self.options
        self._backend_http, self._backend_grpc = _free_loopback_ports(
            2, avoid={o.http_port, o.grpc_port, o.metrics_port})
        config = TritonConfig(http_address="127.0.0.1", grpc_address="127.0.0.1", metrics_address=o.host,
                              http_port=self._backend_http, grpc_port=self._backend_grpc,
                              metrics_port=o.metrics_port, exit_timeout_secs=o.exit_timeout_s,
                              log_verbose=o.log_verbose, strict_readiness=True)
        # PyTriton's own workspace (its binary finds its libraries relative to PYTRITON_HOME);
        # removed in _cleanup also when the server does not stop cleanly
        triton = self.triton = Triton(config=config)
        for name, model in self.models.items():
            triton.bind(
                model_name=name,
                # one wrapper per instance: PyTriton keys its per-instance state by function
                infer_func=[_as_triton_error(model.infer) for _ in range(o.instances)],
                inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=(-1, -1, 3))],
                outputs=[Tensor(name=OUTPUTS[0], dtype=np.int32, shape=(-1, -1)),
                         Tensor(name=OUTPUTS[1], dtype=np.float32, shape=(-1, -1))],
                config=ModelConfig(max_batch_size=o.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=o.queue_delay_us)),
                strict=True,
            )
            _add_config_parameters(triton, name, model.parameters)

    @property
    def access_token(self) -> Optional[str]:
        """Token for the endpoints PyTriton protects (statistics, repository control)."""
        return self.triton.get_access_token()

    def start(self) -> "ClipfuseTriton":
        """Start tritonserver, wait until its models are ready, then open the public endpoints.
        Anything that interrupts this (SIGTERM before ready included) stops what was started."""
        from .front import Front, RequestBounds

        o = self.options
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self.triton.run()
                    break
                except Exception as exc:  # PyTriton's startup errors are timeouts and its own types
                    logs = _server_logs(self.triton)
                    if attempt < START_ATTEMPTS and lost_handshake_race(logs):
                        LOG.warning("Triton start %d/%d: a model instance lost PyTriton's start-up "
                                    "handshake race; starting again", attempt, START_ATTEMPTS)
                        self._discard_triton()
                        self._new_triton()
                        continue
                    reason = load_failure(logs) or f"{type(exc).__name__}: {one_line_error(exc)}"
                    tries = (f" after {attempt} attempts (PyTriton's instance start-up race; "
                             "--instances 1 avoids it)") if attempt > 1 else ""
                    raise ClipfuseError(f"Triton did not start: {reason}{tries} "
                                        "(--log-verbose 1 shows the server's log)") from None
            self._remember_resources()
            self._front = Front(o.host, o.http_port, o.grpc_port, self._backend_http, self._backend_grpc,
                                RequestBounds(max_pixels=o.max_pixels, max_batch=o.max_batch_size)).start()
        except BaseException:
            self.stop()
            raise
        return self

    def serve_forever(self) -> int:
        """Block until SIGTERM/SIGINT or tritonserver's death; drain, stop, clean up.

        Returns the exit code: 0 after a signal when every in-flight request finished within the
        drain timeout, 1 when requests were cut off, 2 when tritonserver or a model died."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            tick = 0
            while not stop.wait(0.5):
                if not self.triton.is_alive():
                    LOG.error("tritonserver or a model backend stopped")
                    code = 2
                    break
                tick += 1
                if tick % 10 == 0:
                    self._remember_resources()
            if code == 0:
                drained = self._front.drain(self.options.exit_timeout_s) if self._front else True
                code = 0 if drained else 1
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._front is not None:
                self._front.gate.draining = True
            self._remember_resources()
            self._stop_triton()
            if self._front is not None:
                self._front.close()
        finally:
            self.close()
            self._cleanup()

    def _stop_triton(self) -> None:
        try:
            self.triton.stop()
        except Exception as exc:  # a dead server cannot be stopped cleanly; clean up anyway
            LOG.warning("stopping Triton: %s", one_line_error(exc))

    def _discard_triton(self) -> None:
        """Stop a server that failed to start and remove what it left (processes, /dev/shm,
        workspace); the models stay open for the next attempt."""
        self._remember_resources()
        self._stop_triton()
        self._cleanup()
        self._children.clear()
        self._shm.clear()

    def close(self) -> None:
        for model in self.models.values():
            model.close()

    def _remember_resources(self) -> None:
        """Note our child processes and the /dev/shm segments they (or we) map, so stop() can
        remove exactly those: other servers on the machine keep theirs."""
        pids = {p for p in _descendants(os.getpid()) - self._foreign if not _is_resource_tracker(p)}
        self._children |= pids
        for pid in pids | {os.getpid()}:
            self._shm |= _shm_mapped(pid) - self._foreign_shm

    def _cleanup(self) -> None:
        import shutil

        self._remember_resources()
        alive = {p for p in self._children if _alive(p)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            end = time.monotonic() + 5
            while alive and time.monotonic() < end:
                time.sleep(0.1)
                alive = {p for p in alive if _alive(p)}
            if not alive:
                break
        for path in self._shm:
            try:
                os.unlink(path)
            except OSError:
                pass
        # PyTriton's workspace (model store, sockets, a copy of tritonserver): its stop() removes
        # it, but not when start-up was interrupted or the server died
        workspace = getattr(getattr(self, "triton", None), "_workspace", None)
        if workspace is not None and getattr(workspace, "path", None) is not None:
            shutil.rmtree(workspace.path, ignore_errors=True)

    def __enter__(self) -> "ClipfuseTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def lost_handshake_race(logs: str) -> bool:
    """Whether every model instance that failed in `logs` failed in PyTriton's config handshake.
    An instance 0 that failed for a reason of its own also makes the others time out there;
    starting again would fail the same way, so that is not a lost race."""
    failed = [ln for ln in logs.splitlines() if "Failed to initialize Python stub" in ln]
    return bool(failed) and all(HANDSHAKE_RACE in ln for ln in failed)


def _server_logs(triton) -> str:
    """What tritonserver printed so far ("" where PyTriton does not keep it)."""
    server = getattr(triton, "_triton_server", None)
    try:
        return server.logs() if server is not None else ""
    except Exception:  # a PyTriton without logs(): no diagnosis, the generic error stays
        return ""


_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*)")


def load_failure(logs: str) -> Optional[str]:
    """The first model-load failure in Triton's log as one line ("model 'x' failed to load:
    ValueError: ..."), the exception without the stub's traceback; None when there is none."""
    from .front import one_line

    found = _LOAD_FAILED.search(logs)
    if found is None:
        return None
    name, text = found.group(1), found.group(2).rstrip('"').replace("\\n", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "At:" in lines:
        lines = lines[:lines.index("At:")]
    reason = lines[-1] if lines else text
    return f"model {name!r} failed to load: {one_line(reason)}"


def one_line_error(exc: BaseException) -> str:
    from .front import one_line
    return one_line(str(exc))


def _check_bounds(o: ServeOptions) -> None:
    """The limits of the options, also for callers that build ServeOptions in code."""
    from .. import limits as L

    for limit, value in ((L.INSTANCES, o.instances), (L.MAX_BATCH_SIZE, o.max_batch_size),
                         (L.QUEUE_DELAY_US, o.queue_delay_us), (L.DRAIN_TIMEOUT_S, o.exit_timeout_s),
                         (L.SERVE_MAX_PIXELS_CAP, o.max_pixels), (L.WINDOW_BATCH, o.window_batch or 1),
                         (L.THREADS, o.threads or 1)):
        limit.check(int(value), "serve")


def _free_loopback_ports(count: int, avoid: "set[int]" = frozenset()) -> List[int]:
    """`count` free 127.0.0.1 ports for tritonserver, none of `avoid` (the public ports: free now,
    the front binds them only after Triton has started, and the kernel may hand them out again)."""
    socks: list = []
    try:
        while len(socks) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] in avoid:
                sock.close()
                continue
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _descendants(root: int) -> set:
    """Pids of every live descendant of `root` (from /proc)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _is_resource_tracker(pid: int) -> bool:
    """multiprocessing's tracker serves the whole process (it unlinks leaked shared memory when
    the process ends); stopping it only makes multiprocessing start another one, with a warning."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def release_resource_tracker(timeout_s: float = 10.0) -> None:
    """Close multiprocessing's resource tracker of this process and wait until it has exited.

    For a process about to end (`clipfuse serve`). The tracker outlives its process by the time it
    takes to read end-of-file and unlink what was leaked; a supervisor that stops the container or
    cgroup when the main process ends would kill it half way. Python has no public call for this;
    `ResourceTracker._stop` (3.8+) waits without a limit, so the pipe is closed here and the wait
    is bounded."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
    if fd is None or pid is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    tracker._fd = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:  # not our child (already reaped)
            break
        time.sleep(0.02)
    else:
        LOG.warning("multiprocessing's resource tracker (pid %d) did not exit within %.0f s", pid, timeout_s)
    tracker._pid = None


def _shm_mapped(pid: int) -> set:
    try:
        with open(f"/proc/{pid}/maps", "r", errors="replace") as f:
            return {line.split(None, 5)[5].strip().replace(" (deleted)", "")
                    for line in f if "/dev/shm/" in line and len(line.split(None, 5)) == 6}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _check_port_free(host: str, port: int, what: str) -> None:
    """A taken port makes tritonserver exit and PyTriton wait for it: say so at once instead."""
    from .front import port_taken

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise port_taken(host, port, what, exc) from None


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM interrupts start-up like Ctrl-C (for `clipfuse serve`, whose process this is).

    tritonclient's HTTP client runs on gevent; a signal that lands while gevent's hub runs is
    printed by the hub as a traceback before the hub passes it on to the waiting code. A
    KeyboardInterrupt is how this process stops, not an error: the hub is told so, and the
    interruption still reaches start() (which stops what it started)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        from gevent.hub import Hub
    except ImportError:
        return
    if not issubclass(KeyboardInterrupt, Hub.NOT_ERROR):
        Hub.NOT_ERROR = (*Hub.NOT_ERROR, KeyboardInterrupt)


def _add_config_parameters(triton, name: str, parameters: Dict[str, str]) -> None:
    """Put `parameters` into the model's Triton config (`parameters` map, read by clients with
    get_model_config). PyTriton 0.7's public ModelConfig has no field for them; its model keeps
    the generated config in TritonModelConfig.backend_parameters, which becomes that map."""
    for model in triton._model_manager.models:
        if model.model_name == name:
            model._get_triton_model_config().backend_parameters.update(parameters)
            return
    raise ClipfuseError(f"model {name!r} was not bound")
