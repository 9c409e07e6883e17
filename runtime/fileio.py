"""Atomic file writes: an artifact is either complete or absent, never half-written.

Temporaries sit next to their target (so the final rename is atomic) and are named
`.NAME.clipfuse-PID-RANDOM.part`: recognisably ours and tied to the process writing them. A
process killed with SIGKILL cannot clean up, so every write first removes the temporaries of the
SAME target left by processes that no longer run on this machine (never another target's, never
a live writer's).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

TEMP_TAG = ".clipfuse-"
TEMP_SUFFIX = ".part"
# Room for the tag, pid, random part and suffix within the usual 255-byte name limit.
_NAME_ROOM = 180


def temp_prefix(final: PathLike) -> str:
    """Name prefix of every temporary of `final` (`.NAME.clipfuse-`)."""
    return f".{Path(final).name[:_NAME_ROOM]}{TEMP_TAG}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def clean_stale_temporaries(final: PathLike) -> List[Path]:
    """Remove the temporaries of `final` whose writer process is gone; returns what was removed."""
    final = Path(final)
    prefix = temp_prefix(final)
    removed: List[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        # also a temporary OF one of final's temporaries (a step that rewrote a temporary file)
        start = len(prefix) if name.startswith(prefix) else len(prefix) + 1
        if not (name.startswith(prefix) or name.startswith("." + prefix)) or not name.endswith(TEMP_SUFFIX):
            continue
        pid_text = name[start:].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):   # a staging folder (staged_files)
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _new_temp(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(final)}{os.getpid()}-", suffix=TEMP_SUFFIX,
                               dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, final: Path) -> None:
    # mkstemp creates 0600; artifacts get the permissions a plain open() would give
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds.

    The temp file lives in the destination folder so the rename is atomic (same filesystem).
    """
    final = Path(final)
    tmp_path = _new_temp(final)
    try:
        yield tmp_path
        _publish(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final: PathLike, text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


def write_file_set(files: Mapping[PathLike, bytes]) -> None:
    """Write several files as one unit: all of them, or (on any error or Ctrl-C) none.

    Every file is first written to its temporary; only then are they renamed, back to back, in
    the given order (put the file that marks the set complete last). If a rename fails, the ones
    already renamed are removed again, so a reader never finds half a set. (A SIGKILL between two
    renames, a window of microseconds, can still leave the first files of the set; the next write
    replaces them.)
    """
    temps: Dict[Path, Path] = {}
    published: List[Path] = []
    try:
        for final, data in files.items():
            final = Path(final)
            temps[final] = _new_temp(final)
            temps[final].write_bytes(data)
        for final, tmp in temps.items():
            _publish(tmp, final)
            published.append(final)
    except BaseException:
        _unpublish(published)
        raise
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _unpublish(published: Sequence[Path]) -> None:
    """Roll back a set of files of which only some were moved into place: none of it stays."""
    for final in published:
        with contextlib.suppress(OSError):
            final.unlink()


@contextlib.contextmanager
def staged_files(finals: Sequence[PathLike], named_after: "PathLike | None" = None) -> Iterator[Path]:
    """Write several files that only make sense together (a graph and its external-data file,
    their manifest) as one unit, when they must be written UNDER THEIR FINAL NAMES (an ONNX graph
    names its data file, so the pair cannot be renamed temporaries).

    Yields a staging folder next to the final paths (same filesystem, named like a temporary of
    `named_after`, default the first final, so a killed writer's folder is cleaned up by the next write). When the block
    succeeds, each final whose name was written into the folder is moved into place, in the given
    order (put the file that marks the set complete last); a final whose name was NOT written is
    removed (a stale companion of an older version, e.g. a data file the new graph no longer
    needs). Anything else in the folder is discarded with it. On failure nothing is published.
    """
    paths = [Path(f) for f in finals]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise ValueError("staged_files: every final path must be in the same folder")
    owner = Path(named_after) if named_after is not None else paths[0]
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(owner)
    stage = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(owner)}{os.getpid()}-", suffix=TEMP_SUFFIX,
                                  dir=folder))
    published: List[Path] = []
    try:
        yield stage
        for final in paths:
            if (stage / final.name).is_file():
                _publish(stage / final.name, final)
                published.append(final)
        for final in paths:
            if final not in published:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
    except BaseException:
        _unpublish(published)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def ensure_writable_dir(folder: PathLike, what: str = "output folder") -> Path:
    """Create `folder` (with parents) and prove a file can be written in it, before any slow work.

    Raises ClipfuseError with one line when it is a file, under a file, read-only or full.
    """
    from .errors import ClipfuseError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ClipfuseError(f"{what} {folder} is an existing file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".clipfuse-write-test-{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            reason = "a file is in the way of the folder"
        raise ClipfuseError(f"cannot write to {what} {folder}: {reason}") from None
    return folder


@contextlib.contextmanager
def writable_dir(folder: PathLike, what: str = "output folder") -> Iterator[Path]:
    """`ensure_writable_dir` for the length of a command: the folders it had to create are removed
    again when the command fails before writing anything into them (a failed command leaves no
    trace, not even an empty `-o`)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    out = ensure_writable_dir(folder, what)
    try:
        yield out
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty: something was written, keep it
                break
        raise


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
