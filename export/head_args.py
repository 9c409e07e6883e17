"""Command-line flags of the head parameters, generated from the families' parameter dataclasses
(clipfuse.runtime.methods: a field declared with `param(default, "--flag", help, ...)`).

Torch-free: every command's parser is built for every `clipfuse` call.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Dict, Tuple

from clipfuse.runtime.methods import METHODS


def head_param_types() -> Tuple[type, ...]:
    """The parameter dataclass of every family a method uses, in METHODS order."""
    return tuple(dict.fromkeys(type(m.head_params) for m in METHODS.values()))


def head_flags() -> Dict[str, Tuple[str, dict]]:
    """flag -> (parameter name, its metadata); a flag two families share names the same parameter
    (--gaussian-sigma: self-correlation heads and RCS)."""
    flags: Dict[str, Tuple[str, dict]] = {}
    for params in head_param_types():
        for f in fields(params):
            meta = f.metadata.get("cli")
            if meta is None:
                continue
            seen = flags.setdefault(meta["flag"], (f.name, meta))
            if seen[0] != f.name:
                raise RuntimeError(f"{meta['flag']} names {seen[0]} and {f.name} in two head families")
    return flags


def _dest(flag: str) -> str:
    return "head_" + flag.lstrip("-").replace("-", "_")


def add_head_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per head parameter that declares one; unset = the method's preset."""
    for flag, (_, meta) in head_flags().items():
        if meta["sets"] is not None:
            parser.add_argument(flag, dest=_dest(flag), action="store_true", help=meta["help"])
            continue
        kwargs = {k: meta[k] for k in ("type", "choices", "metavar") if meta[k] is not None}
        if "metavar" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()    # not the prefixed dest
        parser.add_argument(flag, dest=_dest(flag), default=None, help=meta["help"], **kwargs)


def head_overrides(args: argparse.Namespace) -> dict:
    """The head parameters the generated flags set."""
    params = {}
    for flag, (name, meta) in head_flags().items():
        value = getattr(args, _dest(flag))
        if meta["sets"] is not None:
            if value:
                params[name] = meta["sets"]
        elif value is not None:
            params[name] = meta["convert"](value) if meta["convert"] else value
    return params
