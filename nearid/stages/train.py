"""Stage `train`: group features into identity items (Ray Data), then train the MAP head with
Ray Train's TorchTrainer (DDP), checkpointing HF-style model dirs, tracked in one MLflow run."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..config import config_to_dict, flatten, model_dir_for, train_run_name
from ..protocol import PROTOCOL_FILE
from ..raytools import write_dataset
from ..schema import flatten_tokens, items_table
from ..sources import MTG_SOURCE, available, image_rows, is_setting, source
from ..training.items import group_items, group_key, item_sources, mtg_as_rows

log = logging.getLogger("nearid.train")
FEATURE_COLS = ["id", "view", "source", "split"]


DRIVER_READ_MAX_BYTES = 32 * 2**20


def train_settings(cfg, storage) -> list[str]:
    """Training settings: the configured list, else every generated setting not held apart."""
    if cfg.train.settings:
        return list(cfg.train.settings)
    held = set(cfg.generate.held_apart) | set(cfg.eval.held_apart)
    return [s for s in available(storage, cfg) if is_setting(s) and s not in held]


class _ToItemRows:
    """Keep one split's rows of the wanted sources; MTG rows move into the item layout, once per
    copy (`mtg_repeat`; 0 = no MTG), and every row gets its hashed grouping key."""

    def __init__(self, split: str, sources: list[str], input_mode: str, mtg_repeat: int, seed: int):
        self.split, self.sources, self.input_mode = split, set(sources), input_mode
        self.column = "tokens" if input_mode == "tokens" else "image"   # items hold `images`
        self.mtg_repeat, self.seed = (mtg_repeat if MTG_SOURCE in sources else 0), seed

    def __call__(self, t: pa.Table) -> pa.Table:
        if "error" in t.column_names:
            t = t.filter(pc.equal(t["error"], ""))
        t = t.filter(pc.equal(t["split"], self.split))
        is_mtg = pc.equal(t["source"], MTG_SOURCE)
        rest = t.filter(pc.invert(is_mtg))
        rest = rest.filter(pc.is_in(rest["source"], pa.array(sorted(self.sources - {MTG_SOURCE}))))
        parts = [rest.select([*FEATURE_COLS, self.column])]
        mtg = t.filter(is_mtg)
        if mtg.num_rows and self.mtg_repeat:
            mtg = mtg_as_rows(mtg.select([*FEATURE_COLS, self.column]))
            # copies are separate items from here on: each is grouped, stored and drawn on its own
            parts += [mtg] + [mtg.set_column(0, "id", pc.binary_join_element_wise(
                mtg["id"], pa.scalar(f"#{r}"), "")) for r in range(1, self.mtg_repeat)]
        out = pa.concat_tables(parts)
        out = out.append_column("gkey", pa.array([group_key(i, self.seed) for i in out["id"].to_pylist()],
                                                 pa.string()))
        if self.input_mode == "tokens":
            # Ray's hash shuffle cannot build empty tensor-extension columns: plain lists for the
            # shuffle; group_items restores the [T, D] shape
            out = out.set_column(out.schema.get_field_index("tokens"), "tokens", flatten_tokens(out["tokens"]))
        return out


def _grouper(sources: list[str], input_mode: str, token_shape):
    # map_groups wants a plain function (it reads __name__)
    def group_one_identity(t: pa.Table) -> pa.Table:
        return group_items(t, sources, input_mode, token_shape)
    return group_one_identity


def _image_features(storage, cfg) -> pa.Table:
    """Backbone-in-the-loop mode: the same long table as features, with image bytes."""
    parts = [image_rows(storage, s) for s in available(storage, cfg) if source(s).trains]
    t = pa.concat_tables(parts)
    return t.append_column("error", pa.array([""] * t.num_rows, pa.string()))


def build_items(ray, cfg, storage, split: str, settings: list[str], mtg_repeat: int) -> tuple[str, int]:
    """Write `items_<input mode>_<split>` (`nearid.schema.items_schema`, one row per identity)
    unless it exists; returns (table, rows)."""
    input_mode = cfg.train.input_mode
    name = items_table(input_mode, split)
    sources = item_sources(settings)
    sig = {"sources": sources, "mtg_repeat": mtg_repeat, "order": "gkey-v1", "seed": cfg.run.seed}
    if storage.is_done(name) and storage.read_json(f"{name}/_SUCCESS.json").get("sig") == sig:
        return name, storage.read_json(f"{name}/_SUCCESS.json")["rows"]
    storage.delete_dir(name)
    token_shape = None
    wanted = list(sources) if mtg_repeat else [s for s in sources if s != MTG_SOURCE]
    if input_mode == "tokens":
        token_shape = tuple(storage.dataset("features").schema.field("tokens").type.shape)
    if input_mode == "tokens" and storage.table_bytes("features") <= DRIVER_READ_MAX_BYTES:
        # small: grouped here in one pass (the same two functions); a Ray Data hash shuffle costs
        # ~10 s of task and actor start-up per table on one node, over a minute on a 4-node cluster
        rows = _ToItemRows(split, wanted, input_mode, mtg_repeat, cfg.run.seed)(
            storage.read_table("features", columns=[*FEATURE_COLS, "tokens", "error"]))
        storage.write_table(name, group_items(rows, sources, input_mode, token_shape))
        return _mark_items(storage, name, sig)
    if input_mode == "tokens":
        ds = ray.data.read_parquet(storage.uri("features"), filesystem=storage.fs,
                                   columns=[*FEATURE_COLS, "tokens", "error"])
    else:
        ds = ray.data.from_arrow(_image_features(storage, cfg))
    ds = ds.map_batches(_ToItemRows(split, wanted, input_mode, mtg_repeat, cfg.run.seed),
                        batch_format="pyarrow", num_cpus=0.25)
    n_parts = max(2, min(64, cfg.train.num_workers * 2))
    ds = ds.groupby("gkey", num_partitions=n_parts).map_groups(
        _grouper(sources, input_mode, token_shape), batch_format="pyarrow", num_cpus=0.25)
    write_dataset(ds, storage, name)
    return _mark_items(storage, name, sig)


def _mark_items(storage, name: str, sig: dict) -> tuple[str, int]:
    rows = storage.read_table(name, columns=["id"]).num_rows
    storage.mark_done(name, {"rows": rows, "sig": sig})
    return name, rows


def run_train(cfg, storage, ray, tracker=None, run_name: str | None = None,
              extra_loop_config: dict | None = None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..training.loop import train_loop
    from ..training.spec import LoopSpec

    tc = cfg.train
    t0 = time.time()
    settings = train_settings(cfg, storage)
    if not settings:
        raise ValueError("no training settings: generate distractors first or set train.settings")
    items, n_total = build_items(ray, cfg, storage, "train", settings, tc.mtg_repeat)
    val_items, _ = build_items(ray, cfg, storage, "val", settings, 0)
    ids = storage.read_table(items, columns=["id"])["id"]
    n_mtg = int(pc.sum(pc.starts_with(ids, "mtg:")).as_py() or 0)
    n_items = n_total - n_mtg
    if n_total < tc.batch_size:   # the last partial batch is dropped: nothing would train
        raise ValueError(f"{storage.uri(items)}: {n_total} training items, fewer than train.batch_size="
                         f"{tc.batch_size}: no full batch to train on; lower train.batch_size or add identities")
    if tc.materialize and storage.table_bytes(items) <= DRIVER_READ_MAX_BYTES:
        # small: the driver reads it once (pyarrow) and Ray holds the blocks for every epoch; a Ray
        # Data read + materialize costs ~7 s of task start-up here
        table = storage.read_table(items)
        step = max(1, -(-table.num_rows // max(2, 2 * tc.num_workers)))
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(1, table.num_rows), step)])
    else:
        # larger: read by Ray's tasks, so the driver's memory does not grow with the run (bench.scale)
        ds = ray.data.read_parquet(storage.uri(items), filesystem=storage.fs)
        if tc.materialize:
            ds = ds.materialize()
    ds.set_name(items)
    run_name = run_name or train_run_name(cfg)
    model_rel = model_dir_for(cfg, run_name)
    run_id = None
    if tracker is not None:
        run_id = tracker.start(run_name, tags={"stage": "train", "backbone": cfg.extract.backbone.name,
                                               "data": storage.root, "git_commit": _git()})
        tracker.log_params(flatten(config_to_dict(cfg)))
        tracker.log_params({"train.settings_resolved": ",".join(settings), "train.items": n_items,
                            "train.mtg_items": n_mtg})
    spec = LoopSpec(cfg=cfg.model_dump_json(), settings=settings, items=items, val_items=val_items,
                    n_items=n_total, run_id=run_id, context="train",
                    tracking_uri=tracker.uri if tracker is not None else None, driver_pid=os.getpid())
    # extra_loop_config: more LoopSpec fields (the tests' fault hooks); an unknown key is an error
    spec = spec.with_(**(extra_loop_config or {}))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec.to_dict(),   # Ray Train hands its workers a dict
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=storage.path("train_runs"), storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_top_k,
                                               checkpoint_score_attribute="val_ssr",
                                               checkpoint_score_order="max")),
        datasets={"train": ds},
        torch_config=None,
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    ckpt, ckpt_metrics = pick_checkpoint(result, tc.publish)
    model_dir = storage.uri(model_rel)
    published = {"which": tc.publish, "step": ckpt_metrics.get("step"),
                 "val": {k: v for k, v in ckpt_metrics.items() if k.startswith("val_")}}
    publish_model(ckpt, storage, model_rel, published)
    summary = {"run_name": run_name, "items": n_items, "mtg_items": n_mtg, "settings": settings,
               "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
               "published": published, "model_dir": model_dir, "seconds": round(time.time() - t0, 2)}
    if tracker is not None:
        summary["mlflow"] = _log_published(tracker, storage, run_name, run_id, model_dir, published, tc.publish)
        tracker.log_metrics({"train/wall_seconds": summary["seconds"]})
        _log_curves(tracker, run_id)
        tracker.end("FINISHED")
        # points the workers and this driver could not send even after retrying (server down)
        lost = int(summary["metrics"].pop("mlflow_lost_points", 0)) + tracker.lost_points
        summary["mlflow"] = {**(summary["mlflow"] or {}), "lost_points": lost}
        if lost:
            log.warning("MLflow: %d metric points of run %s were lost while the tracking server was "
                        "unreachable; the model and train_summary.json are complete", lost, run_name)
    else:
        summary["metrics"].pop("mlflow_lost_points", None)
    storage.write_json(f"{model_rel}/train_summary.json", summary)
    return summary


def _log_published(tracker, storage, run_name, run_id, model_dir, published, which) -> dict:
    """The published model dir as a run artifact (`model/`) and as an MLflow model registered as
    a new version of `nearid`, tagged with its val metrics and step; `published/*` metrics."""
    from ..mlflow_model import REGISTERED_MODEL

    val = {"val/" + k.removeprefix("val_"): v for k, v in published["val"].items()
           if isinstance(v, (int, float))}
    step = int(published["step"] or 0)
    tracker.set_tags({"published": which, "published_step": str(published["step"]), "model_dir": model_dir})
    local = _local_copy(storage, model_dir_for(None, run_name))
    tracker.log_artifact(local, "model")
    logged = tracker.log_model(local, REGISTERED_MODEL, step=step, version_tags={
        "run_name": run_name, "model_dir": model_dir, "published": which,
        "published_step": published["step"], **val}) or {}
    tracker.log_metrics({k.replace("val/", "published/", 1): v for k, v in val.items()}, step=step,
                        model_id=logged.get("model_id"))
    if logged.get("version_uri"):
        tracker.set_tags({"model_uri": logged["version_uri"], "registered_version": logged["version"]})
    return {"run_id": run_id, **logged}


def pick_checkpoint(result, which: str = "final"):
    """(checkpoint, its reported metrics): the last one ("final", what the paper released) or the
    top one by val_ssr ("best"; Train keeps the top-k and always the latest)."""
    pairs = [(c, m) for c, m in (getattr(result, "best_checkpoints", None) or [])]
    if which == "best":
        scored = [(c, m) for c, m in pairs if m.get("val_ssr") is not None]
        if scored:
            return max(scored, key=lambda cm: (cm[1]["val_ssr"], cm[1].get("step", 0)))
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    latest = [m for c, m in pairs if c.path == result.checkpoint.path]
    return result.checkpoint, (latest[0] if latest else dict(result.metrics or {}))


def publish_model(ckpt, storage, rel: str, published: dict | None = None) -> None:
    """Copy the model files of a checkpoint into `models/<run>` (config, weights, card); the
    card says which checkpoint this is."""
    with ckpt.as_directory() as d:
        for name in ("config.json", "model.safetensors", "README.md", PROTOCOL_FILE):
            if name == PROTOCOL_FILE and not Path(d, name).is_file():
                continue                      # a checkpoint written before protocol.json existed
            data = Path(d, name).read_bytes()
            if name == "README.md" and published:
                val = ", ".join(f"{k} {v:.2f}" for k, v in published["val"].items()
                                if isinstance(v, (int, float)) and not k.endswith("rows"))
                data += (f"\n## Published checkpoint\n\nThe {published['which']} checkpoint: step "
                         f"{published['step']}{'; ' + val if val else ''}.\n").encode()
            storage.write_bytes(f"{rel}/{name}", data)


def _local_copy(storage, rel: str) -> str:
    if not storage.is_s3:
        return storage.path(rel)
    import tempfile

    out = tempfile.mkdtemp(prefix="nearid-model-")
    for name in ("config.json", "model.safetensors", "README.md", PROTOCOL_FILE):
        if name == PROTOCOL_FILE and not storage.exists(f"{rel}/{name}"):
            continue
        Path(out, name).write_bytes(storage.read_bytes(f"{rel}/{name}"))
    return out


def _log_curves(tracker, run_id) -> None:
    """Loss and val SSR curves as one figure artifact."""
    if run_id is None:
        return
    from ..report import pyplot

    plt = pyplot()

    def hist(key):
        try:
            h = tracker.client.get_metric_history(run_id, key)
        except Exception:  # noqa: BLE001
            return [], []
        return [m.step for m in h], [m.value for m in h]

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(*hist("train/loss"), label="total")
    a.plot(*hist("train/loss_discrimination"), label="discrimination")
    a.plot(*hist("train/loss_ranking"), label="ranking")
    a.set_xlabel("step"), a.set_title("training loss"), a.legend()
    b.plot(*hist("val/ssr"), marker="o", label="SSR")
    b.plot(*hist("val/pa"), marker="s", label="PA")
    b.set_xlabel("step"), b.set_title("validation (%)"), b.legend()
    fig.tight_layout()
    tracker.log_figure(fig, "plots/training_curves.png")
    plt.close(fig)


def _git() -> str:
    from ..tracking import git_commit

    return git_commit()

