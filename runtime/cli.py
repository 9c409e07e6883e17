"""`clipfuse` console script: one entry point, subcommands implemented in their own modules.

Each command module registers itself as an entry point in the `clipfuse.commands` group
(pyproject.toml), exposes `HELP` (one line), `ORDER` (its place in --help), `add_arguments(parser)` and
`run(args) -> int`, and keeps heavy imports (torch, onnx, tensorrt) inside `run`, so `clipfuse --help` and the runtime
commands work on a machine with numpy and an inference backend only.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from importlib import metadata
from types import ModuleType
from typing import Dict, List, Optional, Tuple

from ._version import __version__
from .errors import ClipfuseError

# Command modules register themselves under this entry-point group (pyproject.toml), so the
# torch-free runtime never names the export or benchmark packages that depend on it.
ENTRY_POINT_GROUP = "clipfuse.commands"


def registered_commands() -> Dict[str, str]:
    """Subcommand name -> module name, from the installed distributions' entry points."""
    found = metadata.entry_points()
    if hasattr(found, "select"):
        group = found.select(group=ENTRY_POINT_GROUP)
    else:  # Python 3.9: a dict of group -> entry points
        group = found.get(ENTRY_POINT_GROUP, ())
    return {ep.name: ep.value.split(":")[0] for ep in group}


def load_commands() -> List[Tuple[str, ModuleType]]:
    """The importable command modules in `clipfuse --help` order (each module's ORDER, then name).
    A module whose package is not installed (the runtime alone on a Jetson) is left out."""
    commands = []
    for name, module_name in registered_commands().items():
        module = _load(module_name)
        if module is not None:
            commands.append((name, module))
    return sorted(commands, key=lambda item: (getattr(item[1], "ORDER", 1000), item[0]))


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
        # the command's own package is missing (e.g. clipfuse.export not shipped): leave it out
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
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
    commands = load_commands()
    if not commands:  # the package metadata predates the entry points: say how to fix it
        parser.epilog = ("no commands are registered: the installed clipfuse metadata is stale; "
                         "reinstall it (pip install -e . in a checkout)")
    for name, module in commands:
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
