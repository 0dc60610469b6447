"""Checks that are cheap and can fail long after Ray starts, run when the config loads.

Pydantic checks each field's type; these check what fields mean together: the loss builds with
its parameters, every scorer and backend name exists, the tracking URI has a scheme MLflow knows,
the search space file is there. Each failure is a ConfigError naming the key and the value.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, ConfigError

TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "databricks", "postgresql", "mysql", "mssql")
REPO = Path(__file__).resolve().parents[1]


def check_loss(cfg: Config) -> None:
    from .losses import LOSSES, build_loss

    name, params = cfg.train.loss.name, cfg.train.loss.params
    if name not in LOSSES:
        raise ConfigError(f"train.loss.name = {name!r}: use one of {sorted(LOSSES)}")
    try:
        build_loss(name, **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.loss.params {params!r} for loss {name!r}: {e}") from None


def check_scorers(scorers: list[str], readouts: list[str], where: str = "eval.scorers") -> None:
    from .scorers import parse_scorer

    for s in scorers:
        try:
            sc = parse_scorer(s)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if sc.kind == "nearid" and sc.model:
            check_model_source(sc.model, f"{where}: scorer {s!r}")
        elif sc.kind == "frozen" and not sc.other_backbone and sc.readout not in readouts:
            raise ConfigError(f"{where}: scorer {s!r} needs readout {sc.readout!r}, but extract.readouts is "
                              f"{readouts}: use one of {[f'frozen:{x}' for x in readouts]} (or "
                              f"frozen:{sc.readout}@<backbone> for another backbone)")


def check_benchmarks(cfg: Config) -> None:
    from .benchmarks.registry import names

    unknown = [b for b in cfg.eval.benchmarks if b not in names()]
    if unknown:
        raise ConfigError(f"eval.benchmarks: unknown benchmark(s) {unknown}: use any of {names()}")


def check_backends(cfg: Config) -> None:
    from .generate.backends import VALID_KINDS

    for name, setting in cfg.generate.settings.items():
        if setting.backend not in VALID_KINDS:
            raise ConfigError(f"generate.settings.{name}.backend = {setting.backend!r}: use one of "
                              f"{list(VALID_KINDS)}")


def check_tracking_uri(cfg: Config) -> None:
    uri = cfg.tracking.uri
    if uri is None:
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.uri = {uri!r}: the scheme must be one of {list(TRACKING_SCHEMES)}")


def resolve_repo_path(path: str) -> Path | None:
    for p in (Path(path), REPO / path):
        if p.is_file():
            return p
    return None


def check_config(cfg: Config, stage: str) -> None:
    check_loss(cfg)
    check_scorers(cfg.eval.scorers, list(cfg.extract.readouts))
    check_benchmarks(cfg)
    check_backends(cfg)
    check_tracking_uri(cfg)
    if stage == "tune" and resolve_repo_path(cfg.tune.space) is None:
        raise ConfigError(f"tune.space = {cfg.tune.space!r}: no such file")


def check_model_source(path: str, where: str = "--model") -> None:
    """A local model dir must exist and hold config.json; s3:// and hub ids are checked on load."""
    p = Path(path)
    if "://" in path or (not p.exists() and path.count("/") == 1 and not path.startswith((".", "/"))):
        return
    if not p.is_dir():
        raise ConfigError(f"{where}: model dir not found: {path}")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where}: {path} holds no config.json (not a model dir)")


def check_input_file(path: str, where: str) -> None:
    if "://" in path:
        return
    if not Path(path).is_file():
        raise ConfigError(f"{where}: file not found: {path}")
