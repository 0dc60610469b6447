"""Arrow IPC *stream* shards (what `datasets.save_to_disk` writes) without reading their bodies.

A stream is a sequence of messages: `0xFFFFFFFF`, int32 metadata size, a flatbuffer `Message`
(whose `bodyLength` says how many body bytes follow), the body; it ends with `0xFFFFFFFF 0`.
`scan_stream` walks the message headers only (seeking over bodies), so counting the rows of a
490 MB shard, or noticing that it was cut short, costs a few KB of reads, locally or on S3.
`read_small_column` then reads only the buffers of one small column (`id`, `split`), using the
buffer table of each record batch. Whole batches are read with pyarrow's own stream reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pyarrow as pa

CONTINUATION = 0xFFFFFFFF
_SCHEMA, _DICTIONARY, _RECORD_BATCH = 1, 2, 3


class StreamError(ValueError):
    """A stream shard that cannot be used as it is (truncated, not a stream, unsupported)."""


# ---- a minimal flatbuffer table reader (only what Message / RecordBatch need) ------------------
class _Table:
    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt, self.vt_size = vt, struct.unpack_from("<H", buf, vt)[0]

    def _off(self, i: int) -> int:
        at = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vt + at)[0] if at < self.vt_size else 0

    def scalar(self, i: int, fmt: str, default=0):
        o = self._off(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + o)[0] if o else default

    def table(self, i: int) -> "_Table | None":
        o = self._off(i)
        if not o:
            return None
        p = self.pos + o
        return _Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0])

    def structs(self, i: int, fmt: str) -> list[tuple]:
        """A vector of fixed-size structs (FieldNode / Buffer: two int64 each)."""
        o = self._off(i)
        if not o:
            return []
        p = self.pos + o
        p += struct.unpack_from("<I", self.buf, p)[0]
        n, size = struct.unpack_from("<I", self.buf, p)[0], struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, p + 4 + k * size) for k in range(n)]


def _root(meta: bytes) -> _Table:
    return _Table(meta, struct.unpack_from("<I", meta, 0)[0])


# ---- scanning ------------------------------------------------------------------------------------
@dataclass
class Batch:
    body_offset: int                 # absolute file offset of the body
    num_rows: int
    nodes: list[tuple[int, int]]     # (length, null_count) per field, depth-first
    buffers: list[tuple[int, int]]   # (offset in body, length) per buffer, depth-first
    compressed: bool


@dataclass
class StreamInfo:
    schema: pa.Schema
    batches: list[Batch] = field(default_factory=list)
    has_dictionaries: bool = False

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self.batches)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    return bytes(data) if data is not None else b""


def scan_stream(f, size: int, name: str) -> StreamInfo:
    """Headers of every message of a stream file opened as `f` (random access, `size` bytes)."""
    pos, schema, info, k = 0, None, None, -1
    while True:
        k += 1
        f.seek(pos)
        head = _read_exact(f, 8)
        if len(head) < 4:
            raise StreamError(f"source file {name} is truncated: it ends at byte {pos} without the "
                              "end-of-stream marker (an interrupted download or copy?)")
        first = struct.unpack_from("<I", head, 0)[0]
        if first == CONTINUATION:
            if len(head) < 8:
                raise StreamError(f"source file {name} is truncated: cut inside the message header "
                                  f"at byte {pos}")
            meta_len, start = struct.unpack_from("<i", head, 4)[0], pos + 8
        else:                                       # pre-0.15 streams: no continuation marker
            meta_len, start = struct.unpack_from("<i", head, 0)[0], pos + 4
        if meta_len == 0:
            break                                   # end of stream
        if meta_len < 0 or start + meta_len > size:
            if pos == 0:
                raise StreamError(f"source file {name} is not an Arrow IPC stream (bad first "
                                  "message header)")
            raise StreamError(f"source file {name} is truncated: message {k} (at byte {pos}) declares "
                              f"{meta_len} header bytes but the file has {size} bytes")
        f.seek(start)
        meta = _read_exact(f, meta_len)
        try:
            msg = _root(meta)
            kind = msg.scalar(1, "B")
            body_len = msg.scalar(3, "q")
            header = msg.table(2)
        except struct.error:
            raise StreamError(f"source file {name}: unreadable message header at byte {pos}") from None
        body = start + meta_len
        if body + body_len > size:
            raise StreamError(f"source file {name} is truncated: message {k} (at byte {pos}) needs "
                              f"{body_len} body bytes but the file ends {size - body} bytes later "
                              "(an interrupted download or copy?)")
        if kind == _SCHEMA:
            if schema is not None:
                raise StreamError(f"source file {name}: a second schema message at byte {pos}")
            schema = pa.ipc.read_schema(pa.py_buffer(head[:8] + meta if first == CONTINUATION
                                                     else head[:4] + meta))
            info = StreamInfo(schema)
        elif info is None:
            raise StreamError(f"source file {name} is not an Arrow IPC stream (no schema first)")
        elif kind == _DICTIONARY:
            info.has_dictionaries = True
        elif kind == _RECORD_BATCH and header is not None:
            info.batches.append(Batch(body, header.scalar(0, "q"), header.structs(1, "qq"),
                                      header.structs(2, "qq"), header.table(3) is not None))
        pos = body + body_len
    if info is None:
        raise StreamError(f"source file {name} holds no schema (an empty Arrow stream)")
    return info


# ---- reading one small column from the buffer table ----------------------------------------------
def _own_buffers(t: pa.DataType) -> int | None:
    """Buffers a field of type `t` has itself (not its children); None = not handled here."""
    if isinstance(t, pa.ExtensionType):
        return _own_buffers(t.storage_type)
    if pa.types.is_null(t):
        return 0
    if pa.types.is_dictionary(t) or pa.types.is_union(t) or pa.types.is_run_end_encoded(t) or \
            pa.types.is_binary_view(t) or pa.types.is_string_view(t) or \
            pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return None
    if pa.types.is_struct(t) or pa.types.is_fixed_size_list(t):
        return 1
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        return 2
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) or \
            pa.types.is_large_string(t):
        return 3
    return 2                                           # fixed width: validity + values


def _children(t: pa.DataType) -> list[pa.DataType]:
    if isinstance(t, pa.ExtensionType):
        return _children(t.storage_type)
    if pa.types.is_struct(t):
        return [t.field(i).type for i in range(t.num_fields)]
    if pa.types.is_map(t):
        return [pa.struct([t.key_field, t.item_field])]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [t.value_type]
    return []


def _count(t: pa.DataType) -> tuple[int, int] | None:
    """(nodes, buffers) of a whole field subtree."""
    own = _own_buffers(t)
    if own is None:
        return None
    nodes, bufs = 1, own
    for c in _children(t):
        sub = _count(c)
        if sub is None:
            return None
        nodes, bufs = nodes + sub[0], bufs + sub[1]
    return nodes, bufs


def column_layout(schema: pa.Schema, name: str) -> tuple[int, int] | None:
    """(node index, first buffer index) of a top-level primitive/string column, or None."""
    node = buf = 0
    for f in schema:
        if f.name == name:
            t = f.type
            simple = (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
                      or pa.types.is_large_string(t) or pa.types.is_binary(t))
            return (node, buf) if simple else None
        sub = _count(f.type)
        if sub is None:
            return None
        node, buf = node + sub[0], buf + sub[1]
    return None


def read_small_column(f, info: StreamInfo, name: str) -> pa.ChunkedArray | None:
    """Column `name` of every batch, reading only its buffers; None when this reader cannot
    (compressed bodies, dictionary or view types before it): then read whole batches instead."""
    where = column_layout(info.schema, name)
    if where is None or info.has_dictionaries:
        return None
    node_i, buf_i = where
    t = info.schema.field(name).type
    n_bufs = _own_buffers(t)
    chunks = []
    for b in info.batches:
        if b.compressed or node_i >= len(b.nodes) or buf_i + n_bufs > len(b.buffers):
            return None
        length, nulls = b.nodes[node_i]
        bufs = []
        for k, (off, ln) in enumerate(b.buffers[buf_i:buf_i + n_bufs]):
            if ln == 0:
                bufs.append(None if k == 0 else pa.py_buffer(b""))
                continue
            f.seek(b.body_offset + off)
            bufs.append(pa.py_buffer(_read_exact(f, ln)))
        if bufs[0] is None:
            nulls = 0
        try:
            arr = pa.Array.from_buffers(t, length, bufs, null_count=nulls)
            arr.validate(full=True)
        except (pa.ArrowException, ValueError):
            return None
        chunks.append(arr)
    return pa.chunked_array(chunks, type=t)
