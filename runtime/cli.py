"""`clipfuse` console script: one entry point, subcommands implemented in their own modules.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, and
keeps heavy imports (torch, onnx, tensorrt) inside `run`, so `clipfuse --help` and the runtime
commands work on a machine with numpy and an inference backend only.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import List, Optional

from ._version import __version__
from .errors import ClipfuseError

# name -> module; order is the order of `clipfuse --help`.
COMMANDS = {
    "heads": "clipfuse.export.cmd_heads",
    "export": "clipfuse.export.cmd_export",
    "export-text": "clipfuse.export.cmd_export_text",
    "build": "clipfuse.export.cmd_build",
    "doctor": "clipfuse.runtime.cmd_doctor",
    "run": "clipfuse.runtime.cmd_run",
    "compare": "clipfuse.runtime.cmd_compare",
    "bench": "clipfuse.benchmarks.cmd_bench",
    "eval": "clipfuse.runtime.cmd_eval",
    "export-refer": "clipfuse.export.cmd_export_refer",
    "refer": "clipfuse.runtime.cmd_refer",
    "eval-refer": "clipfuse.runtime.cmd_eval_refer",
}

EPILOG = """\
typical flow:
  clipfuse export --head sclip --classes "sky,tree,road" -o engines/sclip   # ONNX + manifest
  clipfuse build engines/sclip.onnx --precision fp16                     # FP16 graph + engine
  clipfuse run engines/sclip.onnx photo.jpg -o out/                        # label maps
run `clipfuse COMMAND --help` for each command's options.
"""


def on_off(text: str) -> bool:
    """argparse type for on/off switches (also true/false, yes/no, 1/0)."""
    low = text.lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipfuse",
        description="Export, build and run training-free open-vocabulary CLIP segmenters "
                    "(MaskCLIP, SCLIP, CLIP-DINOiser, ClearCLIP, NACLIP) as fused ONNX graphs "
                    "and TensorRT engines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"clipfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ClipfuseError as exc:
        print(f"clipfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipfuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: keep it short unless asked
        if os.environ.get("CLIPFUSE_DEBUG"):
            traceback.print_exc()
        else:
            print(f"clipfuse {args.command}: internal error: {type(exc).__name__}: {exc} "
                  f"(set CLIPFUSE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
