"""Search spaces for `tune.sweep`: the YAML format (tune/spaces/*.yaml), its checks, and how a
trial's choices become a config (`apply_trial`) and flat MLflow params (`effective_params`)."""
from __future__ import annotations

import inspect
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nearid.config import Config, LossConfig
from nearid.losses import LOSSES

REPO = Path(__file__).resolve().parents[1]
RUN_KEY = "_mlflow_run_id"          # trial config key holding the trial's MLflow child run
DIST_KINDS = ("uniform", "loguniform", "int", "choice", "grid")
SPACE_KEYS = {"searcher", "scheduler", "reports_per_epoch", "checkpoint", "evaluate_split",
              "compare_losses", "seeds", "tie_break", "loss", "train", "params"}
TUNABLE_TRAIN = {"lr", "weight_decay", "warmup_steps", "batch_size", "grad_clip", "n_distractors"}


class SpaceError(ValueError):
    """A search space file that cannot be used; the message names the file and the key."""


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
