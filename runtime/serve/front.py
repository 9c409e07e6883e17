"""The public endpoints of `clipfuse serve`: a thin HTTP and gRPC front before tritonserver.

Why a front: tritonserver sizes its buffers from the shapes a request DECLARES. A 104-byte JSON
request declaring [1, 100000, 100000, 3] made it allocate 30 GB and die; a zero-size shape
crashed PyTriton's proxy with a traceback in the answer. The front checks every inference
request's declared shapes and byte counts against the server's limits (clipfuse.runtime.limits)
before a byte reaches Triton, which listens on private loopback ports only. It also owns the
shutdown rule: once draining, every new request gets 503 at once while the requests in flight
finish; and every error a client sees is one line (Triton's answers carry PyTriton's Python
tracebacks with the server's paths: only their last line is kept).

Everything else (health, metadata, config, statistics) is forwarded unchanged.
"""
from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Sequence, Tuple

from ..errors import ClipfuseError
from .core import INPUT

LOG = logging.getLogger("clipfuse.serve")
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
          "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
NON_INFER_BODY_BYTES = 1 << 20      # health/metadata/config requests carry (almost) nothing
JSON_HEADER_BYTES = 1 << 20         # the JSON part of a binary inference request
# Pure-JSON tensors cost ~4 bytes of text and a Python int per element to parse: bounded apart.
JSON_DATA_ELEMENTS = 1 << 20


@dataclass
class RequestBounds:
    """What one inference request may declare (the server's --max-pixels, --max-batch-size)."""
    max_pixels: int
    max_batch: int

    @property
    def max_elements(self) -> int:
        return self.max_batch * self.max_pixels * 3

    def check_shape(self, name: str, shape: Sequence, datatype: str) -> int:
        """Element count of one declared input, or ClipfuseError (one line) when it breaks a bound."""
        from ..limits import MAX_BATCH_SIZE, SERVE_MAX_PIXELS

        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ClipfuseError(f"input {name!r}: shape must be a list of integers")
        if datatype not in _SIZES:
            raise ClipfuseError(f"input {name!r}: unknown datatype {str(datatype)[:20]!r}")
        if any(d < 1 for d in shape):
            raise ClipfuseError(f"input {name!r}: shape {list(shape)} has an empty or negative dimension")
        if name == INPUT:
            if len(shape) != 4 or shape[3] != 3:
                raise ClipfuseError(f"input {name!r}: expected shape [N, H, W, 3], got {list(shape)[:6]}")
            MAX_BATCH_SIZE.check(shape[0], f"input {name!r} batch", self.max_batch)
            SERVE_MAX_PIXELS.check(shape[1] * shape[2], f"image {shape[1]} x {shape[2]}", self.max_pixels)
        count = 1
        for d in shape:
            count *= d
            if count > self.max_elements:
                raise ClipfuseError(f"input {name!r}: shape {list(shape)[:6]} holds more values than this "
                                    f"server accepts ({self.max_elements}; raise --max-pixels)")
        return count


def check_http_infer(header: dict, binary_bytes: int, bounds: RequestBounds) -> None:
    """A KServe-v2 JSON inference header (+ the bytes of binary data after it) against `bounds`."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs or len(inputs) > 16:
        raise ClipfuseError("request needs 'inputs': a list of 1 to 16 tensors")
    binary_total = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise ClipfuseError("each input must be an object with name, shape, datatype")
        name = str(item.get("name", ""))[:64]
        datatype = item.get("datatype")
        count = bounds.check_shape(name, item.get("shape"), datatype)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ClipfuseError(f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * _SIZES[datatype]:
                raise ClipfuseError(f"input {name!r}: binary_data_size {str(size)[:20]} does not match shape "
                                    f"{item['shape']} x {datatype}")
            binary_total += size
        else:
            data = item.get("data")
            if count > JSON_DATA_ELEMENTS:
                raise ClipfuseError(f"input {name!r}: {count} values as JSON text (limit {JSON_DATA_ELEMENTS}); "
                                    "send binary tensor data")
            if _count_leaves(data, JSON_DATA_ELEMENTS) != count:
                raise ClipfuseError(f"input {name!r}: data holds a different number of values than shape "
                                    f"{item['shape']}")
    if binary_total != binary_bytes:
        raise ClipfuseError(f"request carries {binary_bytes} bytes of binary data, its inputs declare {binary_total}")


def _count_leaves(data: object, limit: int) -> int:
    """Number of scalar values in nested lists (iterative; stops past `limit`)."""
    if not isinstance(data, list):
        return -1
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
        if count > limit or len(stack) > limit:
            return -1
    return count


_PATHS = re.compile(r"(/[\w.\-]+){2,}")
_KNOWN_ERRORS = ("PyTritonBadParameterError: ", "ClipfuseError: ")


def one_line(message: str) -> str:
    """Triton/PyTriton error text -> one line for the client: the exception's own message (the
    last line of a traceback), without file paths."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    # The Python backend appends an "At:" stack of the stub's frames after the message, so the
    # exception line is searched from the end rather than taken as the last line.
    for line in reversed(lines):
        found = next((known for known in _KNOWN_ERRORS if known in line), None)
        if found:
            text = line.split(found, 1)[1]
            break
    else:
        text = lines[-1] if lines else "error"
        if "Traceback" in message or "File \"" in message or "At:" in lines:
            text = "internal error while running the model (see the server log)"
    return _PATHS.sub("<path>", text)[:300]


class _Gate:
    """In-flight count and the draining flag, shared by both protocols."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inflight = 0
        self.draining = False

    def enter(self) -> bool:
        with self.cond:
            if self.draining:
                return False
            self.inflight += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Stop intake now; wait up to `timeout_s` for the requests in flight. True when all ended."""
        with self.cond:
            self.draining = True
            return self.cond.wait_for(lambda: self.inflight == 0, timeout=timeout_s)


class Front:
    """HTTP (and gRPC, when grpcio and tritonclient are present) endpoints for a tritonserver that
    listens on `backend_http` / `backend_grpc` (127.0.0.1 ports)."""

    def __init__(self, host: str, http_port: int, grpc_port: Optional[int], backend_http: int,
                 backend_grpc: int, bounds: RequestBounds, timeout_s: float = 600.0) -> None:
        self.gate = _Gate()
        self.bounds = bounds
        self.backend_http, self.backend_grpc = backend_http, backend_grpc
        self.timeout_s = timeout_s
        self._http = _make_http_server(self, host, http_port)
        self._threads: List[threading.Thread] = []
        try:
            self._grpc = _make_grpc_server(self, host, grpc_port) if grpc_port is not None else None
        except BaseException:
            self._http.server_close()    # bound above: give the port back
            raise

    def start(self) -> "Front":
        thread = threading.Thread(target=self._http.serve_forever, name="clipfuse-http-front", daemon=True)
        thread.start()
        self._threads.append(thread)
        if self._grpc is not None:
            self._grpc.start()
        return self

    def drain(self, timeout_s: float) -> bool:
        return self.gate.drain(timeout_s)

    def close(self) -> None:
        self.gate.draining = True
        self._http.shutdown()
        self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=0)


# --- HTTP ---------------------------------------------------------------------------------------

def _make_http_server(front: Front, host: str, port: int) -> ThreadingHTTPServer:
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive, as Triton's own endpoint
        server_version = "clipfuse"
        sys_version = ""

        def log_message(self, fmt, *args) -> None:  # access log off (Triton's is off too)
            pass

        def _reply(self, status: int, message: str, close: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _handle(self) -> None:
            if not front.gate.enter():
                self._reply(503, "server is shutting down", close=True)
                return
            try:
                self._forward()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                front.gate.leave()

        do_GET = do_POST = do_HEAD = _handle

        def _forward(self) -> None:
            from ..limits import Limit

            infer = self.command == "POST" and bool(_INFER_PATH.match(self.path.split("?")[0]))
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self._reply(400, "bad Content-Length", close=True)
                return
            if self.headers.get("Transfer-Encoding"):
                self._reply(411, "send a Content-Length (chunked bodies are not accepted)", close=True)
                return
            header_len = self.headers.get("Inference-Header-Content-Length")
            limit = NON_INFER_BODY_BYTES
            if infer:
                limit = (JSON_HEADER_BYTES + front.bounds.max_elements if header_len is not None
                         else JSON_HEADER_BYTES + JSON_DATA_ELEMENTS * 24)
            if length < 0 or length > limit:
                err = Limit("request body", limit, "--max-pixels", "bytes").exceeded(length)
                self._reply(413, str(err), close=True)
                return
            body = self.rfile.read(length) if length else b""
            if infer:
                try:
                    hlen = int(header_len) if header_len is not None else len(body)
                    if not 0 <= hlen <= min(len(body), JSON_HEADER_BYTES):
                        raise ClipfuseError("bad Inference-Header-Content-Length")
                    try:
                        header = json.loads(body[:hlen])
                    except (ValueError, RecursionError):
                        raise ClipfuseError("request header is not valid JSON") from None
                    check_http_infer(header, len(body) - hlen, front.bounds)
                except ClipfuseError as exc:
                    self._reply(400, str(exc))
                    return
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", front.backend_http,
                                                               timeout=front.timeout_s)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "connection", "keep-alive", "transfer-encoding")}
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                local.conn = None
                conn.close()
                self._reply(503, "the inference server is not available", close=True)
                return
            if resp.status >= 400:
                try:
                    message = json.loads(data).get("error", "")
                except (ValueError, AttributeError):
                    message = data.decode("utf-8", "replace")
                self._reply(resp.status, one_line(message))
                return
            self.send_response(resp.status)
            for key in ("Content-Type", "Inference-Header-Content-Length", "Content-Encoding"):
                if resp.getheader(key) is not None:
                    self.send_header(key, resp.getheader(key))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

    if ":" in host:
        import socket
        Server.address_family = socket.AF_INET6
    try:
        return Server((host, port), Handler)
    except OSError as exc:   # taken since start-up checked it (another process, or a race)
        raise port_taken(host, port, "HTTP", exc) from None


def port_taken(host: str, port: int, what: str, exc: OSError) -> ClipfuseError:
    """The one line for an endpoint that cannot listen (`what`: HTTP, gRPC, metrics)."""
    return ClipfuseError(f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc}); "
                         f"choose another --{what.lower()}-port")


# --- gRPC ---------------------------------------------------------------------------------------

def check_grpc_infer(raw: bytes, bounds: RequestBounds) -> None:
    """A serialized ModelInferRequest against `bounds` (ClipfuseError, one line, when it breaks one)."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    try:
        request = service_pb2.ModelInferRequest.FromString(raw)
    except (DecodeError, ValueError, RecursionError):
        raise ClipfuseError("malformed ModelInferRequest") from None
    if not 1 <= len(request.inputs) <= 16:
        raise ClipfuseError("request needs 1 to 16 inputs")
    raw_sizes = [len(c) for c in request.raw_input_contents]
    if raw_sizes and len(raw_sizes) != len(request.inputs):
        raise ClipfuseError("raw_input_contents must hold one entry per input")
    for i, tensor in enumerate(request.inputs):
        count = bounds.check_shape(tensor.name[:64], list(tensor.shape), tensor.datatype)
        if raw_sizes:
            if raw_sizes[i] != count * _SIZES[tensor.datatype]:
                raise ClipfuseError(f"input {tensor.name[:64]!r}: {raw_sizes[i]} bytes for shape "
                                    f"{list(tensor.shape)[:6]} x {tensor.datatype}")
        else:
            contents = tensor.contents
            have = sum(len(getattr(contents, f)) for f in (
                "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                "fp32_contents", "fp64_contents", "bytes_contents"))
            if have != count:
                raise ClipfuseError(f"input {tensor.name[:64]!r}: {have} values for shape {list(tensor.shape)[:6]}")


def _make_grpc_server(front: Front, host: str, port: int):
    """A generic gRPC proxy: ModelInfer is decoded and checked like HTTP, every other unary method
    is forwarded as bytes; streaming inference is not offered."""
    import grpc
    from concurrent import futures
    from tritonclient.grpc import service_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{front.backend_grpc}", options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    service = "inference.GRPCInferenceService"
    max_message = JSON_HEADER_BYTES + front.bounds.max_elements

    def handler_for(method: str):
        forward = channel.unary_unary(f"/{service}/{method}")

        def call(raw: bytes, context):
            if not front.gate.enter():
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            try:
                if method == "ModelInfer":
                    try:
                        check_grpc_infer(raw, front.bounds)
                    except ClipfuseError as exc:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                try:
                    return forward(raw, timeout=front.timeout_s, metadata=context.invocation_metadata())
                except grpc.RpcError as exc:
                    context.abort(exc.code(), one_line(exc.details() or ""))
            finally:
                front.gate.leave()
        return grpc.unary_unary_rpc_method_handler(call)

    methods = [m.name for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
               if not m.client_streaming and not m.server_streaming]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="clipfuse-grpc-front"),
                         options=[("grpc.max_receive_message_length", max_message),
                                  ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {
        m: handler_for(m) for m in methods})])
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise ClipfuseError(f"cannot listen on {address} for gRPC; choose another --grpc-port")
    return server


def split_ports(host: str, http_port: int, grpc_port: int, metrics_port: int) -> Tuple[int, int]:
    """Refuse one port for two endpoints (Triton would wait for a bind that never succeeds)."""
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    seen = {}
    for flag, value in ports.items():
        if value and value in seen:
            raise ClipfuseError(f"{seen[value]} and {flag} are both {value}: each endpoint needs its own port")
        seen[value] = flag
    return http_port, grpc_port
