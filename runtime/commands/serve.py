"""`clipfuse serve`: serve clipfuse artifacts from one Triton Inference Server (nvidia-pytriton)."""
from __future__ import annotations

import argparse
import sys

from .. import limits as L
from ..cliargs import port

ORDER = 130  # place in `clipfuse --help`
HELP = "serve graphs/engines over HTTP and gRPC with NVIDIA Triton (dynamic batching)"

DESCRIPTION = """\
Start one Triton Inference Server (the binary bundled with nvidia-pytriton) that serves every
ARTIFACT as a Triton model named after the file (or NAME=PATH) with dynamic batching.

  request   image       UINT8 [1, H, W, 3]   (RGB; Triton's batch axis first)
  response  labels      INT32 [1, H, W]      class index per pixel
            confidence  FP32  [1, H, W]      the winning class's score (probability for cosine heads)
  config    parameters clipfuse_classes (JSON), clipfuse_protocol (JSON), clipfuse_kind, clipfuse_window

Concurrent requests with images of the same size are batched by Triton (up to --max-batch-size,
waiting at most --queue-delay-us); all their windows then go through the backend together, in
calls of at most --window-batch windows (default: the engine's max batch; unlimited for ONNX).
Health: GET /v2/health/ready and /v2/models/NAME/ready; Prometheus metrics on --metrics-port.
Listens on 127.0.0.1 unless --host says otherwise. Requests are checked against the server's
limits (--max-pixels, --max-batch-size) before Triton sees them; errors are one line.
SIGTERM/SIGINT: new requests get 503 at once, the ones in flight finish (up to --drain-timeout s),
then exit 0 (1 when requests had to be cut off). Exit 2 when the Triton server dies.
Nothing is left behind: no process, /dev/shm segment or temporary folder.

examples:
  clipfuse serve engines/sclip.onnx
  clipfuse serve street=engines/sclip.engine indoor=engines/dinoiser.engine --instances 2
  clipfuse serve engines/sclip.onnx --host 0.0.0.0 --http-port 8000 --grpc-port 8001
client:
  import tritonclient.http as http
  c = http.InferenceServerClient("127.0.0.1:8000")
  x = http.InferInput("image", [1, *rgb.shape], "UINT8"); x.set_data_from_numpy(rgb[None])
  labels = c.infer("sclip", [x]).as_numpy("labels")[0]
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..backends.base import backend_help

    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="exported .onnx or built .engine (its .json beside it), optionally NAME=PATH")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address for HTTP, gRPC and metrics (default: %(default)s; 0.0.0.0 = all interfaces)")
    net.add_argument("--http-port", type=port, default=8000, help="(default: %(default)s)")
    net.add_argument("--grpc-port", type=port, default=8001, help="(default: %(default)s)")
    net.add_argument("--metrics-port", type=port, default=8002, help="(default: %(default)s)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--instances", type=L.INSTANCES.option_type(), default=1,
                       help="model instances per artifact, each runs one batch at a time (default: %(default)s)")
    sched.add_argument("--max-batch-size", type=L.MAX_BATCH_SIZE.option_type(), default=8,
                       help="images per Triton batch (default: %(default)s)")
    sched.add_argument("--queue-delay-us", type=L.QUEUE_DELAY_US.option_type(0), default=2000,
                       help="how long Triton holds a request to fill a batch, microseconds (default: %(default)s)")
    sched.add_argument("--window-batch", type=L.WINDOW_BATCH.option_type(), default=None,
                       help="windows per backend call (default: the engine's max batch; all for ONNX)")
    sched.add_argument("--drain-timeout", type=L.DRAIN_TIMEOUT_S.option_type(0), default=30,
                       help="seconds to finish in-flight requests on SIGTERM (default: %(default)s)")
    parser.add_argument("--backend", default="auto",
                        help=backend_help())
    parser.add_argument("--threads", type=L.THREADS.option_type(), default=None, help="ort-cpu: intra-op threads (default: all cores)")
    parser.add_argument("--max-pixels", type=L.SERVE_MAX_PIXELS_CAP.option_type(), default=None,
                        help="refuse larger images with a Triton error (default: 4096 x 4096)")
    parser.add_argument("--log-verbose", type=L.LOG_VERBOSE.option_type(0), default=0, help="Triton's verbose log level (default: 0)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the model files")


def run(args: argparse.Namespace) -> int:
    from ..serve.server import release_resource_tracker

    # PyTriton's shared memory starts multiprocessing's resource tracker in this process; it must
    # not outlive `clipfuse serve`, whichever way serve ends
    try:
        return _serve(args)
    finally:
        release_resource_tracker()


def _serve(args: argparse.Namespace) -> int:
    from ..serve.core import DEFAULT_MAX_PIXELS
    from ..serve.server import ClipfuseTriton, ServeOptions, interrupt_on_sigterm

    # Until the server is ready, SIGTERM interrupts start-up like Ctrl-C: what was started
    # (tritonserver, its stubs, shared memory, the workspace) is stopped and removed on the way out.
    interrupt_on_sigterm()
    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, instances=args.instances,
                           max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                           window_batch=args.window_batch, backend=args.backend, threads=args.threads,
                           max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                           exit_timeout_s=args.drain_timeout, log_verbose=args.log_verbose,
                           verify=not args.no_verify)
    server = ClipfuseTriton(args.artifacts, options)
    server.start()
    names = ", ".join(server.models)
    print(f"clipfuse serve: {names} ready on http://{args.host}:{args.http_port} "
          f"grpc {args.host}:{args.grpc_port} metrics http://{args.host}:{args.metrics_port}/metrics",
          file=sys.stderr, flush=True)
    code = server.serve_forever()
    message = {0: "stopped", 1: f"stopped; requests still running after --drain-timeout {args.drain_timeout} s were cut off",
               2: "error: the Triton server stopped unexpectedly"}[code]
    print(f"clipfuse serve: {message}", file=sys.stderr, flush=True)
    return code
