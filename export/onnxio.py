"""Reading and writing ONNX graphs of any size: one file when it fits, graph + one data file when not.

Protobuf cannot serialise a message of 2 GiB or more, so a graph whose weights exceed that (ViT-H/14
in FP32: 2.5 GB) keeps its tensors in ONNX *external data*. clipfuse writes exactly one data file,
`NAME.onnx.data`, beside `NAME.onnx` (the graph names it by that relative file name, so the two are
moved and copied together, never renamed apart), and records it in the manifest:

    onnx_data_file     "NAME.onnx.data"   (absent for a single-file graph)
    onnx_data_sha256   its SHA-256
    onnx_data_bytes    its size (checked even when hashing is skipped)

The opener (clipfuse.runtime.artifact) refuses a graph whose data file is missing or altered.
Every writer of a graph goes through `save_model` inside a staging folder
(clipfuse.runtime.fileio.staged_files), so graph, data file and manifest land together or not at
all; a graph that fits again (the FP16 graph of a tower whose FP32 graph did not) is written as
one file, and a data file left from an earlier, bigger version is removed.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from clipfuse.runtime.fileio import sha256_file, staged_files

# Tensor bytes above which a graph is written with external data. Protobuf's hard limit is 2 GiB
# (onnx.checker.MAXIMUM_PROTOBUF); the margin leaves room for the graph's own structure (node
# protos, names, metadata). Tests lower it to exercise the external-data path on tiny towers.
SINGLE_FILE_LIMIT = 2 ** 31 - 2 ** 27
# Tensors smaller than this stay inside the graph even when the rest goes to the data file
# (shape constants and scalars: the graph stays readable without its data file).
EXTERNAL_MIN_BYTES = 1024
DATA_SUFFIX = ".data"


def data_file_for(onnx_path: "str | Path") -> Path:
    """`dir/NAME.onnx` -> `dir/NAME.onnx.data`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + DATA_SUFFIX)


def graph_content_sha256(onnx_path: "str | Path") -> Tuple[str, Optional[str], str]:
    """(graph file hash, data file hash or None, content hash) of `onnx_path`. The content hash names
    what the graph computes: the file's own hash when the weights are inside it, else a hash over
    both file hashes (weights changed in NAME.onnx.data alone must change it)."""
    import hashlib
    onnx_sha = sha256_file(onnx_path)
    data = data_file_for(onnx_path)
    if not data.is_file():
        return onnx_sha, None, onnx_sha
    data_sha = sha256_file(data)
    return onnx_sha, data_sha, hashlib.sha256(f"{onnx_sha}:{data_sha}".encode()).hexdigest()


def tensor_bytes(model) -> int:
    """Bytes of the graph's initializers and Constant-node tensors (what makes a graph big)."""
    total = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += _tensor_nbytes(attr.t)
    return total


def _tensor_nbytes(tensor) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    import numpy as np
    from onnx import helper
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:       # strings and exotic types: small in clipfuse's graphs
        itemsize = 1
    return count * itemsize


def load_model(path: "str | Path"):
    """onnx.load with the external data (if any) read from beside the graph."""
    import onnx
    return onnx.load(str(path), load_external_data=True)


def save_model(model, path: "str | Path") -> Optional[Path]:
    """Write `model` to `path` (a path in a staging folder: this is not atomic by itself).

    One file when its tensors fit under SINGLE_FILE_LIMIT, else the graph plus `NAME.onnx.data`
    (all tensors of EXTERNAL_MIN_BYTES or more, in one file). Returns the data file, or None. The
    model's tensors are moved out of memory when they go to the data file (it is consumed).
    """
    import onnx
    path = Path(path)
    data = data_file_for(path)
    data.unlink(missing_ok=True)        # onnx appends to an existing data file
    if tensor_bytes(model) <= SINGLE_FILE_LIMIT:
        write_proto_streamed(model, path)
        return None
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=EXTERNAL_MIN_BYTES, convert_attribute=True)
    return data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, size: int) -> bytes:
    """Tag and length of a length-delimited field `number` whose payload has `size` bytes."""
    return _varint(number << 3 | 2) + _varint(size)


# field numbers in onnx.proto (ModelProto.graph, GraphProto.initializer)
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


def write_proto_streamed(model, path: "str | Path") -> None:
    """Write `model` (single file) byte for byte as `model.SerializeToString()` would, one
    initializer at a time: SerializeToString builds the whole file in memory (in a growing buffer,
    then copied into a bytes object), 3-4x the graph, which made the save the export's peak. Protobuf writes fields in field-number order, so the file is the fields before the
    graph, the graph (its fields before the initializers, each initializer, the fields after), then
    the fields after the graph; tests/test_lean_export.py checks the bytes against SerializeToString."""
    def part(message, keep) -> bytes:
        # a copy of `message` with only the fields `keep` selects (never the initializers)
        view = type(message)()
        for field, value in message.ListFields():
            if keep(field.number):
                if hasattr(value, "extend"):               # a repeated field
                    getattr(view, field.name).extend(value)
                elif field.message_type is not None:
                    getattr(view, field.name).CopyFrom(value)
                else:
                    setattr(view, field.name, value)
        return view.SerializeToString()

    graph = model.graph
    head = part(model, lambda n: n < _MODEL_GRAPH)
    tail = part(model, lambda n: n > _MODEL_GRAPH)
    graph_head = part(graph, lambda n: n < _GRAPH_INITIALIZER)
    graph_tail = part(graph, lambda n: n > _GRAPH_INITIALIZER)
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_size = len(graph_head) + len(graph_tail) + sum(len(_len_field(_GRAPH_INITIALIZER, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(head)
        if model.HasField("graph"):
            f.write(_len_field(_MODEL_GRAPH, graph_size))
            f.write(graph_head)
            for tensor, size in zip(graph.initializer, sizes):
                f.write(_len_field(_GRAPH_INITIALIZER, size))
                f.write(tensor.SerializeToString())
            f.write(graph_tail)
        f.write(tail)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim): between export
    stages the allocator otherwise keeps the pages of a released model, and the next stage's
    peak stacks on them. A no-op where there is no glibc."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_model(path: "str | Path") -> None:
    """onnx.checker on the file (by path: works for graphs with external data too)."""
    import onnx
    onnx.checker.check_model(str(path))


def record_files(manifest: dict, onnx_path: "str | Path", data: Optional[Path] = None) -> None:
    """Put the graph's (and its data file's) name, hash and size into `manifest`; drop data fields
    that a copied manifest may carry from a graph that had a data file."""
    onnx_path = Path(onnx_path)
    manifest.update(onnx_file=onnx_path.name, onnx_sha256=sha256_file(onnx_path))
    for key in ("onnx_data_file", "onnx_data_sha256", "onnx_data_bytes"):
        manifest.pop(key, None)
    if data is not None:
        manifest.update(onnx_data_file=data.name, onnx_data_sha256=sha256_file(data),
                        onnx_data_bytes=data.stat().st_size)


@contextlib.contextmanager
def staged_graph(onnx_path: "str | Path", *extra_finals: Path) -> Iterator[Path]:
    """Yield the staging path of `onnx_path` (its final name inside a staging folder); on success
    the data file (if one was written), the graph and `extra_finals` (in that order) are published
    together, and a stale data file beside the destination is removed."""
    onnx_path = Path(onnx_path)
    with staged_files([data_file_for(onnx_path), onnx_path, *extra_finals], named_after=onnx_path) as stage:
        yield stage / onnx_path.name


def write_model(model, onnx_path: "str | Path") -> Tuple[Path, Optional[Path]]:
    """save_model + checker, atomically at `onnx_path` (graph and data file together)."""
    onnx_path = Path(onnx_path)
    with staged_graph(onnx_path) as tmp:
        data = save_model(model, tmp)
        check_model(tmp)
    return onnx_path, (data_file_for(onnx_path) if data is not None else None)


def file_sizes(onnx_path: "str | Path") -> Dict[str, int]:
    """{"onnx": bytes, "data": bytes (0 when single-file)} of a written graph."""
    onnx_path = Path(onnx_path)
    data = data_file_for(onnx_path)
    return {"onnx": onnx_path.stat().st_size, "data": data.stat().st_size if data.is_file() else 0}
