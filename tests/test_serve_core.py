"""Serving pieces that need neither Triton nor a server: batch segmentation, config text."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import Protocol
from clipfuse.runtime.protocol import class_scores, resize_scores, run_protocol
from clipfuse.runtime.serve.core import check_images, segment_batch
from clipfuse.runtime.serve.pbtxt import Enum, to_pbtxt
from clipfuse.runtime.serve.server import parse_artifacts, python_libdir_first

from serve_helpers import smooth_image

PROTOCOL = Protocol(short_side=64, window=32, stride=16, long_side_max=256, score_type="cosine",
                    logit_scale=40.0, prob_thd=0.3, area_thd=None)


def fake_infer(calls):
    """A deterministic 'graph': per-window class scores from the window's mean colour."""
    def infer(crops):
        calls.append(len(crops))
        mean = crops.astype(np.float32).mean(axis=(1, 2)) / 255.0  # [B, 3]
        grid = crops[:, ::8, ::8, :].astype(np.float32) / 255.0    # [B, 4, 4, 3]
        k = np.stack([grid[..., 0], grid[..., 1], grid[..., 2], 1 - grid.mean(-1)], axis=1)
        return (k + 0.1 * mean[:, :, None, None].mean(1, keepdims=True)) * 0.2
    return infer


def test_segment_batch_equals_one_image_at_a_time():
    images = [smooth_image(50, 70, s) for s in range(3)] + [smooth_image(90, 40, 9)]
    calls = []
    results, stats = segment_batch(images, fake_infer(calls), PROTOCOL, 32, window_batch=7)
    per_image = [run_protocol(img, fake_infer([]), PROTOCOL, 32) for img in images]
    assert stats.images == 4 and stats.windows == sum(o.num_windows for o in per_image)
    # windows of all images shared backend calls of at most 7
    assert calls == [7] * (stats.windows // 7) + ([stats.windows % 7] if stats.windows % 7 else [])
    one_at_a_time = sum(-(-o.num_windows // 7) for o in per_image)
    assert stats.backend_calls == len(calls) < one_at_a_time
    assert len(np.unique(np.concatenate([r[0].ravel() for r in results]))) > 1  # not one flat class
    for (labels, confidence), ref in zip(results, per_image):
        np.testing.assert_array_equal(labels, ref.labels)
        # confidence = max softmax probability, from the full-size map computed independently
        probs = class_scores(resize_scores(ref.scores, labels.shape), PROTOCOL)
        np.testing.assert_allclose(confidence, probs.max(axis=0), atol=1e-5)
        assert (labels[confidence < PROTOCOL.prob_thd] == 0).all()


@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 0, 5, 3), np.uint8, "empty image"),
    ((1, 5000, 4000, 3), np.uint8, "above the limit of"),
    ((1, 5, 5, 3), np.float32, "uint8"),
    ((5, 5, 3), np.uint8, "uint8 images"),
])
def test_check_images_refuses(shape, dtype, message):
    images = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, [0] * len(shape))
    with pytest.raises(ClipfuseError, match=message):
        check_images(images, max_pixels=4096 * 4096)


def test_parse_artifacts_names():
    assert parse_artifacts(["engines/sclip.onnx", "b=x/y.engine"]) == [
        ("sclip", __import__("pathlib").Path("engines/sclip.onnx")), ("b", __import__("pathlib").Path("x/y.engine"))]
    assert parse_artifacts(["my model.v2.onnx"])[0][0] == "my_model.v2"
    with pytest.raises(ClipfuseError, match="NAME=PATH"):
        parse_artifacts(["a/sclip.onnx", "b/sclip.onnx"])


def test_libdir_goes_first_once():
    import sysconfig
    libdir = sysconfig.get_config_var("LIBDIR")
    env = python_libdir_first({"LD_LIBRARY_PATH": f"/opt/x:{libdir}"})
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/opt/x"
    assert python_libdir_first({})["LD_LIBRARY_PATH"] == libdir


def test_pbtxt_text():
    text = to_pbtxt({"name": "m", "max_batch_size": 4, "input": [{"name": "image", "data_type": Enum("TYPE_UINT8"),
                                                                "dims": [-1, 3]}],
                     "dynamic_batching": {"max_queue_delay_microseconds": 100},
                     "parameters": {"k": 'a "quoted" näme'}})
    assert 'data_type: TYPE_UINT8' in text and "dims: [-1, 3]" in text
    assert 'parameters { key: "k" value { string_value: "a \\"quoted\\" näme" } }' in text
    tritonclient = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="needs tritonclient[grpc] for Triton's model-config schema")
    from clipfuse.runtime.serve.pbtxt import parse_config
    config = parse_config(text)
    assert config.input[0].data_type == tritonclient.TYPE_UINT8
    assert config.parameters["k"].string_value == 'a "quoted" näme'
    assert list(config.input[0].dims) == [-1, 3]


# What tritonserver 2.x's Python backend answers when a PyTriton callable raises: the exception
# line, then the stub's "At:" frames (taken from a server log, paths shortened).
_STUB_ANSWER = (
    "Model execute error: Traceback (most recent call last):\n"
    '  File "/tmp/folderX/1/model.py", line 492, in execute\n'
    "    raise triton_responses_or_error\n"
    "c_python_backend_utils.TritonModelException: Traceback (most recent call last):\n"
    '  File "/site-packages/pytriton/proxy/inference.py", line 393, in _handle_requests\n'
    "pytriton.exceptions.PyTritonBadParameterError: x.onnx is a frame graph for 160x120 frames, this image "
    "is 160x128: resize or crop it\n\n\n\nAt:\n  /tmp/folderX/1/model.py(501): execute\n")


@pytest.mark.parametrize("message, expected", [
    (_STUB_ANSWER, "x.onnx is a frame graph for 160x120 frames, this image is 160x128: resize or crop it"),
    ("ClipfuseError: bad size", "bad size"),
    ("plain one-line error from Triton", "plain one-line error from Triton"),
    ('Traceback (most recent call last):\n  File "/a/b/c.py", line 1\nKeyError: 3',
     "internal error while running the model (see the server log)"),
    ("Model execute error\n\nAt:\n  /tmp/f/1/model.py(501): execute",
     "internal error while running the model (see the server log)"),
    ("failed to open /var/lib/models/x.onnx", "failed to open <path>"),
])
def test_one_line_keeps_the_exception_message_and_drops_stacks_and_paths(message, expected):
    from clipfuse.runtime.serve.front import one_line
    assert one_line(message) == expected


def test_backend_ports_never_take_a_public_port(monkeypatch):
    """tritonserver's private ports are picked before the front binds the public ones; the kernel
    may hand a just-released public port out again (seen as 'Address already in use')."""
    from clipfuse.runtime.serve import server as serve_server

    handed_out = iter([8000, 5001, 8002, 8001, 5002])

    class FakeSocket:
        def __init__(self, *args):
            self.port = None

        def bind(self, address):
            self.port = next(handed_out)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            pass

    import types
    monkeypatch.setattr(serve_server, "socket", types.SimpleNamespace(socket=FakeSocket))
    assert serve_server._free_loopback_ports(2, avoid={8000, 8001, 8002}) == [5001, 5002]


def test_taken_http_port_is_one_line():
    import socket

    from clipfuse.runtime.serve.front import Front, RequestBounds

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ClipfuseError, match=rf"^cannot listen on 127.0.0.1:{port} for HTTP "
                                                r"\(Address already in use\); choose another --http-port$"):
            Front("127.0.0.1", port, None, 1, 2, RequestBounds(max_pixels=100, max_batch=1))


def test_resource_tracker_is_gone_when_release_returns():
    """`clipfuse serve` ends with release_resource_tracker(): the tracker PyTriton's shared memory
    starts must not outlive the process (CI saw it alive just after serve exited)."""
    import subprocess
    import sys
    import textwrap

    program = textwrap.dedent("""
        import os
        from multiprocessing import resource_tracker, shared_memory
        from clipfuse.runtime.serve.server import release_resource_tracker
        shm = shared_memory.SharedMemory(create=True, size=64)
        shm.close()
        shm.unlink()
        pid = resource_tracker._resource_tracker._pid
        release_resource_tracker(timeout_s=30)
        state = "gone"
        if os.path.exists(f"/proc/{pid}"):
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        print(pid, state)
        release_resource_tracker()   # a second call (or none started) does nothing
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid, state = out.stdout.split()
    assert int(pid) > 0 and state == "gone", out.stdout
    assert out.stderr == "", out.stderr
