"""`clipfuse serve` with a real Triton server (nvidia-pytriton's bundled tritonserver, CPU), on
127.0.0.1 only, every server stopped by the test that starts it.

In-process server (module fixture): metadata, loopback-only listening, concurrent HTTP + gRPC
clients whose labels equal the local Segmenter's and whose windows share backend calls, bad
requests, a client killed mid-request. CLI server (subprocess): SIGTERM drains an in-flight
request and exits 0, and a restart on the same ports serves again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serve_helpers import (FRAME, LOOPBACK, concurrently, free_ports, listening_addresses, serve_deps_missing, smooth_image,
                           tiny_sclip, tiny_sclip_frame, wait_until)

_MISSING = serve_deps_missing()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from clipfuse.runtime import Segmenter  # noqa: E402
from clipfuse.runtime.cli import main as main_cli  # noqa: E402

CLASSES = [["background"], ["cat"], ["dog"], ["grass"]]
MAX_PIXELS = 1200 * 1200


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def local(artifact):
    with Segmenter.open(artifact) as seg:
        yield seg


@pytest.fixture(scope="module")
def frame_artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip_frame(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(artifact, frame_artifact):
    from clipfuse.runtime.serve.server import ClipfuseTriton, ServeOptions
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, instances=2,
                           max_batch_size=8, queue_delay_us=50_000, window_batch=64, threads=1,
                           max_pixels=MAX_PIXELS, exit_timeout_s=15)
    srv = ClipfuseTriton([f"tiny={artifact}", f"tinyframe={frame_artifact}"], options).start()
    try:
        yield srv, options
    finally:
        srv.stop()


def http_infer(port, image, model="tiny", client=None):
    own = client is None
    client = client or thttp.InferenceServerClient(f"{LOOPBACK}:{port}")
    try:
        x = thttp.InferInput("image", [1, *image.shape], "UINT8")
        x.set_data_from_numpy(image[None])
        outs = [thttp.InferRequestedOutput("labels"), thttp.InferRequestedOutput("confidence")]
        r = client.infer(model, [x], outputs=outs)
        return r.as_numpy("labels")[0], r.as_numpy("confidence")[0]
    finally:
        if own:
            client.close()


def grpc_infer(port, image, model="tiny"):
    client = tgrpc.InferenceServerClient(f"{LOOPBACK}:{port}")
    try:
        x = tgrpc.InferInput("image", [1, *image.shape], "UINT8")
        x.set_data_from_numpy(image[None])
        r = client.infer(model, [x])
        return r.as_numpy("labels")[0], r.as_numpy("confidence")[0]
    finally:
        client.close()


def test_health_metadata_and_loopback_only(server, artifact):
    srv, o = server
    client = thttp.InferenceServerClient(f"{LOOPBACK}:{o.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        params = {k: v["string_value"] for k, v in client.get_model_config("tiny")["parameters"].items()}
    finally:
        client.close()
    manifest = json.loads(artifact.with_suffix(".json").read_text())
    assert json.loads(params["clipfuse_classes"]) == manifest["classes"]
    assert json.loads(params["clipfuse_protocol"])["stride"] == manifest["protocol"]["stride"]
    assert params["clipfuse_kind"] == "image" and params["clipfuse_window"] == "224"
    for port in (o.http_port, o.grpc_port, o.metrics_port):
        assert listening_addresses(port) == {LOOPBACK}, port


def test_concurrent_http_and_grpc_match_local_runtime(server, local):
    srv, o = server
    # six clients with one image size (Triton batches equal shapes), two with other sizes
    images = [smooth_image(180, 240, s) for s in range(6)] + [smooth_image(300, 200, 7), smooth_image(96, 500, 8)]
    def client(i):
        call = http_infer if i % 2 == 0 else grpc_infer
        return call(o.http_port if i % 2 == 0 else o.grpc_port, images[i])

    before = len(srv.models["tiny"].history)
    results = concurrently(client, len(images))
    classes_seen = set()
    for image, (labels, confidence) in zip(images, results):
        ref = local.segment(image, return_scores=True)
        np.testing.assert_array_equal(labels, ref.labels)
        probs = np.exp(40.0 * _resized(ref.scores, image.shape[:2]))
        probs /= probs.sum(0)
        np.testing.assert_allclose(confidence, probs.max(0), atol=1e-4)
        classes_seen |= set(np.unique(labels).tolist())
    assert len(classes_seen) > 1
    batches = srv.models["tiny"].history[before:]
    assert sum(b.images for b in batches) == len(images)
    # concurrent equal-size requests were batched: their windows went through shared calls
    assert max(b.images for b in batches) >= 2
    assert all(b.largest_call <= 64 for b in batches)


def test_frame_graph_served_batched_equal_to_local(server, frame_artifact):
    """A frame graph is served as is: concurrent frames go through the graph together, labels and
    confidence equal the local Segmenter's, and an image of another size gets a Triton error."""
    srv, o = server
    images = [smooth_image(*FRAME, s) for s in range(5)]
    before = len(srv.models["tinyframe"].history)
    results = concurrently(lambda i: http_infer(o.http_port, images[i], model="tinyframe"), len(images))
    with Segmenter.open(frame_artifact) as seg:
        for image, (labels, confidence) in zip(images, results):
            ref = seg.segment(image, return_confidence=True)
            np.testing.assert_array_equal(labels, ref.labels)
            np.testing.assert_allclose(confidence, ref.confidence, atol=1e-6)
    batches = srv.models["tinyframe"].history[before:]
    assert sum(b.images for b in batches) == len(images) and max(b.images for b in batches) >= 2
    client = thttp.InferenceServerClient(f"{LOOPBACK}:{o.http_port}")
    try:
        params = {k: v["string_value"] for k, v in client.get_model_config("tinyframe")["parameters"].items()}
        assert params["clipfuse_kind"] == "frame" and params["clipfuse_window"] == f"{FRAME[0]}x{FRAME[1]}"
        with pytest.raises(InferenceServerException, match="frame graph for 160x120"):
            http_infer(o.http_port, smooth_image(FRAME[0] + 8, FRAME[1], 9), model="tinyframe", client=client)
        assert http_infer(o.http_port, images[0], model="tinyframe", client=client)[0].shape == FRAME
    finally:
        client.close()


def _resized(scores, size):
    from clipfuse.runtime.protocol import resize_scores
    return resize_scores(scores, size)


def _post(port, body: bytes, header_len: int):
    req = urllib.request.Request(f"http://{LOOPBACK}:{port}/v2/models/tiny/infer", data=body, method="POST",
                                 headers={"Inference-Header-Content-Length": str(header_len),
                                          "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


def test_bad_requests_get_errors_and_server_keeps_serving(server, local):
    srv, o = server
    img = smooth_image(64, 80, 3)
    client = thttp.InferenceServerClient(f"{LOOPBACK}:{o.http_port}")
    try:
        x = thttp.InferInput("image", [1, 64, 80, 3], "FP32")          # wrong dtype
        x.set_data_from_numpy(img[None].astype(np.float32))
        with pytest.raises(InferenceServerException, match="(?i)data.?type|datatype"):
            client.infer("tiny", [x])
        x = thttp.InferInput("image", [1, 64, 240], "UINT8")           # wrong rank
        x.set_data_from_numpy(img.reshape(1, 64, 240))
        with pytest.raises(InferenceServerException, match="(?i)shape"):
            client.infer("tiny", [x])
        x = thttp.InferInput("image", [64, 80, 3], "UINT8")            # no batch axis
        x.set_data_from_numpy(img)
        with pytest.raises(InferenceServerException, match=r"expected shape \[N, H, W, 3\], got \[64, 80, 3\]"):
            client.infer("tiny", [x])
        x = thttp.InferInput("image", [9, 64, 80, 3], "UINT8")         # batch above --max-batch-size
        x.set_data_from_numpy(np.stack([img] * 9))
        with pytest.raises(InferenceServerException, match="batch 9 is above the limit of 8"):
            client.infer("tiny", [x])
        big = np.zeros((1300, 1200, 3), np.uint8)                      # oversized
        with pytest.raises(InferenceServerException, match="above the limit of"):
            http_infer(o.http_port, big, client=client)
    finally:
        client.close()
    # corrupt payload: the binary part is shorter than the JSON header announces
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 64, 80, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 64 * 80 * 3}}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(o.http_port, header + img.tobytes()[:1000], len(header))
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        _post(o.http_port, b"{not json" + bytes(100), 9)
    labels, _ = grpc_infer(o.grpc_port, img)
    np.testing.assert_array_equal(labels, local.segment(img).labels)


KILLED_CLIENT = """
import sys, time, numpy as np, tritonclient.http as h
c = h.InferenceServerClient(sys.argv[1], concurrency=1)
img = np.full((1, 1100, 1000, 3), 90, np.uint8)
x = h.InferInput("image", list(img.shape), "UINT8"); x.set_data_from_numpy(img)
c.async_infer("tiny", [x])
print("sent", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_request(server, local):
    srv, o = server
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, f"{LOOPBACK}:{o.http_port}"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(10)
    img = smooth_image(120, 160, 11)
    labels, _ = http_infer(o.http_port, img)
    np.testing.assert_array_equal(labels, local.segment(img).labels)
    assert srv.triton.is_alive()


# The drain test's in-flight request. At 3000 x 4000 a 2-core Intel (AMX) machine answered 0.15 s
# after the SIGTERM sent at 1.0 s, under the test's 0.2 s bar; at 4000 x 6000 it answered 2.5 s
# after, so the request is in flight well past the signal on fast machines too.
BIG = (4000, 6000)


def _start_cli(artifact, ports, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clipfuse.runtime.cli", "serve", f"tiny={artifact}",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--drain-timeout", "20", "--threads", "1", "--max-pixels", str(BIG[0] * BIG[1])]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _ready(port):
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/v2/models/tiny/ready", timeout=2) as r:
        return r.status == 200


def test_taken_port_is_one_clear_error(artifact, capsys):
    import socket
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = free_ports(2)
        code = main_cli(["serve", str(artifact), "--http-port", str(free[0]), "--grpc-port", str(port),
                         "--metrics-port", str(free[1])])
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port} for gRPC" in capsys.readouterr().err


def test_cli_sigterm_drains_then_restart_serves(artifact, local, tmp_path):
    ports = free_ports(3)
    big = smooth_image(*BIG, 5)        # seconds of work on the server: still in flight at SIGTERM
    small = smooth_image(100, 150, 6)
    for round_ in range(2):            # the second round is the restart, on the same ports
        log = open(tmp_path / f"serve{round_}.log", "wb")
        proc = _start_cli(artifact, ports, log)
        try:
            wait_until(lambda: _ready(ports[0]), 90, "clipfuse serve ready")
            if round_ == 0:
                # a thread, not async_infer: tritonclient's gevent greenlet sends only on get_result,
                # and after SIGTERM a new request is refused (503)
                import threading
                got: dict = {}
                sender = threading.Thread(target=lambda: got.update(labels=http_infer(ports[0], big)[0]))
                sender.start()
                time.sleep(1.0)
                assert sender.is_alive(), "the request was answered before SIGTERM: make BIG bigger"
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                sender.join(120)
                # the answer came well after SIGTERM: the request was in flight and was drained
                assert time.monotonic() - sent > 0.2 and "labels" in got, time.monotonic() - sent
                np.testing.assert_array_equal(got["labels"], local.segment(big).labels)
            else:
                labels, _ = http_infer(ports[0], small)
                np.testing.assert_array_equal(labels, local.segment(small).labels)
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
        text = (tmp_path / f"serve{round_}.log").read_text(errors="replace")
        assert "clipfuse serve: stopped" in text, text[-2000:]
        if round_ == 0:  # Triton's own account: it waited for the client's connection
            assert "Found 1 HTTP service connections" in text, text[-3000:]
