"""Server start-up: PyTriton's instance handshake race is retried with a fresh server, any other
model-load failure is one line at once, and a failed attempt leaves no process or workspace.

The race itself (an instance >0 connecting to instance 0's config socket between bind and listen)
cannot be forced from outside PyTriton; these tests start a real tritonserver and give its log
the failure Triton printed in CI."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from serve_helpers import LOOPBACK, free_ports, serve_deps_missing, smooth_image, tiny_sclip, wait_until

_MISSING = serve_deps_missing()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

import tritonclient.http as thttp  # noqa: E402

from clipfuse.runtime import Segmenter  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.serve import server as serve_server  # noqa: E402

# What Triton 2.51 printed when instance tiny_0_1 lost the race (CI, 2026-12-04): the stub's line,
# then the model's. The traceback is one log line with escaped newlines.
_TB = ("Model initialize error: Traceback (most recent call last):\\n  File \\\"/tmp/folderfIJ3sk/1/model.py\\\", "
       "line 425, in initialize\\n    inference_handler_config = get_config_from_handshake_server(handshake_socket)"
       "\\n  File \\\"/tmp/folderfIJ3sk/1/communication.py\\\", line 550, in get_config_from_handshake_server"
       "\\n    sock.connect(socket_path.as_posix())\\nConnectionRefusedError: [Errno 111] Connection refused"
       "\\n\\n\\nAt:\\n  /tmp/folderfIJ3sk/1/model.py(454): initialize\\n\"\n")
RACE_LOG = ("I1204 21:23:53.582058 22161 pb_stub.cc:366] \"Failed to initialize Python stub: TritonModelException: "
            + _TB + "E1204 21:23:55.808162 22161 model_lifecycle.cc:642] \"failed to load 'tiny' version 1: "
            "Internal: TritonModelException: " + _TB)
# instance 0 failed for a reason of its own: the others then time out in the handshake
_OWN = ("Model initialize error: Traceback (most recent call last):\\n  File \\\"/tmp/folderX/1/model.py\\\", "
        "line 401, in initialize\\nValueError: no GPU for this engine\\n\\n\\nAt:\\n  "
        "/tmp/folderX/1/model.py(454): initialize\\n\"\n")
OTHER_LOG = ("I1204 21:23:53.1 22161 pb_stub.cc:366] \"Failed to initialize Python stub: TritonModelException: "
             + _OWN + "I1204 21:23:53.5 22161 pb_stub.cc:366] \"Failed to initialize Python stub: "
             "TritonModelException: " + _TB.replace("ConnectionRefusedError: [Errno 111] Connection refused",
                                                    "TimeoutError: Timeout occurred while waiting for config file")
             + "E1204 21:23:55.8 22161 model_lifecycle.cc:642] \"failed to load 'tiny' version 1: Internal: "
             "TritonModelException: " + _OWN)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip(tmp_path_factory.getbasetemp())


def _options(instances=2):
    http, grpc, metrics = free_ports(3)
    return serve_server.ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                     instances=instances, threads=1, exit_timeout_s=5)


def _failing_run(monkeypatch, log_text, failures):
    """Triton.run that starts the real tritonserver, then fails `failures` times with `log_text`
    in the server's log (as a lost race does), then runs for real. Returns the workspaces seen."""
    from pytriton.server import triton_server
    from pytriton.triton import Triton

    # Each failed start took 30 s in full-suite runs (CI and here), 0.3 s alone: PyTriton's wait
    # for tritonserver to exit on SIGINT timed out. The likely cause is this fake failing at once:
    # SIGINT sent while the forked child has not yet exec'd tritonserver (slower from a big
    # pytest process) is lost. A real failure comes after tritonserver ran, so the fake waits for
    # the exec, and the wait for exit is bounded in case that is not the whole story.
    monkeypatch.setattr(triton_server, "SERVER_OUTPUT_TIMEOUT_SECS", 5)
    real_run = Triton.run
    seen = []

    def run(self):
        seen.append(self._workspace.path)
        if len(seen) > failures:
            return real_run(self)
        self._run_server()
        wait_until(lambda: bool(_tritonservers()), 60, "tritonserver exec'd")
        self._triton_server._record_logs(log_text)      # as if tritonserver had printed it
        raise RuntimeError("internal error while running the model (see the server log)")

    monkeypatch.setattr(Triton, "run", run)
    return seen


def _tritonservers() -> list:
    """Our tritonserver children that are still running."""
    names = []
    for pid in serve_server._descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if "tritonserver" in comm and serve_server._alive(pid):
            names.append(pid)
    return names


def test_lost_handshake_race_is_retried_with_a_fresh_server(artifact, monkeypatch, caplog):
    seen = _failing_run(monkeypatch, RACE_LOG, failures=1)
    options = _options()
    with caplog.at_level(logging.WARNING, logger="clipfuse.serve"):
        srv = serve_server.ClipfuseTriton([f"tiny={artifact}"], options).start()
    try:
        assert len(seen) == 2 and seen[0] != seen[1]
        assert not seen[0].exists(), "the failed attempt's workspace stays behind"
        assert len(_tritonservers()) == 1
        assert any("handshake race" in r.getMessage() for r in caplog.records)
        image = smooth_image(180, 240, 3)
        client = thttp.InferenceServerClient(f"{LOOPBACK}:{options.http_port}")
        try:
            x = thttp.InferInput("image", [1, *image.shape], "UINT8")
            x.set_data_from_numpy(image[None])
            labels = client.infer("tiny", [x]).as_numpy("labels")[0]
        finally:
            client.close()
        with Segmenter.open(artifact) as local:
            np.testing.assert_array_equal(labels, local.segment(image).labels)
    finally:
        srv.stop()
    assert not seen[1].exists() and _tritonservers() == []


def test_race_on_every_attempt_gives_up_after_the_limit(artifact, monkeypatch):
    seen = _failing_run(monkeypatch, RACE_LOG, failures=99)
    monkeypatch.setattr(serve_server, "START_ATTEMPTS", 2)   # the limit is what is tested, not its value
    with pytest.raises(ClipfuseError) as err:
        serve_server.ClipfuseTriton([f"tiny={artifact}"], _options()).start()
    assert len(seen) == 2
    assert str(err.value) == ("Triton did not start: model 'tiny' failed to load: ConnectionRefusedError: "
                              "[Errno 111] Connection refused after 2 attempts (PyTriton's instance start-up "
                              "race; --instances 1 avoids it) (--log-verbose 1 shows the server's log)")
    assert not any(path.exists() for path in seen) and _tritonservers() == []


def test_other_load_failure_is_one_line_and_not_retried(artifact, monkeypatch):
    seen = _failing_run(monkeypatch, OTHER_LOG, failures=99)
    with pytest.raises(ClipfuseError) as err:
        serve_server.ClipfuseTriton([f"tiny={artifact}"], _options()).start()
    assert len(seen) == 1
    assert str(err.value) == ("Triton did not start: model 'tiny' failed to load: ValueError: no GPU for "
                              "this engine (--log-verbose 1 shows the server's log)")
    assert not seen[0].exists() and _tritonservers() == []


def test_load_failure_reads_the_first_failed_model_only():
    assert serve_server.load_failure("I1204 model_lifecycle.cc:472] \"loading: tiny:1\"\n") is None
    two = OTHER_LOG + RACE_LOG.replace("'tiny'", "'other'")
    assert serve_server.load_failure(two) == "model 'tiny' failed to load: ValueError: no GPU for this engine"


def test_only_a_handshake_failure_of_every_failed_instance_is_a_lost_race():
    assert serve_server.lost_handshake_race(RACE_LOG)
    assert not serve_server.lost_handshake_race(OTHER_LOG)      # instance 0's own error: not retried
    assert not serve_server.lost_handshake_race("")


def test_sigterm_while_gevent_waits_interrupts_without_a_traceback():
    """`clipfuse serve` start-up waits in tritonclient's gevent HTTP client; SIGTERM there must
    still interrupt it, and gevent's hub must not print the interruption as a traceback (it did,
    now and then, in test_hardening_serve's SIGTERM-before-ready test)."""
    import subprocess
    import sys

    pytest.importorskip("gevent")
    code = (
        "import os, signal, sys, threading\n"
        "from clipfuse.runtime.serve.server import interrupt_on_sigterm\n"
        "interrupt_on_sigterm()\n"
        "import gevent\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "try:\n"
        "    gevent.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', file=sys.stderr)\n"
        "    sys.exit(130)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.rstrip().endswith("interrupted"), proc.stderr
