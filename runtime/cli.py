"""`clipfuse` console script: one entry point, subcommands implemented in their own modules.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, and
keeps heavy imports (torch, onnx, tensorrt) inside `run`, so `clipfuse --help` and the runtime
commands work on a machine with numpy and an inference backend only.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from typing import List, Optional

from ._version import __version__
from .cliargs import on_off  # noqa: F401  (re-export: command modules imported it from here)
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
    "serve": "clipfuse.runtime.cmd_serve",
    "triton-repo": "clipfuse.runtime.cmd_triton_repo",
    "bench-serve": "clipfuse.benchmarks.cmd_bench_serve",
}

EPILOG = """\
typical flow:
  clipfuse export --head sclip --classes "sky,tree,road" -o engines/sclip   # ONNX + manifest
  clipfuse build engines/sclip.onnx --precision fp16                     # FP16 graph + engine
  clipfuse run engines/sclip.onnx photo.jpg -o out/                        # label maps
run `clipfuse COMMAND --help` for each command's options.
"""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are ONE line on stderr (exit 2), like every other user
    error; the usage itself is one `--help` away. Subcommand parsers inherit this class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        # argparse drops a '--' value (`--limit=--`) without calling the type: [] instead of a number
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.nargs is None and action.type is not None and isinstance(value, list):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one value")
        return namespace, extras


# OSErrors that describe the user's files or disk, not a bug (exit 2 with one line, not 3).
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
               errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTEMPTY}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help/--version (0): main returns exit codes
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ClipfuseError as exc:
        print(f"clipfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            return _internal_error(args.command, exc)
        # the file system said no (read-only, full, not a folder...): the user can act on that
        where = f" {exc.filename}" if exc.filename else ""
        print(f"clipfuse {args.command}: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipfuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _internal_error(args.command, exc)


def _internal_error(command: str, exc: BaseException) -> int:
    """A bug, not bad input: keep it short unless asked."""
    if os.environ.get("CLIPFUSE_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    else:
        print(f"clipfuse {command}: internal error: {type(exc).__name__}: {exc} "
              f"(set CLIPFUSE_DEBUG=1 for the traceback)", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
