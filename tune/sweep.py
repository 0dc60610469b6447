"""Ray Tune sweeps over the loss and its hyper-parameters, tracked in MLflow.

`run_sweep(cfg, storage, ray, space_path=None, name=None)` reads a search space YAML
(tune/spaces/*.yaml), then runs one plain function trainable per trial: the same `train_loop` as
`jobs/train.py`, on the cached features, reporting val_ssr / val_pa (with a checkpoint) several
times per epoch so ASHA sees intermediate results. Optuna (TPE or random) or a fixed grid
proposes; ties in the metric (SSR is all-or-nothing per row, so early trials tie at 0) are broken
by a second metric (`tie_break: val_pa`) for ASHA and TPE only.

MLflow: one parent run per sweep and one child run per trial. Child runs are created, given
their params and closed on the driver (by `ChildRunSearcher`), so SQLite sees a single writer for
everything but the metrics that trials append. After the sweep each trial's chosen checkpoint
is evaluated (NearID SSR/PA, MTG M-O, DB++ M-H), the best trial's model is published as
`<root>/models/<sweep>-best`, and tables + a hyper-parameter plot go to `<root>/reports/<sweep>/`
and to the parent run.

Resume: the Tune experiment lives at `<root>/tune/<sweep>`; running the same sweep name again
restores it (`Tuner.restore`), so finished trials are kept and unfinished ones continue from
their last checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from nearid.config import Config, TrainConfig, config_to_dict, flatten
from nearid.training.fit import steps_per_epoch
from nearid.training.spec import LoopSpec
from tune.search import (TIE_EPS, ChildRunSearcher, GridSearcher, TieBreakASHA,
                         build_searcher, tie_broken)
from tune.space import (DIST_KINDS, REPO, RUN_KEY, SPACE_KEYS, TUNABLE_TRAIN,
                        DefineByRun, Dist, SearchSpace, SpaceError, apply_trial, effective_params,
                        load_space, loss_hparams, parse_dist, resolve_space_path, trial_params)
from tune.state import StateKeeper, StateUnreadable, prepare_restore, recorded_trials
from tune.summary import (_summarise, ablation_frame, evaluate_model_dir, hparam_figure,
                          markdown_table, trials_frame)

log = logging.getLogger("nearid.tune")
# The driver lives here; the phases it calls are re-exported so `from tune.sweep import ...` keeps
# working (and searcher/scheduler pickles of older experiment states still resolve).
__all__ = ["DIST_KINDS", "REPO", "RUN_KEY", "SPACE_KEYS", "TIE_EPS", "TUNABLE_TRAIN", "ChildRunSearcher",
           "DefineByRun", "Dist", "GridSearcher", "SearchSpace", "SpaceError", "SweepInterrupted",
           "TieBreakASHA", "ablation_frame", "apply_trial", "build_searcher", "effective_params",
           "evaluate_model_dir", "hparam_figure", "load_space", "loss_hparams", "markdown_table",
           "parse_dist", "plan_reports", "recorded_trials", "resolve_space_path", "run_sweep", "run_trial",
           "sweep_name", "tie_broken", "trial_dirname", "trial_params", "trials_frame"]


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C, SIGTERM); rerun to resume."""


# ---- the trial ----------------------------------------------------------------------------------
def run_trial(config: dict, base: dict) -> None:
    """Tune function trainable: one training run with the trial's hyper-parameters applied."""
    from nearid.training.loop import train_loop
    from nearid.training.spec import LoopSpec

    spec = LoopSpec.from_dict(base)
    cfg = apply_trial(spec.config(), trial_params(config))
    train_loop(spec.with_(cfg=cfg.model_dump_json(), run_id=config.get(RUN_KEY), context="tune"))


def plan_reports(n_items: int, train: TrainConfig, reports_per_epoch: int) -> tuple[int, int]:
    """(steps between reports, reports per trial) for a single-process trial.

    The sweep owns the cadence: trials validate and checkpoint every `reports_per_epoch`-th of an
    epoch (train.val_every_steps / checkpoint_every_steps are overridden), and train_loop also
    reports at the last step."""
    per_epoch = steps_per_epoch(n_items, train.batch_size, 1)
    total = per_epoch * train.epochs
    every = max(1, per_epoch // reports_per_epoch)
    return every, total // every + (1 if total % every else 0)


KEEP_CHECKPOINTS = 2   # per finished trial: its best 2 by the metric, and its last

def trial_dirname(trial) -> str:
    return trial.trial_id


# ---- the sweep ---------------------------------------------------------------------------------------
def sweep_name(cfg: Config, space: SearchSpace, name: str | None) -> str:
    return name or f"{cfg.run.name}-{Path(space.path).stem}"


def run_sweep(cfg: Config, storage, ray, space_path: str | None = None, name: str | None = None,
              tracker=None) -> dict:
    """Run (or resume) a sweep; returns {"best_config", "best_val_ssr", "model_dir",
    "table_markdown", "trials", "stopped_early", ...}. Resubmitting the same name resumes an
    interrupted sweep and returns the saved summary of a finished one. `tracker`: where the
    sweep's MLflow run goes (e.g. the pipeline's `tracker.child()`); default from cfg."""
    from ray import tune

    from nearid.stages.train import build_items, train_settings
    from nearid.tracking import Tracker

    t0 = time.time()
    space = load_space(space_path or cfg.tune.space)
    name = sweep_name(cfg, space, name)
    report_rel = f"reports/{name}"
    if storage.exists(report_rel, "summary.json"):
        log.info("sweep %s finished before: returning %s (use another --name to run again)",
                 name, storage.uri(report_rel, "summary.json"))
        return storage.read_json(f"{report_rel}/summary.json")
    if "://" not in cfg.run.root:
        cfg = cfg.model_copy(deep=True)
        cfg.run.root = os.path.abspath(cfg.run.root)  # trials run in their own folders
    tc = cfg.tune
    searcher_kind = space.searcher or tc.searcher
    settings = train_settings(cfg, storage)
    if not settings:
        raise ValueError("no training settings: generate distractors first or set train.settings")
    items, n_items = build_items(ray, cfg, storage, "train", settings, cfg.train.mtg_repeat)
    val_items, _ = build_items(ray, cfg, storage, "val", settings, 0)

    base_cfg = cfg.model_copy(deep=True)
    base_cfg.train.epochs = tc.epochs or cfg.train.epochs
    base_cfg.train.num_workers = 1
    base_cfg.train.cpus_per_worker = tc.cpus_per_trial
    base_cfg.train.use_gpu = tc.gpus_per_trial > 0
    val_every, max_t = plan_reports(n_items, base_cfg.train, space.reports_per_epoch)
    base_cfg.train.val_every_steps = val_every
    base_cfg.train.checkpoint_every_steps = val_every
    points = space.grid() if searcher_kind == "grid" else None
    num_samples = len(points) if points is not None else tc.num_samples

    tracker = tracker if tracker is not None else Tracker.from_config(cfg, storage)
    meta_rel = f"tune/_sweeps/{name}.json"
    meta = storage.read_json(meta_rel) if storage.exists(meta_rel) else None
    if meta is not None and meta["space"] != space.text:
        raise ValueError(f"sweep '{name}' exists at {storage.uri('tune', name)} with a different search "
                         f"space than {space.path}: pick another --name")
    if meta is None:
        parent = tracker.start(name, tags={"stage": "tune", "sweep": name, "space": space.path,
                                           "searcher": searcher_kind, "scheduler": space.scheduler})
        tracker.log_params({**flatten(config_to_dict(base_cfg)), "tune.searcher_resolved": searcher_kind,
                            "tune.max_reports": max_t, "tune.num_samples_resolved": num_samples,
                            "train.items": n_items})
        tracker.log_text(space.text, "search_space.yaml")
        meta = {"space": space.text, "parent_run_id": parent, "max_t": max_t}
        storage.write_json(meta_rel, meta)
    else:
        tracker.attach(meta["parent_run_id"])
        tracker.set_tags({"tune.resumed": "true"})
    parent = meta["parent_run_id"]

    base = LoopSpec(cfg=base_cfg.model_dump_json(), settings=settings, items=items, val_items=val_items,
                    n_items=n_items, tracking_uri=tracker.uri, context="tune").to_dict()
    resources = {"cpu": tc.cpus_per_trial, "gpu": tc.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base), resources)
    exp_path = storage.path("tune", name)  # with storage_filesystem Ray wants the scheme-less path
    prepare_restore(exp_path, storage.fs)   # a torn state file (driver killed mid-copy) is set aside
    if tune.Tuner.can_restore(exp_path, storage_filesystem=storage.fs):
        log.info("resuming sweep %s from %s", name, exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=storage.fs)
    else:
        tuner = _new_tuner(trainable, space, searcher_kind, base_cfg, tracker, parent, name, max_t,
                           num_samples, storage)
    t_fit = time.time()
    grid = tuner.fit()
    fit_seconds = round(time.time() - t_fit, 1)
    log.info("sweep %s: trials ran in %.1fs", name, fit_seconds)
    # After a SIGINT Tune returns normally and its in-memory trials all read TERMINATED; the saved
    # state keeps the truth. Summarising an interrupted sweep would mark it done (no resume).
    try:
        recorded = recorded_trials(exp_path, storage.fs)
    except StateUnreadable as e:   # fit() has returned: ask its results which trials ended
        log.warning("%s; counting the trials Tune returned instead", e)
        recorded = {r.path: "ERROR" if r.error else "TERMINATED" if (r.metrics or {}).get("done") else "RUNNING"
                    for r in grid}
    done = sum(s in ("TERMINATED", "ERROR") for s in recorded.values())
    if done < num_samples:
        raise SweepInterrupted(f"sweep '{name}' stopped with {done} of {num_samples} trials finished; "
                               f"run it again with the same name to resume from {storage.uri('tune', name)}")
    summary = {**_summarise(grid, cfg, base_cfg, storage, tracker, space, name, max_t, t0),
               "fit_seconds": fit_seconds}
    storage.write_json(f"{report_rel}/summary.json", summary)
    return summary


def _new_tuner(trainable, space, searcher_kind, base_cfg, tracker, parent, name, max_t, num_samples, storage):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    tc = base_cfg.tune
    inner = build_searcher(space, searcher_kind, tc.metric, tc.mode, base_cfg.run.seed, num_samples)
    tracking = tracker.settings()
    searcher = ChildRunSearcher(inner, tracking, parent, name, base_cfg.model_dump_json(), max_t,
                                tc.metric, tc.mode, space.tie_break)
    if space.scheduler == "asha":
        scheduler = TieBreakASHA(tie_break=space.tie_break, time_attr="training_iteration", max_t=max_t,
                                 grace_period=min(tc.grace_period, max_t),
                                 reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    # Tune keeps every checkpoint; StateKeeper prunes a trial's to the same KEEP_CHECKPOINTS once
    # no restorable state can name the deleted ones (see tune/state.py)
    callbacks = [StateKeeper(storage.path("tune", name), storage.fs, keep=KEEP_CHECKPOINTS, mode=tc.mode,
                             score=lambda r: (tie_broken(r, tc.metric, space.tie_break, tc.mode) or {}).get(tc.metric))]
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=tc.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage.path("tune"), storage_filesystem=storage.fs,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=tc.metric,
                                                    checkpoint_score_order=tc.mode),
            failure_config=tune.FailureConfig(max_failures=base_cfg.train.max_failures),
            callbacks=callbacks, verbose=1),
    )

