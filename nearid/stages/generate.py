"""Stage `generate`: near-identity distractors in the exact background of every view.

Per setting and chunk of pending (id, view) keys: a CPU stage decodes the view, checks and dilates
its mask and writes the near-identity prompt; a fixed pool of actors (one pipeline each, one GPU
each on clusters) inpaints batches; the result is composited so that every pixel outside the
dilated mask is the source view's. Per-row failures become `status` + a `rejects` row.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..images import BadImage, decode_image, decode_mask, encode_png
from ..io.manifest import stage_leases
from ..raytools import chunks, fault_point, record_placement, write_dataset
from ..schema import DISTRACTORS, POSITIVES, REJECTS, make_key

log = logging.getLogger("nearid.generate")
PREP_COLUMNS = ["id", "view", "split", "setting", "image", "mask", "prompt", "seed", "error"]


def row_seed(run_seed: int, id_: str, view: int, setting: str) -> int:
    h = hashlib.blake2b(f"{run_seed}/{id_}/{view}/{setting}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def visibility_of(synth) -> dict:
    """near_identity_prompt's visibility arguments for the world a config renders: look-alikes
    whose change covers under `synth.min_visible_share` of the image are re-drawn (0: never)."""
    if not synth.min_visible_share:
        return {}
    return {"visible_at": synth.resolution, "area": sum(synth.area_range) / 2.0,
            "min_share": synth.min_visible_share}


class Prepare:
    """CPU stage: decode + validate inputs and build prompts; failures are carried, not raised."""

    def __init__(self, setting: str, n_changes: int, dilation: int, run_seed: int, closeness: float = 1.0,
                 visibility: dict | None = None, attributes: list[str] | None = None):
        self.setting, self.n_changes, self.dilation, self.run_seed = setting, n_changes, dilation, run_seed
        self.closeness, self.visibility, self.attributes = closeness, dict(visibility or {}), attributes

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..generate.masks import dilate_mask
        from ..generate.prompts import near_identity_prompt

        out = {c: [] for c in PREP_COLUMNS}
        for r in batch.to_pylist():
            seed = row_seed(self.run_seed, r["id"], r["view"], self.setting)
            err, mask_bytes, prompt = "", b"", ""
            try:
                img = decode_image(r["image"], f"positives id={r['id']} view={r['view']} image")
                mask = decode_mask(r["mask"], img.size, f"positives id={r['id']} view={r['view']} mask")
                mask_bytes = encode_png(dilate_mask(mask, self.dilation))
                prompt = near_identity_prompt(r["category"], r["description"], seed=seed,
                                              n_changes=self.n_changes, closeness=self.closeness,
                                              attributes=self.attributes, **self.visibility)
            except (BadImage, ValueError) as e:
                err = str(e)
            for c, v in (("id", r["id"]), ("view", r["view"]), ("split", r["split"]),
                         ("setting", self.setting), ("image", r["image"]), ("mask", mask_bytes),
                         ("prompt", prompt), ("seed", seed), ("error", err)):
                out[c].append(v)
        return pa.table(out)


class Inpaint:
    """Actor stage: one backend pipeline per actor, loaded once; batches in, distractor rows out."""

    def __init__(self, setting: str, backend: str, params: dict, resolution: int | None):
        from ..generate.backends import build_backend

        kw = dict(params)
        if resolution:
            kw["resolution"] = resolution
        self.backend = build_backend(backend, **kw)
        self.setting, self.generator = setting, f"{backend}:{params.get('model', 'default')}"
        record_placement("generate")

    def _run(self, imgs, masks, prompts, seeds):
        try:
            return self.backend.inpaint(imgs, masks, prompts, seeds), None
        except Exception as e:  # noqa: BLE001 - isolate the failing rows below
            if len(imgs) == 1:
                return None, f"backend {self.generator} failed: {type(e).__name__}: {e}"
            outs = []
            for args in zip(imgs, masks, prompts, seeds):
                res, err = self._run(*[[a] for a in args])
                outs.append(res[0] if res else err)
            return outs, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..generate.masks import composite

        rows = batch.to_pylist()
        ok = [i for i, r in enumerate(rows) if not r["error"]]
        imgs = [decode_image(rows[i]["image"]) for i in ok]
        masks = [decode_mask(rows[i]["mask"]) for i in ok]
        results, batch_err = self._run(imgs, masks, [rows[i]["prompt"] for i in ok],
                                       [rows[i]["seed"] for i in ok]) if ok else ([], None)
        status, images = [r["error"] and f"rejected: {r['error']}" for r in rows], [b""] * len(rows)
        for j, i in enumerate(ok):
            res = results[j] if results is not None else batch_err
            if isinstance(res, str) or res is None:
                status[i] = f"rejected: {res or batch_err}"
                continue
            images[i] = encode_png(composite(imgs[j], res, masks[j]))
            status[i] = "ok"
        return pa.table({
            "id": [r["id"] for r in rows], "view": pa.array([r["view"] for r in rows], pa.int8()),
            "setting": [self.setting] * len(rows), "split": [r["split"] for r in rows],
            "image": pa.array(images, pa.binary()), "prompt": [r["prompt"] for r in rows],
            "generator": [self.generator] * len(rows),
            "seed": pa.array([r["seed"] for r in rows], pa.int64()), "status": status})


def _write_rejects(storage, stage: str, rows: list[dict]) -> None:
    if rows:
        storage.write_table(REJECTS, pa.Table.from_pylist(rows, schema=REJECTS.schema))


def run_generate(cfg, storage, ray, settings: list[str] | None = None, chunk_rows: int = 2000,
                 tracker=None) -> dict:
    """Generate what is missing, holding the `distractors` lease from reading its keys to the end.

    With a tracker (the job, the pipeline: the whole stage) it then checks a sample of every
    setting (`validate_generation`), logs the generation run (`log_generation`) and records the
    check as `validation` in the summary and in `distractors/_SUCCESS.json`."""
    with stage_leases(storage, cfg, "generate", {DISTRACTORS.name: DISTRACTORS.key}):
        summary = _run_generate(cfg, storage, ray, settings, chunk_rows)
    if tracker is None:
        return summary
    g = cfg.generate
    check = validate_generation(storage, [s for s in summary if s != "seconds"], g.mask_dilation,
                                g.validate_sample)
    summary["validation"] = check["metrics"]
    log_generation(tracker, cfg, storage, summary, check)
    storage.mark_done(DISTRACTORS.name, summary)
    return summary


def _run_generate(cfg, storage, ray, settings: list[str] | None, chunk_rows: int) -> dict:
    g = cfg.generate
    t0 = time.time()
    meta = storage.read_table(POSITIVES.name, columns=["id", "view", "split"])
    meta = meta.filter(pc.is_in(meta["split"], pa.array(g.splits)))
    all_keys = list(zip(meta["id"].to_pylist(), meta["view"].to_pylist()))
    summary = {}
    for name in settings or list(g.settings):
        if name not in g.settings:
            raise ValueError(f"unknown setting '{name}'; configured: {sorted(g.settings)}")
        s = g.settings[name]
        done = {(i, v) for i, v, st in storage.keys(DISTRACTORS.name, ["id", "view", "setting"])
                if st == name}
        todo = [k for k in all_keys if k not in done]
        log.info("setting %s: %d rows, %d already written, %d to generate", name, len(all_keys),
                 len(done), len(todo))
        for n_chunk, chunk in enumerate(chunks(todo, chunk_rows), 1):
            ids = sorted({i for i, _ in chunk})
            keyset = set(chunk)
            table = storage.read_table(POSITIVES.name, filter=pc.field("id").isin(ids))
            keep = [(i, v) in keyset for i, v in zip(table["id"].to_pylist(), table["view"].to_pylist())]
            table = table.filter(pa.array(keep))
            nblocks = max(1, min(g.num_actors * 4, table.num_rows // max(1, s.batch_size)))
            ds = ray.data.from_arrow(table).repartition(nblocks)
            ds = ds.map_batches(Prepare(name, s.n_changes, g.mask_dilation, cfg.run.seed, cfg.synth.closeness,
                                        visibility_of(cfg.synth), cfg.synth.lookalike_attributes),
                                batch_format="pyarrow", num_cpus=0.25)
            ds = ds.map_batches(Inpaint, fn_constructor_args=(name, s.backend, s.params, s.resolution),
                                batch_format="pyarrow", batch_size=s.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=g.num_actors),
                                num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor or None)
            files = write_dataset(ds, storage, DISTRACTORS.name, ["setting"])
            written = _read_files(storage, files, ["id", "view", "status"])
            _write_rejects(storage, "generate", [
                {"stage": "generate", "key": make_key(id=r["id"], view=r["view"], setting=name),
                 "reason": r["status"].removeprefix("rejected: ")}
                for r in written.to_pylist() if r["status"] != "ok"])
            fault_point("generate", n_chunk)
        summary[name] = reconcile(storage, name, len(all_keys))
    summary["seconds"] = round(time.time() - t0, 2)
    storage.mark_done(DISTRACTORS.name, summary)
    return summary


def _read_files(storage, files: list[str], columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    if not files:
        return pa.table({c: [] for c in columns})
    return pa.concat_tables([pq.read_table(f, filesystem=storage.fs, columns=columns) for f in files])


def reconcile(storage, setting: str, n_input: int) -> dict:
    """input rows = written ok + rejected, with every key exactly once."""
    t = storage.read_table(DISTRACTORS.name, columns=["id", "view", "status"],
                           filter=pc.field("setting") == setting)
    keys = list(zip(t["id"].to_pylist(), t["view"].to_pylist()))
    ok = sum(1 for s in t["status"].to_pylist() if s == "ok")
    counts = {"input": n_input, "ok": ok, "rejected": len(keys) - ok,
              "duplicates": len(keys) - len(set(keys))}
    if counts["duplicates"]:
        raise RuntimeError(f"distractors/{setting}: {counts['duplicates']} duplicated keys")
    if counts["ok"] + counts["rejected"] != n_input:
        raise RuntimeError(f"distractors/{setting}: input {n_input} != ok {ok} + rejected "
                           f"{counts['rejected']}")
    log.info("setting %s: %s", setting, counts)
    return counts


def validate_generation(storage, settings: list[str], dilation: int, sample: int = 200,
                        seed: int = 0) -> dict:
    """Per setting: share of distractors identical to the view outside the dilated mask and
    changed inside it."""
    from ..generate.masks import dilate_mask, validate_distractor

    out = {}
    pos = storage.read_table(POSITIVES.name, columns=["id", "view", "image", "mask"])
    pos_index = {(i, v): k for k, (i, v) in enumerate(zip(pos["id"].to_pylist(), pos["view"].to_pylist()))}
    examples = []
    for name in settings:
        d = storage.read_table(DISTRACTORS.name, columns=["id", "view", "image", "status"],
                               filter=(pc.field("setting") == name) & (pc.field("status") == "ok"))
        rng = np.random.default_rng(seed)
        idx = rng.choice(d.num_rows, size=min(sample, d.num_rows), replace=False) if d.num_rows else []
        n_out, changed = 0, []
        for k in idx:
            r = d.slice(int(k), 1).to_pylist()[0]
            p = pos_index[(r["id"], r["view"])]
            src = decode_image(pos["image"][p].as_py())
            mask = dilate_mask(decode_mask(pos["mask"][p].as_py()), dilation)
            dist = decode_image(r["image"])
            res = validate_distractor(src, dist, mask)
            n_out += bool(res["outside_equal"])
            changed.append(res["inside_changed_frac"])
            if len(examples) < 4 * len(settings) and len([e for e in examples if e[0] == name]) < 4:
                examples.append((name, src, dist, mask))
        n = max(1, len(idx))
        out[name] = {"checked": len(idx), "outside_equal_share": n_out / n,
                     "inside_changed_mean": float(np.mean(changed)) if changed else 0.0}
    return {"metrics": out, "examples": examples}


def log_generation(tracker, cfg, storage, summary: dict, check: dict) -> None:
    """One MLflow run for a generation: settings, validation shares and rejection rates as
    `generate/<setting>/...` metrics, row counts as `count.<setting>.*` params, example grid."""
    from ..report import example_grid, pyplot

    with tracker.run(f"{cfg.run.name}-generate", tags={"stage": "generate", "data": storage.root}):
        tracker.log_params({f"generate.{k}": v for k, v in cfg.generate.model_dump(mode="json").items()})
        counts = {}
        for s, m in check["metrics"].items():
            tracker.log_metrics({f"generate/{s}/{k}": v for k, v in m.items() if k != "checked"})
            if "checked" in m:
                counts[f"count.{s}.checked"] = m["checked"]
        for s, c in summary.items():
            if isinstance(c, dict) and "ok" in c:
                counts.update({f"count.{s}.rows_{k}": c[k] for k in ("input", "ok", "rejected", "duplicates")
                               if k in c})
                if c.get("input"):
                    tracker.log_metrics({f"generate/{s}/rejected_share": c["rejected"] / c["input"]})
        tracker.log_params(counts)
        fig = example_grid(check["examples"])
        if fig is not None:
            tracker.log_figure(fig, "plots/distractor_examples.png")
            pyplot().close(fig)
