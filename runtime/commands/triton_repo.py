"""`clipfuse triton-repo`: write a Triton model repository for a standalone Triton server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import limits as L

ORDER = 140  # place in `clipfuse --help`
HELP = "write a Triton model repository (graph/engine model + Python protocol model) for Triton"

DESCRIPTION = """\
Write a model repository that a standalone Triton Inference Server (NGC container on GPU nodes,
Kubernetes) loads as is. Per ARTIFACT (NAME=PATH to choose the model name):

  NAME           Python backend: the clipfuse protocol (BLS), image [1, H, W, 3] UINT8 ->
                 labels INT32, confidence FP32; class names and protocol in the config parameters
  NAME_windows   the graph: tensorrt_plan (model.plan) for a .engine, onnxruntime_onnx
                 (model.onnx) for a .onnx; max_batch_size = the engine's profile max (or
                 --window-batch), dynamic batching, --instances instances on --device

The Python models carry a copy of clipfuse.runtime (pure Python + numpy). Every config.pbtxt is
checked against Triton's model-config schema (tritonclient's model_config_pb2) before the
repository is moved into place. A TensorRT plan only loads on the GPU model and TensorRT version
it was built with: build it in (or for) the Triton container you deploy.

examples:
  clipfuse triton-repo engines/sclip.engine -o model_repository/
  docker run --gpus all -p 8000:8000 -p 8001:8001 -v $PWD/model_repository:/models \\
      nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models
  clipfuse triton-repo engines/sclip.onnx -o repo_cpu/ --device cpu
  clipfuse triton-repo engines/sclip.onnx -o repo_py/ --windows-backend python   # no ORT backend
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="exported .onnx or built .engine (its .json beside it), optionally NAME=PATH")
    parser.add_argument("-o", "--out", required=True, help="repository folder to create (new or empty)")
    parser.add_argument("--windows-backend", default="auto",
                        choices=["auto", "onnxruntime", "tensorrt", "python"],
                        help="Triton backend of NAME_windows (default: tensorrt for .engine, onnxruntime "
                             "for .onnx; python: clipfuse's own backends in Triton's Python backend)")
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"],
                        help="instance kind of NAME_windows (default: %(default)s)")
    parser.add_argument("--instances", type=L.INSTANCES.option_type(), default=1, help="instances of NAME_windows (default: %(default)s)")
    parser.add_argument("--protocol-instances", type=L.INSTANCES.option_type(), default=1,
                        help="instances of the Python protocol model (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=L.MAX_BATCH_SIZE.option_type(), default=8,
                        help="images per Triton batch of the protocol model (default: %(default)s)")
    parser.add_argument("--window-batch", type=L.WINDOW_BATCH.option_type(), default=None,
                        help="max_batch_size of NAME_windows (default: the engine's profile max; 16 for .onnx)")
    parser.add_argument("--queue-delay-us", type=L.QUEUE_DELAY_US.option_type(0), default=2000,
                        help="dynamic batching queue delay, microseconds (default: %(default)s)")
    parser.add_argument("--max-pixels", type=L.SERVE_MAX_PIXELS_CAP.option_type(), default=None,
                        help="refuse larger images with a Triton error (default: 4096 x 4096)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the model files")


def run(args: argparse.Namespace) -> int:
    from ..errors import ClipfuseError
    from ..serve.core import DEFAULT_MAX_PIXELS
    from ..serve.repository import RepoOptions, write_repository

    if min(args.instances, args.protocol_instances, args.max_batch_size) < 1 or \
            (args.window_batch is not None and args.window_batch < 1):
        raise ClipfuseError("--instances, --protocol-instances, --max-batch-size and --window-batch must be >= 1")
    options = RepoOptions(windows_backend=args.windows_backend, device=args.device,
                          windows_instances=args.instances, protocol_instances=args.protocol_instances,
                          max_batch_size=args.max_batch_size, window_batch=args.window_batch,
                          queue_delay_us=args.queue_delay_us,
                          max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, verify=not args.no_verify)
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
        validate = True
    except ImportError:
        validate = False
        print("clipfuse triton-repo: tritonclient[grpc] is not installed: configs are NOT checked "
              "against Triton's schema (pip install 'clipfuse[serve]')", file=sys.stderr)
    names = write_repository(args.artifacts, Path(args.out), options, validate=validate)
    print(f"clipfuse triton-repo: wrote {', '.join(names)} to {args.out}"
          + (" (configs checked against Triton's model-config schema)" if validate else ""), file=sys.stderr)
    return 0
