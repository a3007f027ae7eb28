"""Every external-data location an ONNX graph names, read from the protobuf wire format.

The run path has no `onnx` package, and onnxruntime opens whatever file a tensor's
`external_data` names (onnx itself had path-traversal CVEs of this kind, CVE-2024-27318 and
CVE-2022-25882). So the bundle loader reads the locations first, with this small walker, and
refuses any that leave the bundle before onnxruntime sees the graph.

The fields walked (onnx/onnx.proto, IR version 10):

    ModelProto         graph = 7, training_info = 20 (TrainingInfoProto: initialization = 1, algorithm = 2)
    GraphProto         node = 1, initializer = 5, sparse_initializer = 15
    NodeProto          attribute = 5
    AttributeProto     t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23
    SparseTensorProto  values = 1, indices = 2
    TensorProto        name = 8, external_data = 13 (StringStringEntryProto: key = 1, value = 2)

Every other field is skipped by its wire type, without decoding. A `location` entry is
reported whatever the tensor's `data_location` says: reporting too many is safe, too few is not.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# wire types
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
MAX_DEPTH = 64  # nested subgraphs (If / Loop / Scan bodies); onnxruntime's own protobuf limit is 100


class GraphParseError(ValueError):
    """The bytes are not a protobuf message (so onnxruntime cannot load them either)."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str  # the initializer's (or attribute tensor's) name
    location: str  # as written in the graph: relative to the graph file's directory


def external_data_refs(path: Path) -> list[ExternalRef]:
    """Every external-data location in the ONNX model at `path`, in file order."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            refs: list[ExternalRef] = []
            view = memoryview(mm)
            try:
                _model(view, refs)
                problem = None
            except GraphParseError as exc:
                problem = str(exc)  # the traceback holds slices of `view`; let it go before release
            view.release()
    if problem is not None:
        raise GraphParseError(problem)
    return refs


def external_data_refs_bytes(data: bytes) -> list[ExternalRef]:
    refs: list[ExternalRef] = []
    _model(memoryview(data), refs)
    return refs


# ------------------------------------------------------------------------------ wire format


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    n = len(buf)
    while True:
        if i >= n:
            raise GraphParseError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise GraphParseError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, wire type, value) over one message; value is an int or a memoryview."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise GraphParseError("field number 0")
        if wire == _VARINT:
            value, i = _varint(buf, i)
        elif wire == _I64:
            value, i = None, i + 8
        elif wire == _I32:
            value, i = None, i + 4
        elif wire == _LEN:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire == _SGROUP:
            value, i = None, _skip_group(buf, i, field)
        else:  # an end-group without its start, or wire types 6 and 7
            raise GraphParseError(f"invalid wire type {wire}")
        if i > n:
            raise GraphParseError("message truncated")
        yield field, wire, value


def _skip_group(buf: memoryview, i: int, field: int) -> int:
    """Skip a (deprecated) group up to its end tag; protobuf skips them in unknown fields too."""
    depth = [field]
    n = len(buf)
    while depth:
        key, i = _varint(buf, i)
        f, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, i = _varint(buf, i)
        elif wire == _I64:
            i += 8
        elif wire == _I32:
            i += 4
        elif wire == _LEN:
            size, i = _varint(buf, i)
            i += size
        elif wire == _SGROUP:
            depth.append(f)
        elif wire == _EGROUP and f == depth[-1]:
            depth.pop()
        else:
            raise GraphParseError(f"invalid wire type {wire} in a group")
        if i > n or len(depth) > MAX_DEPTH:
            raise GraphParseError("group truncated or nested too deep")
    return i


def _messages(buf: memoryview, wanted: int):
    for field, wire, value in _fields(buf):
        if field == wanted and wire == _LEN:
            yield value


# ------------------------------------------------------------------------------ onnx messages


def _model(buf: memoryview, refs: list[ExternalRef]) -> None:
    for field, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if field == 7:  # graph
            _graph(value, refs, 0)
        elif field == 20:  # training_info: initialization and algorithm graphs
            for f, w, v in _fields(value):
                if f in (1, 2) and w == _LEN:
                    _graph(v, refs, 0)


def _graph(buf: memoryview, refs: list[ExternalRef], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise GraphParseError(f"subgraphs nested deeper than {MAX_DEPTH}")
    for field, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if field == 5:  # initializer
            _tensor(value, refs)
        elif field == 15:  # sparse_initializer
            _sparse(value, refs)
        elif field == 1:  # node
            for attr in _messages(value, 5):
                _attribute(attr, refs, depth)


def _attribute(buf: memoryview, refs: list[ExternalRef], depth: int) -> None:
    for field, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if field in (5, 10):  # t, tensors
            _tensor(value, refs)
        elif field in (6, 11):  # g, graphs
            _graph(value, refs, depth + 1)
        elif field in (22, 23):  # sparse_tensor, sparse_tensors
            _sparse(value, refs)


def _sparse(buf: memoryview, refs: list[ExternalRef]) -> None:
    for field, wire, value in _fields(buf):
        if field in (1, 2) and wire == _LEN:  # values, indices
            _tensor(value, refs)


def _tensor(buf: memoryview, refs: list[ExternalRef]) -> None:
    name = ""
    locations = []
    for field, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if field == 8:
            name = _text(value)
        elif field == 13:
            key = val = b""
            for f, w, v in _fields(value):
                if w == _LEN and f == 1:
                    key = bytes(v)
                elif w == _LEN and f == 2:
                    val = bytes(v)
            if key == b"location":
                locations.append(_text(val))
    refs.extend(ExternalRef(name, loc) for loc in locations)


def _text(value) -> str:
    # Invalid UTF-8 stays visible (and can never match a manifest file name).
    return bytes(value).decode("utf-8", errors="backslashreplace")
