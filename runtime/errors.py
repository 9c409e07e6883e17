"""One exception type for every user-facing failure.

The CLI prints a ClipfuseError as a single line and exits non-zero; anything else is a bug.
"""


class ClipfuseError(Exception):
    """A failure the user can act on (bad input, missing file, version mismatch, ...)."""
