"""`clipfuse serve` under hostile clients and signals (a real tritonserver, 127.0.0.1 only).

One CLI server per test, started as a subprocess with its own TMPDIR, so that what it leaves
behind can be listed: its child processes (from /proc before the signal), the /dev/shm segments
they mapped, and its temporary folders. Request bombs that once made tritonserver allocate 30 GB
are answered 400 by the front before Triton sees them; the server goes on serving.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import CliServer, LOOPBACK, free_ports, serve_deps_missing, smooth_image, tiny_sclip, wait_until

_MISSING = serve_deps_missing()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from clipfuse.runtime import Segmenter  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip(tmp_path_factory.getbasetemp())


@pytest.fixture
def cli_server(artifact, tmp_path):
    servers = []

    def start(*extra, **kwargs) -> CliServer:
        servers.append(CliServer(artifact, tmp_path / f"s{len(servers)}", *extra, **kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def post(port: int, path: str, body: bytes, headers=None, timeout: float = 60):
    req = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def infer_json(shape, data, datatype="UINT8") -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype, "data": data}]}).encode()


def assert_one_line_4xx(status: int, body: bytes) -> str:
    assert 400 <= status < 500, (status, body[:500])
    message = json.loads(body)["error"]
    assert "\n" not in message and "Traceback" not in message and ".py" not in message, message
    assert "/work" not in message and "site-packages" not in message, message
    return message


def http_labels(port: int, image: np.ndarray) -> np.ndarray:
    client = thttp.InferenceServerClient(f"{LOOPBACK}:{port}", network_timeout=120)
    try:
        x = thttp.InferInput("image", [1, *image.shape], "UINT8")
        x.set_data_from_numpy(image[None])
        return client.infer("tiny", [x]).as_numpy("labels")[0]
    finally:
        client.close()


def test_request_bombs_are_4xx_and_the_server_lives(cli_server, artifact, tmp_path):
    srv = cli_server().wait_ready()
    port = srv.ports[0]
    cases = [
        infer_json([1, 100000, 100000, 3], [1, 2, 3]),     # 30 GB declared in 104 bytes
        infer_json([1, 0, 80, 3], []),                      # zero-size: PyTriton's memoryview crash
        infer_json([1, 2, 2, 3], [1, 2, 3]),                # fewer values than the shape
        infer_json([1, -5, 2, 3], [1]),
        infer_json([1, 2, 2, 3], [[[[0] * 3] * 2] * 2], "FP64"),
        infer_json([9, 2, 2, 3], [0] * 108),                # batch above --max-batch-size (8)
        infer_json([1, 2, 2, 3, 1], [0] * 12),
        b'{"inputs": "x"}', b"[" * 100_000, b"\xff\xfe", b"{}",
    ]
    for body in cases:
        status, answer = post(port, "/v2/models/tiny/infer", body)
        assert_one_line_4xx(status, answer)
    # binary extension: declared size must match the bytes sent
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 4000, 4000, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 48_000_000}}]}).encode()
    status, answer = post(port, "/v2/models/tiny/infer", header + b"\0" * 10,
                          {"Inference-Header-Content-Length": str(len(header))})
    assert_one_line_4xx(status, answer)
    # an image above --max-pixels: one line, naming the limit and the option
    big = np.zeros((1300, 1300, 3), np.uint8)
    with pytest.raises(InferenceServerException) as info:
        http_labels(port, big)
    assert "--max-pixels" in str(info.value) and "\n" not in str(info.value).strip()
    # gRPC: the same bomb in a ModelInferRequest
    client = tgrpc.InferenceServerClient(f"{LOOPBACK}:{srv.ports[1]}")
    try:
        from tritonclient.grpc import service_pb2
        request = service_pb2.ModelInferRequest(model_name="tiny")
        tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 100000, 100000, 3])
        request.raw_input_contents.append(b"\1\2\3")
        with pytest.raises(Exception) as info:
            client._client_stub.ModelInfer(request=request, timeout=30)
        assert "INVALID_ARGUMENT" in str(info.value) or "StatusCode.INVALID_ARGUMENT" in repr(info.value)
        assert tensor.name == "image"
    finally:
        client.close()
    # still alive and right
    image = smooth_image(120, 160, 3)
    with Segmenter.open(artifact) as local:
        np.testing.assert_array_equal(http_labels(port, image), local.segment(image).labels)
    assert srv.proc.poll() is None


def test_sigterm_stops_intake_drains_and_leaves_nothing(cli_server, artifact):
    srv = cli_server("--drain-timeout", "60").wait_ready()
    port = srv.ports[0]
    big = smooth_image(1000, 1200, 5)        # some seconds of work: in flight at SIGTERM
    # a thread, not tritonclient's async_infer: its gevent greenlet would only send on get_result
    import threading
    answer: dict = {}
    def in_flight():
        try:
            answer["labels"] = http_labels(port, big)
        except Exception as exc:  # reported by the assertion below
            answer["error"] = exc
    sender = threading.Thread(target=in_flight)
    sender.start()
    time.sleep(1.0)
    srv.snapshot()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # intake stopped at once: a new request (new or kept-alive connection) gets 503 or is refused
    refused = 0
    for _ in range(5):
        try:
            status, _ = post(port, "/v2/models/tiny/infer", infer_json([1, 2, 2, 3], [0] * 12), timeout=10)
            assert status == 503, status
        except (urllib.error.URLError, ConnectionError):
            pass
        refused += 1
    assert refused == 5
    sender.join(120)
    assert "labels" in answer, answer                               # the in-flight one finished
    with Segmenter.open(artifact) as local:
        np.testing.assert_array_equal(answer["labels"], local.segment(big).labels)
    assert srv.proc.wait(90) == 0, srv.text()[-3000:]
    assert "clipfuse serve: stopped" in srv.text()
    assert srv.leftovers() == {"processes": [], "shm": [], "tmp": []}, srv.leftovers()


def test_tritonserver_death_makes_serve_exit_nonzero(cli_server):
    srv = cli_server().wait_ready()
    triton = [p for p in srv.children if open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].endswith(b"/tritonserver")]
    assert triton, "no tritonserver child found"
    os.kill(triton[0], signal.SIGKILL)
    code = srv.proc.wait(90)
    assert code != 0, srv.text()[-2000:]
    assert "stopped unexpectedly" in srv.text()
    assert srv.leftovers() == {"processes": [], "shm": [], "tmp": []}, srv.leftovers()


def test_sigterm_before_ready_stops_everything(cli_server):
    srv = cli_server()
    # wait for tritonserver to exist, then SIGTERM before the models are ready
    def triton_started() -> bool:
        srv.snapshot()
        return any(b"tritonserver" in open(f"/proc/{p}/cmdline", "rb").read()
                   for p in srv.children if os.path.exists(f"/proc/{p}"))
    wait_until(triton_started, 120, "tritonserver started")
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(90)
    assert code != 0
    assert "Traceback" not in srv.text(), srv.text()[-3000:]
    assert srv.leftovers() == {"processes": [], "shm": [], "tmp": []}, srv.leftovers()


def test_one_port_for_two_endpoints_is_refused_at_once(artifact, capsys):
    from clipfuse.runtime.cli import main
    port = free_ports(1)[0]
    start = time.monotonic()
    assert main(["serve", str(artifact), "--http-port", str(port), "--grpc-port", str(port),
                 "--metrics-port", str(port)]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "--http-port and --grpc-port are both" in err and len(err.strip().splitlines()) == 1, err
