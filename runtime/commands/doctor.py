"""`clipfuse doctor`: versions, GPU and what clipfuse can do on this machine."""
from __future__ import annotations

import argparse
import json

ORDER = 50  # place in `clipfuse --help`
HELP = "show versions, GPU, memory and what clipfuse can do on this machine"
DESCRIPTION = """\
Report the versions clipfuse depends on (python, numpy, torch, open_clip, onnx, onnxruntime and its
execution providers, tensorrt, tensorrt_rtx, polygraphy, cuda-python), the NVIDIA driver, the GPU
name and SM (compute capability, part of every engine's name), free GPU and host memory, and which
clipfuse commands work here: which TensorRT flavour can build engines (TensorRT for RTX builds
ahead of time without a GPU, for the compute capabilities it lists) and which can run them.
Nothing is required: missing packages are reported, not raised.

Engines only load where flavour, TensorRT version and SM match the ones in their name: run doctor
on the device before copying an engine over.

examples:
  clipfuse doctor
  clipfuse doctor --json > doctor.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..doctor import collect, format_report

    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
