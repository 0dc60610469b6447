"""The training loop: one function used by Ray Train workers (DDP), Tune trials and tests.

`train_loop(spec)` (a `spec.LoopSpec`, or its dict) reads its context: inside a Ray Train worker
it takes its data shard from `ray.train.get_dataset_shard("train")` and reports to Ray Train;
inside a Tune trial it streams the items table itself and reports to Tune; with neither it runs
in-process (tests). The step itself, the optimizer, the schedule and the step counts are
`training.fit`'s.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..config import Config
from ..schema import column_to_numpy, unflatten_tokens
from . import fit
from .items import batches_in_epoch_order, draw_batch, item_sources
from .spec import LoopSpec
from .state import load_training_state, save_training_state
from .validate import embed_items, item_sims, score_sims

log = logging.getLogger("nearid.train")


class Context:
    """Where the loop runs: 'train' (Ray Train worker), 'tune' (Tune trial) or 'local'."""

    def __init__(self, kind: str, out_dir: str | None = None):
        self.kind, self.out_dir, self.reports = kind, out_dir, []
        if kind == "train":
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        else:
            self.rank, self.world = 0, 1

    def checkpoint(self):
        if self.kind == "train":
            import ray.train

            return ray.train.get_checkpoint()
        if self.kind == "tune":
            import ray.tune

            return ray.tune.get_checkpoint()
        return None

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        if self.kind == "local":
            self.reports.append(dict(metrics))
            return
        if self.kind == "train":
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        else:
            import ray.tune

            ckpt = ray.tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            ray.tune.report(metrics, checkpoint=ckpt)


def _open_storage(cfg: Config):
    from ..io.storage import Storage

    return Storage.open(cfg.run.root, cfg.storage)


def load_items(storage, table: str, input_mode: str, dim: int):
    """(ids, valid [n, slots] bool, tokens [n, slots, T, D] or per-slot image bytes) of a table."""
    t = storage.read_table(table)
    d = _to_numpy(t, input_mode, dim)
    return list(d["id"]), d["valid"].astype(bool), d[input_mode]


def _epoch_batches(tables, tc, epoch: int, per_worker: int, input_mode: str, dim: int):
    """One epoch's batches in the order of `items.epoch_order` (see there for why)."""
    for t in batches_in_epoch_order(tables, tc.seed, epoch, max(1, tc.mtg_repeat), per_worker,
                                    tc.shuffle_buffer):
        yield _to_numpy(t, input_mode, dim)


def _to_numpy(t, input_mode: str, dim: int) -> dict:
    valid = column_to_numpy(t["valid"])
    d = {"id": np.array(t["id"].to_pylist(), dtype=object), "valid": valid,
         "split": np.array(t["split"].to_pylist(), dtype=object)}
    if input_mode == "tokens":
        d["tokens"] = unflatten_tokens(t["tokens"], (valid.shape[1], -1, dim))
    else:
        d["images"] = t["images"].to_pylist()
    return d


class TokenSource:
    """Turns a batch into token tensors: cached tokens as they are, or images through the frozen
    backbone (backbone-in-the-loop mode). One code path for both input modes."""

    def __init__(self, mode: str, backbone, device):
        self.mode, self.backbone, self.device = mode, backbone, device

    def __call__(self, batch: dict, index: np.ndarray) -> torch.Tensor:
        """index [b, m] of slots -> tokens [b, m, T, D]."""
        b, m = index.shape
        if self.mode == "tokens":
            tok = np.asarray(batch["tokens"])
            sel = tok[np.arange(b)[:, None], index]
            return torch.tensor(sel, dtype=torch.float32, device=self.device)
        from ..images import decode_image

        imgs = batch["images"]
        flat, blank = [], []
        for r in range(b):
            for s in index[r]:
                data = imgs[r][s]
                blank.append(not data)
                flat.append(decode_image(data) if data else None)
        size = self.backbone.image_size
        from PIL import Image

        flat = [im if im is not None else Image.new("RGB", (size, size)) for im in flat]
        pix = self.backbone.preprocess(flat)
        tokens = self.backbone.tokens(pix).float()
        return tokens.reshape(b, m, *tokens.shape[1:]).to(self.device)


def _validate(head, storage, cfg: Config, val_table: str, sources, settings, token_source) -> dict:
    if not storage.table_exists(val_table):
        return {}
    input_mode = cfg.train.input_mode
    ids, valid, data = load_items(storage, val_table, input_mode, head.hidden_size)
    keep = [not str(i).startswith("mtg:") for i in ids]
    ids = [i for i, k in zip(ids, keep) if k]
    valid, data = valid[keep], (data[keep] if input_mode == "tokens" else [d for d, k in zip(data, keep) if k])
    was = head.training
    head.eval()
    if input_mode == "tokens":
        emb = embed_items(head, torch.tensor(data))
    else:
        idx = np.tile(np.arange(valid.shape[1]), (len(ids), 1))
        with torch.no_grad():
            tok = token_source({"images": data}, idx)
        emb = embed_items(head, tok)
    head.train(was)
    return score_sims(item_sims(ids, emb, valid, sources, settings))


@dataclass
class LoopState:
    """What lives for the whole run and every report needs: where it runs, the model and its
    optimizer state, the data it validates on, the progress saved with each checkpoint."""

    ctx: Context
    spec: LoopSpec
    cfg: Config
    storage: object
    model: object
    head: torch.nn.Module
    token_source: TokenSource
    sources: list
    settings: list
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    progress: dict
    tracker: object = None


def worker_threads(tc) -> int:
    """torch threads of a CPU training worker: `train.threads`, else int(`train.cpus_per_worker`)."""
    return tc.threads or max(1, int(tc.cpus_per_worker))


def train_loop(config: dict | LoopSpec) -> dict:
    """config: a `LoopSpec` or its `to_dict()` (what Ray Train and Tune hand the workers)."""
    from ..losses import build_loss
    from ..model import NearIDModel
    from ..backbones.dispatch import backbone_kwargs

    spec = config if isinstance(config, LoopSpec) else LoopSpec.from_dict(config)
    cfg = spec.config()
    tc = cfg.train
    ctx = Context(spec.context, spec.out_dir)
    torch.manual_seed(tc.seed)
    storage = _open_storage(cfg)
    settings = list(spec.settings)
    sources = item_sources(settings)
    input_mode = tc.input_mode
    use_cuda = tc.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(worker_threads(tc))

    model = NearIDModel.from_backbone(cfg.extract.backbone.name, **backbone_kwargs(cfg.extract.backbone))
    head = model.head.to(device)
    if input_mode == "images":
        model.backbone.to(device)
    ddp_head = head
    if ctx.kind == "train" and ctx.world > 1:
        import ray.train.torch as rtt

        ddp_head = rtt.prepare_model(head, move_to_device=False)
    loss_fn = build_loss(tc.loss.name, **tc.loss.params)
    loss_fn.to(device)
    opt = fit.build_optimizer(head, tc, loss_fn)
    per_worker = fit.per_worker_batch(tc.batch_size, ctx.world)
    per_epoch = fit.steps_per_epoch(spec.n_items, tc.batch_size, ctx.world)
    total_steps = per_epoch * tc.epochs
    sched = fit.build_schedule(opt, tc, total_steps)
    dtype = fit.amp_dtype(tc.precision, use_cuda)
    scaler = fit.build_scaler(dtype)
    train_step = fit.TrainStep(ddp_head, loss_fn, opt, sched, scaler, clip_params=head.parameters(),
                               grad_clip=tc.grad_clip, n_positives=tc.n_positives, device=device,
                               dtype=dtype, fast=tc.fast_head, token_dropout=tc.token_dropout,
                               keep_prefix=model.backbone.num_prefix_tokens, seed=tc.seed * 1000 + ctx.rank)
    token_source = TokenSource(tc.input_mode, model.backbone, device)

    progress = {"epoch": 0, "step": 0, "best_val_ssr": -1.0, "resumed_from_step": 0}
    ckpt = ctx.checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            w = load_file(str(Path(d) / "model.safetensors"))
            head.load_state_dict({k.removeprefix("head."): v for k, v in w.items() if k.startswith("head.")})
            progress = load_training_state(d, opt, sched, scaler)
            progress["resumed_from_step"] = progress["step"]
        log.info("resumed from checkpoint at epoch %s step %s", progress["epoch"], progress["step"])

    tracker = None
    if ctx.rank == 0 and spec.run_id:
        from ..tracking import Tracker

        tracker = Tracker(spec.tracking_uri, cfg.tracking.experiment, cfg.tracking.enabled,
                          cfg.tracking.retries)
        tracker.attach(spec.run_id)
    state = LoopState(ctx, spec, cfg, storage, model, head, token_source, sources, settings, opt, sched,
                      scaler, per_epoch, progress, tracker)

    val_every = tc.val_every_steps or per_epoch
    ckpt_every = tc.checkpoint_every_steps or per_epoch
    last: dict = {}
    step = progress["step"]
    t_start = time.time()
    for epoch in range(progress["epoch"], tc.epochs):
        if ctx.kind == "train":
            import ray.train

            tables = ray.train.get_dataset_shard("train").iter_batches(
                batch_size=max(per_worker, 256), batch_format="pyarrow")
        else:   # Tune trials and tests stream the items table with pyarrow
            tables = storage.dataset(spec.items).to_batches()
        it = _epoch_batches(tables, tc, epoch, per_worker, input_mode, head.hidden_size)
        skip = step - epoch * per_epoch  # resumed mid-epoch: skip the batches already seen
        for b_idx, batch in enumerate(it):
            if b_idx >= per_epoch:
                break
            if b_idx < skip:
                continue
            check_train_only(batch)
            valid = np.asarray(batch["valid"]).astype(bool)
            anchor, pos, pos_mask, neg, neg_mask = draw_batch(
                batch["id"], valid, tc.seed, epoch, tc.n_positives, tc.n_distractors)
            index = np.concatenate([anchor[:, None], pos, neg], axis=1)
            out, gnorm = train_step(lambda: token_source(batch, index), pos_mask, neg_mask)
            step += 1
            faults.train_kill_worker(spec, step, ctx.rank, ctx.world, progress["step"])  # the last reported step
            faults.train_pause_at_step(spec, step, ctx.rank)
            metrics = {"loss": float(out.loss.detach()), "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                       "epoch": epoch, "step": step, **{f"loss_{k}": v for k, v in out.terms.items()}}
            if tracker is not None and step % 5 == 0:
                tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("step",)}, step)
            at_end = step == total_steps
            if at_end and tracker is not None:
                metrics["train_seconds"] = round(time.time() - t_start, 2)
            if step % val_every == 0 or step % ckpt_every == 0 or at_end:
                last = _evaluate_and_report(state, metrics, epoch, step)
                if ctx.rank == 0:
                    print(progress_line(last, tc.epochs, total_steps, time.time() - t_start,
                                        step - progress["resumed_from_step"]), flush=True)
                faults.train_kill_driver(step, spec.driver_pid, ctx.rank, storage)
        if step >= total_steps:
            break
    last["train_seconds"] = round(time.time() - t_start, 2)
    if tracker is not None and tracker.flush():
        log.warning("MLflow: %d metric points of this run could not be sent", tracker.lost_points)
    return last


def _evaluate_and_report(state: LoopState, metrics: dict, epoch: int, step: int) -> dict:
    """Validate (rank 0), update the progress, log val metrics and (last report) the outbox's
    lost count, save the checkpoint and report it to Ray Train / Tune / the local list."""
    ctx, progress, tracker = state.ctx, state.progress, state.tracker
    val = _validate(state.head, state.storage, state.cfg, state.spec.val_items, state.sources,
                    state.settings, state.token_source) if ctx.rank == 0 else {}
    metrics = {**metrics, **val}
    done_epoch = epoch + 1 if step % state.steps_per_epoch == 0 else epoch
    progress.update({"epoch": done_epoch, "step": step,
                     "best_val_ssr": max(progress["best_val_ssr"], val.get("val_ssr", -1.0))})
    metrics["resumed_from_step"] = progress["resumed_from_step"]
    if tracker is not None:
        if val or "train_seconds" in metrics:
            tracker.log_metrics({**val, **{k: metrics[k] for k in ("train_seconds",) if k in metrics}}, step)
        if "train_seconds" in metrics:
            # the last report: what could not reach the tracking server travels with it to the driver
            metrics["mlflow_lost_points"] = tracker.flush()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = None
        if ctx.rank == 0:
            state.model.head = state.head
            state.model.save_pretrained(tmp, metrics={k: v for k, v in val.items() if not k.endswith("rows")})
            save_training_state(tmp, state.opt, state.sched, state.scaler, progress)
            ckpt_dir = tmp
        ctx.report(metrics, ckpt_dir)
        if ctx.kind == "local" and ckpt_dir and ctx.out_dir:
            import shutil

            shutil.copytree(tmp, ctx.out_dir, dirs_exist_ok=True)
    return metrics


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(m: dict, epochs: int, total_steps: int, elapsed: float, steps_done: int) -> str:
    """`epoch 7/40 step 100/520 loss 3.06 val SSR 12.2 PA 47.8, eta 1m40s` (eta from this run's pace)."""
    line = f"epoch {int(m['epoch']) + 1}/{epochs} step {m['step']}/{total_steps} loss {m['loss']:.3f}"
    if "val_ssr" in m:
        line += f" val SSR {m['val_ssr']:.1f} PA {m['val_pa']:.1f}"
    if steps_done > 0:
        line += f", eta {_duration(elapsed / steps_done * (total_steps - m['step']))}"
    return line


def check_train_only(batch: dict) -> None:
    """Only the train split may ever reach the loss (the reference recipe trained on val/test)."""
    bad = [(i, s) for i, s in zip(batch["id"], batch["split"]) if s != "train"]
    if bad:
        raise ValueError(f"non-train items reached the training loss: {bad[:5]}")


def steps_for(n_items: int, batch_size: int, world: int, epochs: int) -> int:
    """Total optimizer steps of a run (`fit.steps_per_epoch` x epochs)."""
    return fit.steps_per_epoch(n_items, batch_size, world) * epochs

