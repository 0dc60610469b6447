"""Every table of the pipeline: names, Arrow types, keys and partition columns.

One module owns the schemas so that stages, tests and users reading the Parquet files with plain
pyarrow agree on what a column means. Tensor columns use Arrow's canonical fixed-shape tensor
type (tokens) or fixed-size lists (embeddings) so that files read back without Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class TableSpec:
    """A table: its full Arrow schema, key, partition columns and `optional` columns.

    `optional` columns are nullable extras (e.g. what an importer keeps from a public release)
    that writers may leave out: `columns` lists the required ones, `conform` fills a missing
    optional column with nulls, so every file written through `conform` has the full schema.
    """
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        """The required columns (every writer provides them)."""
        return [n for n in self.schema.names if n not in self.optional]

    @property
    def all_columns(self) -> list[str]:
        return self.schema.names


POSITIVES = TableSpec(
    "positives",
    pa.schema([
        ("id", pa.string()), ("view", pa.int8()), ("split", pa.string()),
        ("category", pa.string()), ("description", pa.string()), ("prompt", pa.string()),
        ("image", pa.binary()), ("mask", pa.binary()),
        # kept from a public release (nearid.importers); null for synthetic-world rows:
        # source_row = 0-based row position in the source split (what split files index),
        # source_id / objaverse_id / quality = the release's `id`, `objaverse_id`, `quality`
        ("source_row", pa.int64()), ("source_id", pa.string()), ("objaverse_id", pa.string()),
        ("quality", pa.string()),
    ]),
    key=("id", "view"), partition_by=("split",),
    optional=("source_row", "source_id", "objaverse_id", "quality"),
)

DISTRACTORS = TableSpec(
    "distractors",
    pa.schema([
        ("id", pa.string()), ("view", pa.int8()), ("setting", pa.string()), ("split", pa.string()),
        ("image", pa.binary()), ("prompt", pa.string()), ("generator", pa.string()),
        ("seed", pa.int64()), ("status", pa.string()),
    ]),
    key=("id", "view", "setting"), partition_by=("setting",),
)

SIMS = TableSpec(
    "sims",
    pa.schema([
        ("id", pa.string()), ("setting", pa.string()), ("split", pa.string()),
        ("sim_01", pa.float64()), ("sim_02", pa.float64()), ("sim_12", pa.float64()),
        ("cross_00", pa.float64()), ("cross_11", pa.float64()), ("cross_22", pa.float64()),
    ]),
    key=("id", "setting"),
)

REJECTS = TableSpec(
    "rejects",
    pa.schema([
        ("stage", pa.string()), ("key", pa.string()), ("reason", pa.string()),
    ]),
    key=("stage", "key"),
)

# MTG-style part edits: two views of one object, each with one part edited in place.
MTG = TableSpec(
    "mtg",
    pa.schema([
        ("id", pa.string()), ("split", pa.string()),
        ("image_1", pa.binary()), ("image_2", pa.binary()),
        ("image_1p", pa.binary()), ("image_2p", pa.binary()),
        ("oracle1", pa.float64()), ("oracle2", pa.float64()),
    ]),
    key=("id",),
)

# DreamBench++-style graded pairs: a reference, a generated image and two human rating groups.
GRADED = TableSpec(
    "graded",
    pa.schema([
        ("id", pa.string()), ("method", pa.string()), ("category", pa.string()),
        ("prompt", pa.string()), ("reference", pa.binary()), ("generated", pa.binary()),
        ("rating_g1", pa.float64()), ("rating_g2", pa.float64()),
    ]),
    key=("id", "method", "prompt"),
)

FEATURE_KEY = ("id", "view", "source")
FEATURE_META = [("id", pa.string()), ("view", pa.int8()), ("source", pa.string()),
                ("split", pa.string())]


def tokens_type(num_tokens: int, dim: int) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), (num_tokens, dim))


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def features_schema(num_tokens: int | None, dim: int | None, embedding_dim: int | None) -> pa.Schema:
    """Features carry `tokens` [T, D] fp16 for training and/or a pooled `embedding` for evaluation."""
    fields = list(FEATURE_META)
    if num_tokens is not None:
        fields.append(("tokens", tokens_type(num_tokens, dim)))
    if embedding_dim is not None:
        fields.append(("embedding", embedding_type(embedding_dim)))
    return pa.schema(fields)


FEATURES = TableSpec("features", features_schema(None, None, None), key=FEATURE_KEY,
                     partition_by=("source",))


def items_table(input_mode: str, split: str) -> str:
    """The name of one split's items table: `items_tokens_train`, `items_images_val`, ..."""
    return f"items_{input_mode}_{split}"


def items_schema(input_mode: str = "tokens", n_slots: int | None = None,
                 token_size: int | None = None) -> pa.Schema:
    """Training items (`nearid.training.items`): one row per identity, `n_slots` = sources x views.
    `valid` [n_slots] int8 marks the slots that hold a view; `tokens` (input mode "tokens") is every
    slot's [T, D] fp16 tokens in one plain fixed-size list of n_slots*T*D (`flatten_tokens`; Ray's
    shuffle and batching handle it everywhere), `images` (input mode "images") every slot's encoded
    bytes (b"" where `valid` is 0)."""
    fields = [("id", pa.string()), ("split", pa.string()),
              ("valid", pa.list_(pa.int8(), n_slots) if n_slots else pa.list_(pa.int8()))]
    if input_mode == "tokens":
        fields.append(("tokens", pa.list_(pa.float16(), token_size) if token_size else pa.list_(pa.float16())))
    else:
        fields.append(("images", pa.list_(pa.binary())))
    return pa.schema(fields)


# `items_<input mode>_<split>` (see `items_table`); the schema here is the tokens mode's, sizes open
ITEMS = TableSpec("items", items_schema(), key=("id",))

TABLES = {t.name: t for t in (POSITIVES, DISTRACTORS, SIMS, REJECTS, MTG, GRADED, FEATURES, ITEMS)}


def check_columns(table: pa.Table, spec: TableSpec, where: str = "") -> None:
    """Refuse a table that lacks any column of `spec`, naming the columns and the file."""
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        place = f" in {where}" if where else ""
        raise ValueError(f"table '{spec.name}'{place} is missing columns {missing}; "
                         f"expected {spec.columns}")


def conform(table: pa.Table, spec: TableSpec) -> pa.Table:
    """Select and cast the columns of `spec` (fixed metadata columns only), keeping tensor columns;
    optional columns the table lacks are added as nulls."""
    check_columns(table, spec)
    for c in spec.optional:
        if c not in table.column_names:
            table = table.append_column(spec.schema.field(c), pa.nulls(table.num_rows,
                                                                       spec.schema.field(c).type))
    fields = []
    for f in spec.schema:
        fields.append(f)
    extra = [table.schema.field(c) for c in table.column_names
             if c not in spec.columns and c in ("tokens", "embedding")]
    schema = pa.schema(fields + extra)
    return table.select(schema.names).cast(schema)


def tensor_column(values: np.ndarray) -> pa.Array:
    """[N, T, D] -> canonical fixed-shape tensor array (fp16)."""
    values = np.ascontiguousarray(values, dtype=np.float16)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(values)


def embedding_column(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float32)
    n, d = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d)


def flatten_tokens(values):
    """Tokens in the items encoding: one plain fixed-size list of fp16 per row.

    `values` is a numpy array [N, ...] of any trailing shape ([N, T, D] features, [N, slots, T, D]
    items) or a canonical tensor column (the features' `tokens`), relabelled without a copy and
    without its empty chunks (Ray's hash shuffle cannot build empty tensor-extension columns); a
    column that already is a plain list comes back as it is. `unflatten_tokens` is the inverse."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if not isinstance(values.type, pa.FixedShapeTensorType):
            return values
        n = int(np.prod(values.type.shape))
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        plain = [pa.FixedSizeListArray.from_arrays(c.storage.flatten(), n) for c in chunks if len(c)]
        if isinstance(values, pa.Array):
            return plain[0] if plain else pa.array([], pa.list_(pa.float16(), n))
        return pa.chunked_array(plain, type=pa.list_(pa.float16(), n))
    values = np.ascontiguousarray(values, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(values.shape[1:])))


def unflatten_tokens(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Tokens back as numpy [N, *shape] from either encoding (`flatten_tokens`' plain lists or a
    tensor column); `shape` may hold one -1; None keeps the column's own row shape."""
    values = column_to_numpy(col)
    return values if shape is None else values.reshape(values.shape[0], *shape)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Read a tokens/embedding column back as one numpy array [N, ...] with plain pyarrow."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return np.stack([np.asarray(x, dtype=np.float32) for x in col.to_pylist()])
    raise TypeError(f"column of type {col.type} is not a tensor or embedding column")


def make_key(**parts) -> str:
    """A reject key such as `id=syn-000001/view=2/setting=flux` (stable, human readable)."""
    return "/".join(f"{k}={v}" for k, v in parts.items())
