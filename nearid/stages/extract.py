"""Stage `extract`: frozen backbone (or a trained NearID model) over Ray Data into `features`.

A CPU stage decodes and preprocesses with the model's own image processor; a fixed actor pool
runs the model (loaded once per actor); rows come out keyed by (id, view, source) with fp16
`tokens` [T, D] for training and pooled embeddings (`embedding` + `emb_<readout>`) for evaluation.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..backbones.core import processor_from_spec, torch_dtype
from ..backbones.dispatch import backbone_kwargs, load_backbone, processor_for, token_shape_for
from ..config import BackboneConfig
from ..devices import to_host
from ..images import BadImage, decode_image
from ..io.manifest import stage_leases
from ..io.storage import StorageRefused  # noqa: F401 (raised here; re-exported)
from ..raytools import fault_point, record_placement, write_dataset
from ..schema import FEATURE_KEY, REJECTS, embedding_column, make_key, tensor_column
from ..sources import available, scan

log = logging.getLogger("nearid.extract")




def load_scorer(ecfg, device: str = "cpu"):
    """(backbone, model or None): a NearID model dir wins over the configured backbone."""
    from ..model import NearIDModel

    dtype = torch_dtype(ecfg.backbone.dtype) if device != "cpu" else None
    if ecfg.model_dir:
        model = NearIDModel.from_pretrained(ecfg.model_dir, device=device, dtype=dtype)
        return model.backbone, model
    b = ecfg.backbone
    return load_backbone(b.name, dtype=dtype, device=device, **backbone_kwargs(b)), None


def build_processor(ecfg):
    """Only the image processor, for the CPU stage (never the model weights)."""
    if ecfg.model_dir:
        import json

        from ..model import resolve_model_dir
        from ..released import is_released_config, released_processor

        directory = resolve_model_dir(ecfg.model_dir)  # local, s3:// or a hub id, as the model loads
        conf = json.loads((directory / "config.json").read_text())
        if is_released_config(conf):  # the released NearID checkpoint: its preprocessor_config.json
            return released_processor(directory, conf)
        conf = conf["backbone"]
        if "image_processor" in conf:
            return processor_from_spec(conf["image_processor"])
        return processor_for(conf["name"], conf.get("tiny_overrides") or {})
    return processor_for(ecfg.backbone.name, ecfg.backbone.tiny)


def token_shape(ecfg) -> tuple[int, int]:
    """(T, D) of the backbone's tokens from its config and processor alone: the estimate before a
    run must not load the weights on the driver (the actors load them)."""
    return token_shape_for(ecfg.backbone.name, ecfg.backbone.tiny, build_processor(ecfg))


class Decode:
    """CPU stage: bytes -> pixel_values (float32 [3, S, S]); undecodable rows are flagged."""

    def __init__(self, ecfg_json: str):
        from ..config import ExtractConfig

        self.processor = build_processor(ExtractConfig.model_validate_json(ecfg_json))

    def __call__(self, batch: pa.Table) -> dict:
        rows = batch.to_pylist()
        imgs, errors = [], []
        for r in rows:
            try:
                imgs.append(decode_image(r["image"], f"{r['source']} id={r['id']} view={r['view']}"))
                errors.append("")
            except BadImage as e:
                imgs.append(None)
                errors.append(str(e))
        good = [im for im in imgs if im is not None]
        pix = self.processor(images=good, return_tensors="np")["pixel_values"] if good else None
        shape = pix.shape[1:] if pix is not None else (3, 1, 1)
        out = np.zeros((len(rows), *shape), dtype=np.float32)
        j = 0
        for i, im in enumerate(imgs):
            if im is not None:
                out[i] = pix[j]
                j += 1
        return {"id": np.array([r["id"] for r in rows], dtype=object),
                "view": np.array([r["view"] for r in rows], dtype=np.int8),
                "source": np.array([r["source"] for r in rows], dtype=object),
                "split": np.array([r["split"] for r in rows], dtype=object),
                "pixel_values": out, "error": np.array(errors, dtype=object)}


class Embed:
    """Actor stage: the model loads once; pixel batches in, token/embedding rows out."""

    def __init__(self, ecfg_json: str, write_tokens: bool):
        import torch

        from ..config import ExtractConfig

        ecfg = ExtractConfig.model_validate_json(ecfg_json)
        self.device = "cuda" if torch.cuda.is_available() and ecfg.gpus_per_actor > 0 else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(round(ecfg.cpus_per_actor))))
        record_placement("extract")   # first: a slow model load must not hide where the actor runs
        self.backbone, self.model = load_scorer(ecfg, self.device)
        self.readouts = [] if self.model is not None else list(ecfg.readouts)
        self.write_tokens = write_tokens and self.model is None

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors])
        n = len(errors)
        cols: dict[str, pa.Array] = {
            "id": pa.array(list(batch["id"]), pa.string()), "view": pa.array(batch["view"], pa.int8()),
            "source": pa.array(list(batch["source"]), pa.string()),
            "split": pa.array(list(batch["split"]), pa.string()),
            "error": pa.array(errors, pa.string())}
        pix = torch.tensor(np.asarray(batch["pixel_values"])[ok]) if ok.any() else None
        with torch.no_grad():
            tokens = self.backbone.tokens(pix) if pix is not None else None
            embs: dict[str, np.ndarray] = {}
            if tokens is not None:
                if self.model is not None:
                    embs["nearid"] = to_host(self.model.embed_tokens(tokens.to(self.model.head.probe.dtype)))
                else:
                    ro = self.backbone.readouts(tokens=tokens)
                    missing = [r for r in self.readouts if r not in ro]
                    if missing:
                        raise ValueError(f"readouts {missing} not available for backbone "
                                         f"{self.backbone.name}; it has {sorted(ro)}")
                    embs = {r: to_host(torch.nn.functional.normalize(ro[r].float(), dim=-1))
                            for r in self.readouts}

        def full(arr: np.ndarray) -> np.ndarray:
            out = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            out[ok] = arr
            return out

        names = ["nearid"] if self.model is not None else self.readouts
        dim = self.backbone.hidden_size
        for k, name in enumerate(names):
            arr = full(embs[name]) if tokens is not None else np.zeros((n, dim), np.float32)
            col = embedding_column(arr)
            if k == 0:
                cols["embedding"] = col
            cols[f"emb_{name}"] = col
        if self.write_tokens:
            t = to_host(tokens) if tokens is not None else None
            shape = (self.backbone.num_tokens, dim)
            cols["tokens"] = tensor_column(full(t) if t is not None else np.zeros((n, *shape), np.float16))
        return pa.table(cols)


def pool_shape(e, resources: dict) -> dict:
    """Actor counts for the cluster at hand: model actors one per GPU (num_actors 0) or as
    configured; decode actors up to what the CPUs left over by the model actors allow."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    model = e.num_actors or (max(1, int(gpus // e.gpus_per_actor)) if e.gpus_per_actor > 0 else 1)
    free = max(e.decode_cpus, cpus - model * e.cpus_per_actor - 0.5)   # 0.5: read/write tasks
    # decode/resize costs ~1/10 of a CPU forward pass: one decoder per CPU model actor keeps it fed,
    # and every extra one only takes CPU (its start-up: a process importing transformers) from the
    # model (bench.bench_extract). A GPU eats images far faster than one decoder makes them: up to 4.
    per_model = 4 if e.gpus_per_actor > 0 else 1
    decode = e.decode_actors or max(1, min(per_model * model, int(free // e.decode_cpus)))
    return {"model_actors": model, "decode_actors": decode}


def estimate_bytes(n_rows: int, num_tokens: int, dim: int) -> int:
    return n_rows * num_tokens * dim * 2


def run_extract(cfg, storage, ray, out_table: str | None = None, chunk_rows: int = 4000,
                allow_large: bool | None = None) -> dict:
    """Extract what is missing, holding the lease of `out_table` from reading its keys to the end.
    out_table: default `features`, or `embeddings` with `extract.model_dir` (a trained model's
    embeddings only). Over `extract.max_storage_gb` it raises `StorageRefused` (entry points: exit 3)."""
    out_table = out_table or default_out_table(cfg)
    with stage_leases(storage, cfg, "extract", {out_table: FEATURE_KEY}):
        return _run_extract(cfg, storage, ray, out_table, chunk_rows, allow_large)


def default_out_table(cfg) -> str:
    return "embeddings" if cfg.extract.model_dir else "features"


def _run_extract(cfg, storage, ray, out_table: str, chunk_rows: int, allow_large: bool | None) -> dict:
    e = cfg.extract
    t0 = time.time()
    _check_same_scorer(storage, out_table, e)
    sources = available(storage, cfg)
    done = storage.keys(out_table, FEATURE_KEY)
    # a keys-only pass: counts for the size check and the reconcile; image bytes are read below,
    # a chunk at a time, so the driver's memory does not grow with the run
    n_input, n_todo = {}, 0
    for src in sources:
        n_input[src] = 0
        for t in scan(storage, src, e.splits, with_image=False):
            n_input[src] += t.num_rows
            n_todo += int(pc.sum(_pending(t, done)).as_py() or 0)
    write_tokens = e.write_tokens and not e.model_dir
    if write_tokens and n_todo:
        T, D = token_shape(e)
        est = estimate_bytes(n_todo, T, D)
        print(f"extract: {n_todo} images x {T} tokens x {D} dims x 2 bytes = {est / 1e9:.3f} GB of tokens")
        if est > e.max_storage_gb * 1e9 and not (allow_large if allow_large is not None else e.allow_large):
            raise StorageRefused(f"token cache of {est / 1e9:.1f} GB exceeds extract.max_storage_gb="
                                 f"{e.max_storage_gb}; pass --set extract.allow_large=true to proceed")
    # every source in one pipeline per chunk: actor pools start once, not once per source
    for n_chunk, sub in enumerate(_pending_chunks(storage, sources, e.splits, done, chunk_rows), 1):
        shape = pool_shape(e, ray.cluster_resources())
        nblocks = max(1, min(shape["model_actors"] * 4 + shape["decode_actors"], sub.num_rows // max(1, e.batch_size)))
        ds = ray.data.from_arrow(sub).repartition(nblocks)
        ds = ds.map_batches(Decode, fn_constructor_args=(e.model_dump_json(),), batch_format="pyarrow",
                            batch_size=e.batch_size, num_cpus=e.decode_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=shape["decode_actors"],
                                                               max_tasks_in_flight_per_actor=e.prefetch_batches))
        ds = ds.map_batches(Embed, fn_constructor_args=(e.model_dump_json(), write_tokens),
                            batch_format="numpy", batch_size=e.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=shape["model_actors"],
                                                               max_tasks_in_flight_per_actor=e.prefetch_batches),
                            num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor or None)
        files = write_dataset(ds, storage, out_table, ["source"])
        _record_rejects(storage, files)
        fault_point("extract", n_chunk)
    counts = {src: reconcile(storage, out_table, src, n_in) for src, n_in in n_input.items()}
    summary = {"table": out_table, "sources": counts, "seconds": round(time.time() - t0, 2)}
    storage.mark_done(out_table, summary)
    return summary


def _pending(t: pa.Table, done: set) -> pa.Array:
    return pa.array([k not in done for k in zip(*(t[c].to_pylist() for c in FEATURE_KEY))], pa.bool_())


def _pending_chunks(storage, sources: list[str], splits, done: set, chunk_rows: int):
    """The rows not yet in the output, in source order, as tables of exactly chunk_rows rows (the
    last one fewer)."""
    buf, n = [], 0
    for src in sources:
        for t in scan(storage, src, splits):
            t = t.filter(_pending(t, done))
            buf.append(t)
            n += t.num_rows
            while n >= chunk_rows:
                whole = pa.concat_tables(buf)
                yield whole.slice(0, chunk_rows)
                buf, n = [whole.slice(chunk_rows)], n - chunk_rows
    if n:
        yield pa.concat_tables(buf)


def _scorer_record(storage, table: str) -> dict | None:
    """`<table>/_scorer.json` with its backbone identity (computed for files written before it was kept)."""
    rel = f"{table}/_scorer.json"
    if not storage.exists(rel):
        return None
    rec = storage.read_json(rel)
    if "identity" not in rec and isinstance(rec.get("backbone"), dict):
        rec["identity"] = BackboneConfig(**rec["backbone"]).identity()
    return rec


def features_identity(storage, cfg, table: str = "features") -> dict:
    """The identity of the backbone that extracted `table` (its _scorer.json; the config's when the
    table predates that file)."""
    rec = _scorer_record(storage, table)
    return rec["identity"] if rec else cfg.extract.backbone.identity()


def _check_same_scorer(storage, table: str, e) -> None:
    """Resuming into a table written by another backbone/model would mix features: refuse."""
    sig = {"backbone": e.backbone.model_dump(mode="json"), "identity": e.backbone.identity(),
           "model_dir": e.model_dir, "readouts": e.readouts, "write_tokens": e.write_tokens}
    rel = f"{table}/_scorer.json"
    if storage.exists(rel):
        old = _scorer_record(storage, table)
        if old != sig:
            raise ValueError(f"{storage.uri(table)} was extracted with {old}, not {sig}: use another "
                             f"run root (run.root) or out table, or delete {storage.uri(table)}")
    elif not storage.table_exists(table):
        storage.write_json(rel, sig)


def _record_rejects(storage, files: list[str]) -> None:
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        src = f.rsplit("source=", 1)[1].split("/", 1)[0]
        t = pq.read_table(f, filesystem=storage.fs, columns=["id", "view", "error"])
        for r in t.to_pylist():
            if r["error"]:
                rows.append({"stage": "extract", "key": make_key(id=r["id"], view=r["view"], source=src),
                             "reason": r["error"]})
    if rows:
        storage.write_table(REJECTS, pa.Table.from_pylist(rows, schema=REJECTS.schema))


def reconcile(storage, table: str, source: str, n_input: int) -> dict:
    t = storage.read_table(table, columns=["id", "view", "error"], filter=pc.field("source") == source)
    keys = list(zip(t["id"].to_pylist(), t["view"].to_pylist()))
    rejected = sum(1 for x in t["error"].to_pylist() if x)
    counts = {"input": n_input, "ok": len(keys) - rejected, "rejected": rejected,
              "duplicates": len(keys) - len(set(keys))}
    if counts["duplicates"] or len(keys) != n_input:
        raise RuntimeError(f"{table}/source={source}: counts do not reconcile: {counts} "
                           f"(rows written {len(keys)})")
    log.info("extract %s: %s", source, counts)
    return counts


def read_features(storage, table: str = "features", columns=None, filter=None) -> pa.Table:
    """Features of valid rows only (rows with an `error` are recorded in `rejects`)."""
    t = storage.read_table(table, columns=None if columns is None else list({*columns, "error"}),
                           filter=filter)
    t = t.filter(pc.equal(t["error"], ""))
    return t if columns is None else t.select(columns)
