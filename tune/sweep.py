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

import inspect
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from nearid.config import Config, LossConfig, TrainConfig, config_to_dict, flatten
from nearid.losses import LOSSES
from tune.state import StateKeeper, StateUnreadable, prepare_restore, recorded_trials

log = logging.getLogger("nearid.tune")
REPO = Path(__file__).resolve().parents[1]
RUN_KEY = "_mlflow_run_id"          # trial config key holding the trial's MLflow child run
DIST_KINDS = ("uniform", "loguniform", "int", "choice", "grid")
SPACE_KEYS = {"searcher", "scheduler", "reports_per_epoch", "checkpoint", "evaluate_split",
              "compare_losses", "seeds", "tie_break", "loss", "train", "params"}
TUNABLE_TRAIN = {"lr", "weight_decay", "warmup_steps", "batch_size", "grad_clip", "n_distractors"}
# Tie-break weight: below one SSR step (100 / rows) for validation sets of up to 10^4 rows.
TIE_EPS = 1e-4


class SpaceError(ValueError):
    """A search space file that cannot be used; the message names the file and the key."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C, SIGTERM); rerun to resume."""


# ---- search space -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """One hyper-parameter: kind in DIST_KINDS or "const"; values = (lo, hi) or the options."""
    kind: str
    values: tuple

    def suggest(self, trial, name: str):
        """Ask an Optuna trial (or Ray's captor of one) for a value."""
        if self.kind == "const":
            return self.values[0]
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(name, float(self.values[0]), float(self.values[1]),
                                       log=self.kind == "loguniform")
        if self.kind == "int":
            return trial.suggest_int(name, int(self.values[0]), int(self.values[1]))
        return trial.suggest_categorical(name, list(self.values))

    def grid_values(self, where: str) -> list:
        if self.kind == "const":
            return [self.values[0]]
        if self.kind in ("choice", "grid"):
            return list(self.values)
        raise SpaceError(f"{where}: a grid search needs {{grid: [...]}} or a constant, got {self.kind}")


def parse_dist(value: Any, where: str) -> Dist:
    if isinstance(value, (bool, int, float, str)):
        return Dist("const", (value,))
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DIST_KINDS:
        raise SpaceError(f"{where}: expected a constant or one of {{{', '.join(DIST_KINDS)}: ...}}, "
                         f"got {value!r}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "int"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
            raise SpaceError(f"{where}.{kind}: expected [low, high] numbers with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise SpaceError(f"{where}.loguniform: low must be > 0, got {args[0]!r}")
    return Dist(kind, tuple(args))


def loss_hparams(name: str) -> list[str]:
    """Keyword hyper-parameters a loss accepts (`gather` is plumbing, not a hyper-parameter)."""
    sig = inspect.signature(LOSSES[name].__init__)
    return [p for p in sig.parameters if p not in ("self", "gather")]


@dataclass
class SearchSpace:
    path: str
    text: str
    losses: list[str]
    train: dict[str, Dist] = field(default_factory=dict)
    params: dict[str, dict[str, Dist]] = field(default_factory=dict)
    searcher: str | None = None
    scheduler: str = "asha"
    reports_per_epoch: int = 1
    checkpoint: str = "best"
    evaluate_split: str = "val"
    compare_losses: bool = False
    seeds: list[int] | None = None
    tie_break: str | None = None

    def grid(self) -> list[dict]:
        """Every trial config of a grid search, in a fixed order (loss, seed, values)."""
        points = []
        for loss in self.losses:
            dims = [(f"train.{k}", d.grid_values(f"{self.path}: train.{k}")) for k, d in self.train.items()]
            dims += [(f"{loss}.{k}", d.grid_values(f"{self.path}: params.{loss}.{k}"))
                     for k, d in self.params.get(loss, {}).items()]
            for seed in self.seeds or [None]:
                for combo in itertools.product(*[v for _, v in dims]):
                    point = {"loss": loss, **dict(zip([k for k, _ in dims], combo))}
                    if seed is not None:
                        point["train.seed"] = seed
                    points.append(point)
        return points


def _choice(where: str, value, allowed) -> Any:
    if value not in allowed:
        raise SpaceError(f"{where} = {value!r}: use one of {list(allowed)}")
    return value


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Parse and check a search space YAML; errors name the file, the key and the bad value."""
    p = resolve_space_path(path)
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SpaceError(f"search space {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"search space {p} must hold a mapping")
    unknown = sorted(set(data) - SPACE_KEYS)
    if unknown:
        raise SpaceError(f"{p}: unknown key(s) {unknown}; valid: {sorted(SPACE_KEYS)}")
    loss = data.get("loss")
    if not isinstance(loss, dict) or len(loss) != 1 or next(iter(loss)) not in ("choice", "grid"):
        raise SpaceError(f"{p}: 'loss' must be {{choice: [...]}} or {{grid: [...]}}, got {loss!r}")
    losses = list(next(iter(loss.values())) or [])
    for name in losses:
        _choice(f"{p}: loss", name, LOSSES)
    if not losses:
        raise SpaceError(f"{p}: 'loss' lists no loss")
    space = SearchSpace(str(p), text, losses)
    space.searcher = data.get("searcher")
    if space.searcher is not None:
        _choice(f"{p}: searcher", space.searcher, ("optuna", "random", "grid"))
    if next(iter(loss)) == "grid" and space.searcher not in (None, "grid"):
        raise SpaceError(f"{p}: 'loss: {{grid: ...}}' needs 'searcher: grid', got {space.searcher!r}")
    space.scheduler = _choice(f"{p}: scheduler", data.get("scheduler", "asha"), ("asha", "none"))
    space.checkpoint = _choice(f"{p}: checkpoint", data.get("checkpoint", "best"), ("best", "last"))
    space.evaluate_split = _choice(f"{p}: evaluate_split", data.get("evaluate_split", "val"),
                                   ("train", "val", "test"))
    space.compare_losses = bool(data.get("compare_losses", False))
    rpe = data.get("reports_per_epoch", 1)
    if not isinstance(rpe, int) or rpe < 1:
        raise SpaceError(f"{p}: reports_per_epoch must be an integer >= 1, got {rpe!r}")
    space.reports_per_epoch = rpe
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)
                              or not seeds):
        raise SpaceError(f"{p}: seeds must be a non-empty list of integers, got {seeds!r}")
    space.seeds = seeds
    tie = data.get("tie_break")
    if tie is not None and not isinstance(tie, str):
        raise SpaceError(f"{p}: tie_break must be a reported metric name such as val_pa, got {tie!r}")
    space.tie_break = tie
    for k, v in (data.get("train") or {}).items():
        if k not in TUNABLE_TRAIN:
            raise SpaceError(f"{p}: train.{k} cannot be tuned; tunable: {sorted(TUNABLE_TRAIN)}")
        space.train[k] = parse_dist(v, f"{p}: train.{k}")
    for loss_name, block in (data.get("params") or {}).items():
        _choice(f"{p}: params", loss_name, LOSSES)
        accepted = loss_hparams(loss_name)
        for k, v in (block or {}).items():
            if k not in accepted:
                raise SpaceError(f"{p}: params.{loss_name}.{k} is not a hyper-parameter of loss "
                                 f"'{loss_name}'; valid: {accepted}")
            space.params.setdefault(loss_name, {})[k] = parse_dist(v, f"{p}: params.{loss_name}.{k}")
    return space


def resolve_space_path(path: str | os.PathLike) -> Path:
    """A space path as given, else relative to the repository (a job's working dir may differ)."""
    p = Path(path)
    for cand in (p, REPO / p):
        if cand.is_file():
            return cand.resolve()
    raise SpaceError(f"search space file not found: {path} (also looked in {REPO})")


class DefineByRun:
    """Optuna define-by-run space: the loss first, then only that loss's hyper-parameters, so TPE
    models each loss's parameters apart (a module-level class: searchers are pickled)."""

    def __init__(self, space: SearchSpace):
        self.losses, self.train, self.params = space.losses, space.train, space.params

    def __call__(self, trial) -> dict:
        consts: dict = {}
        loss = trial.suggest_categorical("loss", self.losses) if len(self.losses) > 1 else self.losses[0]
        consts["loss"] = loss
        named = [(f"train.{k}", d) for k, d in self.train.items()]
        named += [(f"{loss}.{k}", d) for k, d in self.params.get(loss, {}).items()]
        for name, d in named:
            value = d.suggest(trial, name)
            if d.kind == "const":
                consts[name] = value
        if len(self.losses) == 1:
            return consts
        return {k: v for k, v in consts.items() if k != "loss"}


def trial_params(trial: dict) -> dict:
    """A trial config without bookkeeping keys: what the searcher chose."""
    return {k: v for k, v in trial.items() if not k.startswith("_")}


def apply_trial(cfg: Config, trial: dict) -> Config:
    """The base config with one trial's choices applied. The base loss params carry over only to
    the base loss (a temperature set for nearid says nothing about circle's margin)."""
    from nearid.losses import build_loss

    name = trial.get("loss", cfg.train.loss.name)
    params = dict(cfg.train.loss.params) if name == cfg.train.loss.name else {}
    params.update({k.split(".", 1)[1]: v for k, v in trial.items() if k.startswith(f"{name}.")})
    build_loss(name, **params)  # fail here, naming the bad hyper-parameter, not inside a trial
    out = cfg.model_copy(deep=True)
    out.train.loss = LossConfig(name=name, params=params)
    for k, v in trial.items():
        if k.startswith("train."):
            setattr(out.train, k.split(".", 1)[1], v)
    return out


def effective_params(cfg: Config, trial: dict) -> dict:
    """What a trial trains with, as flat MLflow params: loss, loss.<hp> (defaults included), train.*."""
    tcfg = apply_trial(cfg, trial)
    loss = tcfg.train.loss
    defaults = {k: p.default for k, p in inspect.signature(LOSSES[loss.name].__init__).parameters.items()
                if k in loss_hparams(loss.name)}
    out: dict[str, Any] = {"loss": loss.name}
    out.update({f"loss.{k}": v for k, v in {**defaults, **loss.params}.items()})
    out.update({f"train.{k}": getattr(tcfg.train, k) for k in sorted(TUNABLE_TRAIN | {"seed", "epochs"})})
    return out


# ---- the trial ----------------------------------------------------------------------------------
def run_trial(config: dict, base: dict) -> None:
    """Tune function trainable: one training run with the trial's hyper-parameters applied."""
    from nearid.training.loop import train_loop

    cfg = apply_trial(Config.model_validate_json(base["cfg"]), trial_params(config))
    train_loop({**base, "cfg": cfg.model_dump_json(), "run_id": config.get(RUN_KEY), "context": "tune"})


def plan_reports(n_items: int, train: TrainConfig, reports_per_epoch: int) -> tuple[int, int]:
    """(steps between reports, reports per trial) for a single-process trial.

    The sweep owns the cadence: trials validate and checkpoint every `reports_per_epoch`-th of an
    epoch (train.val_every_steps / checkpoint_every_steps are overridden), and train_loop also
    reports at the last step."""
    steps_per_epoch = max(1, n_items // max(2, train.batch_size))
    total = steps_per_epoch * train.epochs
    every = max(1, steps_per_epoch // reports_per_epoch)
    return every, total // every + (1 if total % every else 0)


def trial_dirname(trial) -> str:
    return trial.trial_id


def tie_broken(result: dict | None, metric: str, tie_break: str | None, mode: str = "max") -> dict | None:
    """The result with `metric` moved by TIE_EPS * tie_break towards "better" (the tie-break is a
    higher-is-better metric such as val_pa, whatever the metric's mode).

    SSR is all-or-nothing per row, so early in training every trial ties at 0 and neither ASHA
    nor TPE can rank them; PA moves long before SSR does. The scheduler and the searcher see
    this score; tables, MLflow and the reported metric stay the plain metric."""
    if not result or not tie_break or result.get(metric) is None or result.get(tie_break) is None:
        return result
    sign = 1.0 if mode == "max" else -1.0
    return {**result, metric: float(result[metric]) + sign * TIE_EPS * float(result[tie_break])}


class TieBreakASHA(ASHAScheduler):
    """ASHA ranking trials by `tie_broken` scores."""

    def __init__(self, tie_break: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tie_break = tie_break

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._score(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._score(result))

    def _score(self, result: dict) -> dict:
        return tie_broken(result, self._metric, self.tie_break, self._mode)


# ---- searchers -----------------------------------------------------------------------------------
class GridSearcher(Searcher):
    """Hands out a fixed list of configs in order (the ablation grid), then reports FINISHED."""

    def __init__(self, points: list[dict], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points, self.next_index = points, 0

    def suggest(self, trial_id: str):
        if self.next_index >= len(self.points):
            return Searcher.FINISHED
        self.next_index += 1
        return dict(self.points[self.next_index - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"points": self.points, "next": self.next_index}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.points, self.next_index = state["points"], state["next"]


class ChildRunSearcher(Searcher):
    """Wraps the real searcher: each suggestion gets an MLflow child run (params logged) created
    here on the driver, and its id travels in the trial config; completion closes it. A wrapper
    (it has `.searcher`) so Tune saves its state next to the inner searcher's."""

    def __init__(self, searcher: Searcher, tracking: dict, parent_run_id: str | None, sweep: str,
                 base_cfg_json: str, max_t: int, metric: str, mode: str, tie_break: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.searcher, self.tracking, self.parent_run_id = searcher, tracking, parent_run_id
        self.sweep, self.base_cfg_json, self.max_t = sweep, base_cfg_json, max_t
        self.tie_break = tie_break
        self.runs: dict[str, str] = {}
        self._base = None   # one Tracker (one MLflow client) for every trial run, not pickled

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_base"] = None
        return state

    def _tracker(self, run_id: str | None = None):
        from nearid.tracking import Tracker

        if getattr(self, "_base", None) is None:
            self._base = Tracker(**self.tracking)
        return self._base.for_run(run_id)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        suggestion = self.searcher.suggest(trial_id)
        if suggestion in (None, Searcher.FINISHED):
            return suggestion
        suggestion = dict(suggestion)
        t = self._tracker()
        cfg = Config.model_validate_json(self.base_cfg_json)
        params = effective_params(cfg, suggestion)
        run_id = t.start(f"{self.sweep}-{trial_id}", parent_run_id=self.parent_run_id,
                         tags={"stage": "tune-trial", "sweep": self.sweep, "tune.trial_id": trial_id,
                               "loss": params["loss"]})
        t.log_params(params)
        if run_id:
            self.runs[trial_id] = run_id
            suggestion[RUN_KEY] = run_id
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, tie_broken(result, self.metric, self.tie_break, self.mode))

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        scored = tie_broken(result, self.metric, self.tie_break, self.mode)
        self.searcher.on_trial_complete(trial_id, result=scored, error=error)
        run_id = self.runs.get(trial_id)
        if not run_id:
            return
        t = self._tracker(run_id)
        reports = int((result or {}).get("training_iteration", 0))
        outcome = "error" if error else ("stopped_early" if reports < self.max_t else "completed")
        t.set_tags({"tune.outcome": outcome, "tune.reports": str(reports)})
        t.end("FAILED" if error else "FINISHED")

    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("searcher", "_base", "_client")}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def build_searcher(space: SearchSpace, kind: str, metric: str, mode: str, seed: int,
                   num_samples: int) -> Searcher:
    if kind == "grid":
        return GridSearcher(space.grid(), metric, mode)
    if space.seeds and len(space.seeds) > 1:
        raise SpaceError(f"{space.path}: several seeds need 'searcher: grid'")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        # TPE's default waits 10 random trials; a 6-trial sweep would never leave the random phase
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, num_samples // 2)))
    return OptunaSearch(space=DefineByRun(space), metric=metric, mode=mode, sampler=sampler)


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

    base = {"cfg": base_cfg.model_dump_json(), "settings": settings, "items": items,
            "val_items": val_items, "n_items": n_items, "tracking_uri": tracker.uri}
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
    callbacks = [StateKeeper(storage.path("tune", name), storage.fs)]
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=tc.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage.path("tune"), storage_filesystem=storage.fs,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=tc.metric,
                                                    checkpoint_score_order=tc.mode),
            failure_config=tune.FailureConfig(max_failures=base_cfg.train.max_failures),
            callbacks=callbacks, verbose=1),
    )


# ---- after the sweep: evaluate, publish, tables, plot ------------------------------------------------
def _pick_checkpoint(result, which: str, metric: str, mode: str, tie_break: str | None):
    if which == "best":
        pairs = [(c, tie_broken(m, metric, tie_break, mode)[metric])
                 for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
        if pairs:
            pick = max if mode == "max" else min
            return pick(pairs, key=lambda cs: cs[1])[0]
    return result.checkpoint


def evaluate_model_dir(cfg: Config, storage, model_dir: str, split: str) -> dict:
    """NearID SSR/PA, MTG M-O and DB++ M-H of one model dir on one split (NaN where absent)."""
    from nearid.stages.evaluate import evaluate_scorers

    sub = cfg.model_copy(deep=True)
    sub.eval.split = split
    row = evaluate_scorers(sub, storage, [f"nearid:{model_dir}"])["rows"][0]
    return {"ssr": float(row["nearid_ssr"]), "pa": float(row["nearid_pa"]),
            "m_o": float(row.get("mtg_m_o", math.nan)), "m_h": float(row.get("db_m_h", math.nan))}


def _evaluate_checkpoint(cfg, storage, ckpt, split: str) -> dict:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        return evaluate_model_dir(cfg, storage, d, split)


def _trial_rows(grid, cfg, base_cfg, storage, space, max_t) -> list[dict]:
    tc = base_cfg.tune
    rows = []
    for result in grid:
        config = result.config or {}
        hp = trial_params(config)
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        reports = int(metrics.get("training_iteration", 0))
        best, score = math.nan, math.nan
        if df is not None and tc.metric in df and df[tc.metric].notna().any():
            sign = 1.0 if tc.mode == "max" else -1.0
            scores = df[tc.metric] + (sign * TIE_EPS * df[space.tie_break].fillna(0)
                                      if space.tie_break and space.tie_break in df else 0)
            best = float(df[tc.metric].max() if tc.mode == "max" else df[tc.metric].min())
            score = float(scores.max() if tc.mode == "max" else scores.min())
        outcome = "error" if result.error else ("stopped_early" if reports < max_t else "completed")
        ckpt = _pick_checkpoint(result, space.checkpoint, tc.metric, tc.mode, space.tie_break)
        ev = _evaluate_checkpoint(cfg, storage, ckpt, space.evaluate_split)
        rows.append({"trial": Path(result.path).name, "loss": hp.get("loss", base_cfg.train.loss.name),
                     "params": {k: v for k, v in hp.items() if k != "loss"},
                     f"best_{tc.metric}": best, "score": score, "reports": reports, "outcome": outcome,
                     "run_id": config.get(RUN_KEY), "checkpoint": ckpt, "config": hp,
                     **{f"{space.evaluate_split}_{k}": v for k, v in ev.items()}})
    return rows


def _log_child_results(tracker, rows, split, metric) -> None:
    for r in rows:
        if not r["run_id"]:
            continue
        child = tracker.for_run(r["run_id"])
        vals = {k: r[k] for k in r if k.startswith(f"{split}_") or k == f"best_{metric}"}
        child.log_metrics({f"final/{k}": v for k, v in vals.items() if isinstance(v, float)})
        child.set_tags({"tune.outcome": r["outcome"], "tune.reports": str(r["reports"])})
        child.end("FAILED" if r["outcome"] == "error" else "FINISHED")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}")
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def trials_frame(rows: list[dict], metric: str, split: str) -> pd.DataFrame:
    out = []
    for r in rows:
        hp = ", ".join(f"{k.split('.', 1)[-1]}={_fmt(v)}" for k, v in sorted(r["params"].items()))
        out.append({"trial": r["trial"], "loss": r["loss"], "hyper-parameters": hp,
                    f"best {metric}": r[f"best_{metric}"],
                    **{f"{split} {label}": r.get(f"{split}_{key}", math.nan)
                       for key, label in (("ssr", "SSR"), ("pa", "PA"), ("m_o", "M-O"), ("m_h", "M-H"))},
                    "reports": r["reports"], "outcome": r["outcome"]})
    return pd.DataFrame(out)


def ablation_frame(rows: list[dict], split: str) -> pd.DataFrame:
    """One row per loss (mean over seeds), in the order the losses were listed."""
    df = pd.DataFrame([{"loss": r["loss"], "SSR": r.get(f"{split}_ssr", math.nan),
                        "PA": r.get(f"{split}_pa", math.nan), "M-O": r.get(f"{split}_m_o", math.nan),
                        "M-H": r.get(f"{split}_m_h", math.nan)} for r in rows])
    order = list(dict.fromkeys(df["loss"]))
    agg = df.groupby("loss", sort=False).agg(["mean", "count"])
    out = pd.DataFrame({"loss": order})
    for col in ("SSR", "PA", "M-O", "M-H"):
        out[col] = [float(agg.loc[loss, (col, "mean")]) for loss in order]
    out["seeds"] = [int(agg.loc[loss, ("SSR", "count")]) for loss in order]
    return out


def hparam_figure(rows: list[dict], metric: str):
    """One scatter panel per hyper-parameter (x: value, y: the trial's best metric), one marker
    colour per loss; log x for parameters that span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in rows for k in r["params"]})
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    colours = {loss: plt.cm.tab10(i % 10) for i, loss in enumerate(losses)}
    panels = ["loss", *names]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for loss in losses:
            pts = [(losses.index(r["loss"]) if name == "loss" else r["params"].get(name), r[f"best_{metric}"])
                   for r in rows if r["loss"] == loss]
            pts = [(x, y) for x, y in pts if x is not None and isinstance(x, (int, float))]
            if pts:
                ax.scatter(*zip(*pts), color=colours[loss], label=loss, s=30)
        if name == "loss":
            ax.set_xticks(range(len(losses)), losses, rotation=30, fontsize=7)
        else:
            xs = [r["params"][name] for r in rows if isinstance(r["params"].get(name), (int, float))]
            if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        ax.set_xlabel(name), ax.set_ylabel(metric)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"hyper-parameters vs {metric} (best report of each trial)")
    fig.tight_layout()
    return fig


def _summarise(grid, cfg, base_cfg, storage, tracker, space, name, max_t, t0) -> dict:
    from nearid.stages.train import publish_model

    tc = base_cfg.tune
    split = space.evaluate_split
    t_eval = time.time()
    rows = _trial_rows(grid, cfg, base_cfg, storage, space, max_t)
    _log_child_results(tracker, rows, split, tc.metric)
    key = f"best_{tc.metric}"
    ranked = [r for r in rows if not math.isnan(r[key]) and r["checkpoint"] is not None]
    if not ranked:
        tracker.end("FAILED")
        raise RuntimeError(f"sweep {name}: no trial reported {tc.metric}; errors: "
                           f"{[str(r.error)[:200] for r in grid if r.error]}")
    sign = 1 if tc.mode == "max" else -1
    best = max(ranked, key=lambda r: sign * r["score"])
    model_rel = f"models/{name}-best"
    publish_model(best["checkpoint"], storage, model_rel)
    model_dir = storage.uri(model_rel)
    test = evaluate_model_dir(cfg, storage, model_dir, cfg.eval.split)
    eval_seconds = round(time.time() - t_eval, 1)
    trials_df = trials_frame(rows, tc.metric, split)
    base = f"reports/{name}"
    storage.write_bytes(f"{base}/trials.csv", trials_df.to_csv(index=False).encode())
    md = markdown_table(trials_df)
    storage.write_bytes(f"{base}/trials.md", md.encode())
    table_md = md
    if space.compare_losses:
        ab = ablation_frame(rows, split)
        table_md = markdown_table(ab)
        storage.write_bytes(f"{base}/ablation.csv", ab.to_csv(index=False).encode())
        storage.write_bytes(f"{base}/ablation.md", table_md.encode())
        tracker.log_text(table_md, "ablation.md")
        tracker.log_text(ab.to_csv(index=False), "ablation.csv")
        for r in ab.to_dict("records"):
            tracker.log_metrics({f"ablation/{r['loss']}/{c}": r[c] for c in ("SSR", "PA", "M-O", "M-H")})
    fig = hparam_figure(rows, tc.metric)
    buf_path = storage.path(base, "hparams_vs_" + tc.metric + ".png") if not storage.is_s3 else None
    if buf_path:
        fig.savefig(buf_path, dpi=110)
    tracker.log_figure(fig, f"plots/hparams_vs_{tc.metric}.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    stopped = sum(r["outcome"] == "stopped_early" for r in rows)
    errors = sum(r["outcome"] == "error" for r in rows)
    best_cfg = best["config"]
    tracker.log_params({f"best.{k}": v for k, v in effective_params(base_cfg, best_cfg).items()})
    tracker.log_metrics({f"best/{tc.metric}": best[key],
                         **{f"best/{cfg.eval.split}_{k}": v for k, v in test.items()},
                         "time/sweep_seconds": round(time.time() - t0, 1)})
    tracker.set_tags({"best_trial": best["trial"], "model_dir": model_dir,
                      "best_child_run_id": best["run_id"] or "", "count.trials": str(len(rows)),
                      "count.stopped_early": str(stopped), "count.errors": str(errors)})
    tracker.log_text(md, "trials.md")
    tracker.log_text(trials_df.to_csv(index=False), "trials.csv")
    tracker.end("FINISHED")
    summary = {"name": name, "best_config": best_cfg, "best_trial": best["trial"],
               "best_val_ssr": best[key] if tc.metric == "val_ssr" else None,
               f"best_{tc.metric}": best[key], "best_eval": {cfg.eval.split: test},
               "model_dir": model_dir, "table_markdown": table_md, "trials_markdown": md,
               "trials": len(rows), "stopped_early": stopped, "errors": errors,
               "parent_run_id": tracker.run_id, "report_dir": storage.uri(base),
               "eval_seconds": eval_seconds, "seconds": round(time.time() - t0, 1)}
    log.info("sweep %s: %d trials, %d stopped early, best %s = %.2f (%s)", name, len(rows), stopped,
             tc.metric, best[key], best["trial"])
    return summary
