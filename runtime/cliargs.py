"""argparse types shared by every command (runtime and export import them; this module imports
nothing of clipfuse, so there is no cycle).

A numeric option is checked when the command line is parsed: NaN, infinities and values outside
the option's range are refused with one line (exit 2), before any model is loaded. A value that
"falls back" silently (0 threads, a negative long-side cap) gives results the user did not ask
for, so there is no fallback: the message says the range instead.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def on_off(text: str) -> bool:
    """argparse type for on/off switches (also true/false, yes/no, 1/0)."""
    low = text.lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _bounds_text(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def int_range(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (None = unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(low, high, False, False)}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in "invalid <type> value" messages
    return parse


def float_range(low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a FINITE float in the range (open or closed at each end)."""
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(
                f"must be {_bounds_text(low, high, low_open, high_open)}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


# The ranges clipfuse's options use; one name per meaning so every command says the same thing.
positive_int = int_range(1)                    # counts, sizes, batches, threads
non_negative_int = int_range(0)                # seeds, warm-up calls
fraction = float_range(0.0, 1.0)               # thresholds and mixing weights in [0, 1]
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)
opset = int_range(17, 30)                      # LayerNormalization needs 17; 30 is far past ONNX today
pixels = int_range(1, 16384)                   # short side, long-side cap, stride
port = int_range(0, 65535)                     # 0: let the OS pick (tests)
logit_scale = float_range(0.0, 1000.0, low_open=True)  # <= 0 inverts or flattens the ranking


def block_indices(text: str) -> tuple:
    """Comma-separated 0-based block indices, e.g. "5,6,7,8"."""
    try:
        blocks = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None
    if not blocks or min(blocks) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative block indices, got {text!r}")
    return blocks


class ScriptParser(argparse.ArgumentParser):
    """ArgumentParser for the `python -m clipfuse...` scripts: usage errors are one line (exit 2),
    as in the `clipfuse` command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
