"""Dense heads by family, one plugin module per family (see base.py for what a module defines).

What each method is (preset, positional rule, protocol) lives in clipfuse.runtime.methods
(torch-free); this package turns a MethodSpec into a DenseHead through its family's module.

A new family: one module here defining `FAMILY = HeadFamily(...)`, found at import (no list to
edit); its independent reference beside it as `NAME_reference.py`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import METHODS, MethodSpec, get_method

from .base import DenseHead, HeadFamily

# Modules of this package that are not families: the shared base and the references (which the
# exporter never imports; export/reference.py loads them by name).
_NOT_FAMILIES = ("base",)


def _discover() -> Dict[str, HeadFamily]:
    found: Dict[str, HeadFamily] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FAMILIES or info.name.endswith("_reference"):
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, HeadFamily):
            if family.name in found:
                raise RuntimeError(f"two head families named {family.name!r}")
            found[family.name] = family
    return found


FAMILIES: Dict[str, HeadFamily] = _discover()
_missing = sorted({m.head_family for m in METHODS.values()} - set(FAMILIES))
if _missing:
    raise RuntimeError(f"methods name head families without a module in clipfuse.export.heads: {_missing}")


def family_of(method: str) -> HeadFamily:
    return FAMILIES[get_method(method).head_family]


def merged_head_params(method: MethodSpec, params: Optional[dict] = None) -> dict:
    """The method's preset with `params` applied; unknown names are a ClipfuseError."""
    merged = method.default_head_params()
    unknown = set(params or {}) - set(merged)
    if unknown:
        raise ClipfuseError(f"head {method.name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                            f"it takes: {', '.join(merged)}")
    merged.update(params or {})
    return merged


def typed_params(family: HeadFamily, params: Mapping[str, Any]) -> Any:
    """`params` (a preset, overrides applied, or a manifest's head.params) as the family's dataclass;
    keys that are not parameters (a manifest's derived constants) are left out."""
    names = {f.name for f in fields(family.params)}
    return family.params(**{k: v for k, v in params.items() if k in names})


def build_dense_head(method: str, visual: nn.Module, grid: Tuple[int, int], params: Optional[dict] = None,
                     heads_checkpoint: Optional[str] = None, seed: int = 0) -> Tuple[DenseHead, dict]:
    """Instantiate `method`'s DenseHead on `visual`'s weights; `params` override the method's preset.

    Returns the head and a dict describing its weights source (for the manifest).
    """
    spec = get_method(method)
    family = FAMILIES[spec.head_family]
    return family.build(visual, grid, typed_params(family, merged_head_params(spec, params)), heads_checkpoint, seed)
