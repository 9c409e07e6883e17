"""Comparators for `clipfuse compare`: two sets of named outputs in, one verdict per output out.

Kept apart from the runners (any runtime backend produces the outputs; see commands/compare.py), as in
Polygraphy, whose Comparator this follows. Polygraphy's own CompareFunc.simple checks abs/rel
error only; segmentation also needs argmax agreement over the class axis and an explicit NaN/Inf
verdict, and the runtime must stay numpy-only, hence these few lines.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """What one output must satisfy. `min_argmax` is the fraction of positions whose argmax over
    `class_axis` agrees (None: not checked, e.g. feature outputs); NaN/Inf always fail unless
    `allow_nonfinite`."""

    max_abs: float
    min_argmax: Optional[float] = 0.99
    class_axis: int = 1
    allow_nonfinite: bool = False


@dataclass
class OutputComparison:
    name: str
    shape_a: List[int]
    shape_b: List[int]
    max_abs: Optional[float] = None
    mean_abs: Optional[float] = None
    argmax_agreement: Optional[float] = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return dict(asdict(self), passed=self.passed)


def compare_output(name: str, a: np.ndarray, b: np.ndarray, tol: Tolerance) -> OutputComparison:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    result = OutputComparison(name, list(a.shape), list(b.shape))
    if a.shape != b.shape:
        result.failures.append(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
        return result
    fin_a, fin_b = np.isfinite(a), np.isfinite(b)
    result.nonfinite_a, result.nonfinite_b = int((~fin_a).sum()), int((~fin_b).sum())
    if (result.nonfinite_a or result.nonfinite_b) and not tol.allow_nonfinite:
        result.failures.append(f"NaN/Inf: {result.nonfinite_a} in A, {result.nonfinite_b} in B")
    both = fin_a & fin_b
    if both.any():
        diff = np.abs(a[both] - b[both])
        result.max_abs, result.mean_abs = float(diff.max()), float(diff.mean())
        if result.max_abs > tol.max_abs:
            result.failures.append(f"max abs diff {result.max_abs:.3g} > {tol.max_abs:g}")
    if tol.min_argmax is not None and a.ndim > tol.class_axis and a.shape[tol.class_axis] > 1:
        agree = np.argmax(np.nan_to_num(a, nan=-np.inf), axis=tol.class_axis) == \
            np.argmax(np.nan_to_num(b, nan=-np.inf), axis=tol.class_axis)
        result.argmax_agreement = float(agree.mean())
        if result.argmax_agreement < tol.min_argmax:
            result.failures.append(f"argmax agreement {100 * result.argmax_agreement:.3f} % < "
                                   f"{100 * tol.min_argmax:g} %")
    return result


def compare_outputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                    tolerances: Mapping[str, Tolerance], default: Tolerance) -> List[OutputComparison]:
    """One comparison per output name of `a` (an output missing from `b` fails)."""
    results = []
    for name in a:
        if name not in b:
            missing = OutputComparison(name, list(np.shape(a[name])), [])
            missing.failures.append("missing from B")
            results.append(missing)
            continue
        results.append(compare_output(name, a[name], b[name], tolerances.get(name, default)))
    return results


def format_table(results: List[OutputComparison]) -> str:
    def num(x: Optional[float], fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"{'output':<16} {'shape':<18} {'max abs':>10} {'mean abs':>10} {'argmax':>9} {'NaN/Inf':>9}  verdict"]
    for r in results:
        argmax = "-" if r.argmax_agreement is None else f"{100 * r.argmax_agreement:.3f}%"
        verdict = "ok" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(f"{r.name:<16} {'x'.join(map(str, r.shape_a)):<18} {num(r.max_abs, '.3g'):>10} "
                     f"{num(r.mean_abs, '.3g'):>10} {argmax:>9} {r.nonfinite_a + r.nonfinite_b:>9}  {verdict}")
    return "\n".join(lines)


def merge(batches: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Concatenate per-chunk outputs along axis 0."""
    return {name: np.concatenate([b[name] for b in batches], axis=0) for name in batches[0]}
