"""Stage `synth`: render the synthetic NearID world into `positives`, `mtg` and `graded` tables."""
from __future__ import annotations

import logging
import time

import pyarrow as pa

from ..io.manifest import stage_leases
from ..raytools import write_dataset
from ..schema import GRADED, MTG, POSITIVES, conform

log = logging.getLogger("nearid.synth")


def make_world(cfg):
    from ..synth.world import SynthWorld

    s = cfg.synth
    return SynthWorld(seed=cfg.run.seed, n_identities=s.n_identities, n_views=s.n_views,
                      resolution=s.resolution, split_sizes=(s.split.get("train", 0), s.split.get("val", 0),
                                                            s.split.get("test", 0)),
                      closeness=s.closeness, area_range=s.area_range, backgrounds=s.backgrounds)


def benchmark_ids(world, n: int) -> dict[str, list[str]]:
    """The identities that carry MTG / graded samples: the first n of each split (val gets fewer)."""
    by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i in world.ids():
        by_split[world.split_of(i)].append(i)
    return {"train": by_split["train"][:n], "val": by_split["val"][:max(1, n // 4)],
            "test": by_split["test"][:n]}


class _Render:
    """Ray Data UDF: the world is rebuilt once per worker process from the config (cheap, seeded)."""

    def __init__(self, cfg_json: str, kind: str):
        from ..config import Config

        self.world = make_world(Config.model_validate_json(cfg_json))
        self.kind = kind

    def __call__(self, batch: dict) -> pa.Table:
        ids = [str(x) for x in batch["id"]]
        if self.kind == "positives":
            rows, spec = list(self.world.positives_rows(ids)), POSITIVES
        elif self.kind == "mtg":
            rows, spec = list(self.world.mtg_rows(ids)), MTG
        else:
            rows, spec = list(self.world.graded_rows(ids)), GRADED
        table = pa.Table.from_pylist([{k: r[k] for k in spec.columns} for r in rows], schema=spec.schema)
        return conform(table, spec)


def _render_table(ray, cfg, storage, ids: list[str], kind: str, partition: list[str] | None) -> int:
    if not ids:
        return 0
    ds = ray.data.from_items([{"id": i} for i in ids],
                             override_num_blocks=min(len(ids), cfg.synth.num_blocks))
    udf = _Render(cfg.model_dump_json(), kind)
    ds = ds.map_batches(udf, batch_format="numpy", batch_size=32, num_cpus=0.5)
    files = write_dataset(ds, storage, kind, partition)
    return len(files)


def run_synth(cfg, storage, ray) -> dict:
    """Render what is missing; a rerun after a crash only renders identities not yet written.
    Holds the leases of `positives`, `mtg` and `graded` from reading their keys to the last commit."""
    with stage_leases(storage, cfg, "synth", {t.name: t.key for t in (POSITIVES, MTG, GRADED)}):
        return _run_synth(cfg, storage, ray)


def _unique(storage, spec, present: bool) -> int:
    """Rows of a committed table, after checking every key is there once."""
    if not present:
        return 0
    t = storage.read_table(spec.name, columns=list(spec.key))
    dup = t.num_rows - len(set(zip(*[t[k].to_pylist() for k in spec.key])))
    if dup:
        raise RuntimeError(f"{spec.name} has {dup} duplicated {spec.key} keys")
    return t.num_rows


def _run_synth(cfg, storage, ray) -> dict:
    t0 = time.time()
    world = make_world(cfg)
    done_views = storage.keys(POSITIVES.name, ["id", "view"])
    done_ids = {i for i, _ in done_views}
    todo = [i for i in world.ids() if i not in done_ids]
    _render_table(ray, cfg, storage, todo, "positives", ["split"])
    bench = benchmark_ids(world, cfg.synth.n_mtg)
    mtg_todo = [i for ids in bench.values() for i in ids]
    mtg_done = storage.keys(MTG.name, ["id"])
    mtg_todo = [i for i in mtg_todo if (i,) not in mtg_done]
    if cfg.synth.n_mtg:
        _render_table(ray, cfg, storage, mtg_todo, "mtg", None)
    graded_ids = benchmark_ids(world, cfg.synth.n_graded)["test"] if cfg.synth.n_graded else []
    graded_done = {i for i, in storage.keys(GRADED.name, ["id"])}
    _render_table(ray, cfg, storage, [i for i in graded_ids if i not in graded_done], "graded", None)
    counts = storage.read_table(POSITIVES.name, columns=["split"]).column("split").value_counts()
    summary = {"identities": world.n_identities, "rendered_now": len(todo),
               "positives_rows": sum(c["counts"].as_py() for c in counts),
               "by_split": {c["values"].as_py(): c["counts"].as_py() for c in counts},
               "mtg_rows": _unique(storage, MTG, bool(cfg.synth.n_mtg)),
               "graded_rows": _unique(storage, GRADED, bool(graded_ids)),
               "seconds": round(time.time() - t0, 2)}
    dup = summary["positives_rows"] - len(storage.keys(POSITIVES.name, ["id", "view"]))
    if dup:
        raise RuntimeError(f"positives has {dup} duplicated (id, view) keys")
    storage.mark_done(POSITIVES.name, summary)
    return summary
