"""Typed configuration: one pydantic model per stage, loaded from YAML, overridable from the CLI.

`load_config("configs/local.yaml", ["train.lr=3e-4"])` returns a validated `Config`; every error
names the field and the bad value. `save_config` writes the resolved config next to a run's
outputs (secrets are never written).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Strict):
    name: str = "demo"
    root: str = "runs/demo"           # local folder or s3://bucket/prefix
    seed: int = 0


class StorageConfig(Strict):
    """S3 settings; empty fields fall back to the usual AWS environment variables.

    Leases (`nearid.io.leases`): a stage holds one per table it writes; a lease whose heartbeat is
    older than `lease_expiry_s` is taken over. `lease_wait_s`: how long a run waits for another
    run's lease (0: refuse at once; null: no limit; `--wait [SECONDS]` sets it)."""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    lease_expiry_s: float = Field(120.0, gt=0)
    lease_wait_s: float | None = Field(0.0, ge=0)


class RayConfig(Strict):
    address: str | None = None        # None: local ray.init(); "auto" inside `ray job submit`
    num_cpus: float | None = None
    object_store_memory_mb: int | None = None


class SynthConfig(Strict):
    n_identities: int = Field(600, ge=3)
    n_views: int = Field(3, ge=2, le=3)
    resolution: int = Field(64, ge=32, le=1024)
    split: dict[str, float] = {"train": 0.8, "val": 0.05, "test": 0.15}
    closeness: float = Field(1.0, ge=0.0, le=1.0)
    # what a look-alike may change (null: all five of color1, color2, pattern, shape, parts);
    # [shape, pattern, parts] keeps its colours: nearer its identity than a random other (world_study.md)
    lookalike_attributes: list[str] | None = None
    # "photo": backgrounds cut from the real photos that ship in wheels (nearid.synth.photos),
    # falling back to the procedural ones (warned) where they cannot be had
    backgrounds: Literal["procedural", "photo"] = "procedural"
    area_range: tuple[float, float] = (0.15, 0.32)   # object area / image area, per view
    # look-alikes whose change covers less of the image are re-drawn (nearid.synth.visibility);
    # 0 keeps every draw (the worlds rendered before this setting existed)
    min_visible_share: float = Field(0.0, ge=0.0, le=0.5)
    n_mtg: int = Field(100, ge=0)
    n_graded: int = Field(60, ge=0)
    num_blocks: int = Field(8, ge=1)

    @field_validator("split")
    @classmethod
    def _split_names(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - {"train", "val", "test"}
        if bad:
            raise ValueError(f"unknown split names {sorted(bad)}; use train/val/test")
        if any(x < 0 for x in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"split fractions must be >= 0 and not all 0, got {v}")
        return v


class SettingConfig(Strict):
    backend: str = "procedural"
    params: dict[str, Any] = {}
    resolution: int | None = None
    batch_size: int = Field(16, ge=1)
    n_changes: int = Field(1, ge=1, le=5)   # at most one change per attribute (synth.variation)


class GenerateConfig(Strict):
    settings: dict[str, SettingConfig] = {"flux": SettingConfig()}
    held_apart: list[str] = []
    mask_dilation: int = Field(2, ge=0)
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    validate_sample: int = Field(200, ge=0)


RANDOM_BACKBONE_NAMES = ("tiny-random", "so400m-random")


class BackboneConfig(Strict):
    name: str = "tiny-random"          # tiny-random | so400m-random | hub id | local dir | s3:// path
    tiny: dict[str, Any] = {}
    seed: int = 0
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"

    def identity(self) -> dict[str, Any]:
        """What fixes the tokens this backbone gives an image: its name, plus the seed of a random
        backbone and the dims (resolution, patch size, ...) of the tiny one; a named pretrained
        backbone's weights and resolution come with its name. `features/_scorer.json`, a model's
        `config.json` and the evaluation's token-reuse check compare identities, not names."""
        # a local checkpoint folder is known by its absolute path (as `load_backbone` records it)
        name = str(Path(self.name).resolve()) if os.path.isdir(self.name) else self.name
        out: dict[str, Any] = {"name": name}
        if self.name in RANDOM_BACKBONE_NAMES:
            out["seed"] = int(self.seed)
        if self.name == "tiny-random":
            out["tiny"] = dict(sorted(self.tiny.items()))
        return out


class ExtractConfig(Strict):
    backbone: BackboneConfig = BackboneConfig()
    model_dir: str | None = None       # a trained NearID model: writes its embeddings
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    sources: list[str] | None = None   # None: positive + every generated setting
    write_tokens: bool = True
    readouts: list[str] = ["map", "mean"]
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=0)   # model actors; 0 = one per GPU the cluster has (gpus_per_actor > 0)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    # CPU decode/resize stage: an autoscaling pool of 1..decode_actors (0 = as many as the CPUs the
    # model actors leave free allow), each with decode_cpus; prefetch = batches queued per actor
    decode_actors: int = Field(0, ge=0)
    decode_cpus: float = Field(0.25, gt=0)
    prefetch_batches: int = Field(2, ge=1)
    max_storage_gb: float = Field(50.0, gt=0)
    allow_large: bool = False


class LossConfig(Strict):
    name: str = "nearid"
    params: dict[str, float | bool] = {"temperature": 0.07, "alpha": 0.5}


class TrainConfig(Strict):
    loss: LossConfig = LossConfig()
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    epochs: int = Field(11, ge=1)
    batch_size: int = Field(128, ge=2)
    grad_clip: float = Field(1.0, gt=0)
    # share of each image's patch tokens dropped per step (fit.drop_tokens): augmentation on cached tokens
    token_dropout: float = Field(0.0, ge=0, lt=1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    n_positives: int = Field(2, ge=1)
    n_distractors: int = Field(3, ge=0)
    settings: list[str] | None = None  # training settings; None = every generated setting
    mtg_repeat: int = Field(4, ge=0)
    input_mode: Literal["tokens", "images"] = "tokens"
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    # torch threads of a CPU worker (None: int(cpus_per_worker)); part of the config because the
    # float sums of a step split by thread count: the same count gives the same bytes anywhere
    threads: int | None = Field(None, ge=1)
    use_gpu: bool = False
    val_every_steps: int = Field(0, ge=0)   # 0: once per epoch
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: once per epoch
    keep_top_k: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    fast_head: bool = True
    materialize: bool = True          # keep items in the object store across epochs (small data)
    # rows each worker re-orders at a time every epoch (0: its whole shard, a full shuffle)
    shuffle_buffer: int = Field(0, ge=0)
    publish: Literal["final", "best"] = "final"   # the model dir gets the last step (as the paper) or best val SSR
    seed: int = 0


class EvalConfig(Strict):
    scorers: list[str] = ["frozen:map", "frozen:mean", "nearid"]
    split: Literal["train", "val", "test"] = "test"
    pooled_settings: list[str] | None = None   # None: every non-held-apart generated setting
    held_apart: list[str] = []
    benchmarks: list[str] = ["nearid", "mtg", "dreambench"]   # names in nearid.benchmarks.registry
    plots: bool = True


class TrackingConfig(Strict):
    uri: str | None = None              # None: sqlite under the run root (local roots only)
    experiment: str = "nearid"
    enabled: bool = True
    retries: int = Field(3, ge=0)


class TuneConfig(Strict):
    space: str = "tune/spaces/default.yaml"
    num_samples: int = Field(6, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(0.5, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    metric: str = "val_ssr"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    epochs: int | None = None


class PlanConfig(Strict):
    """Scale for `nearid plan` when the data is not in the run root yet (None: the synth world's)."""
    identities: int | None = Field(None, ge=1)
    mtg_samples: int | None = Field(None, ge=0)
    train_share: float | None = Field(None, gt=0, le=1)
    usd_per_gpu_hour: float = Field(2.5, ge=0)


class Config(Strict):
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    synth: SynthConfig = SynthConfig()
    generate: GenerateConfig = GenerateConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    plan: PlanConfig = PlanConfig()


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, field and value."""


def _set_path(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{k}' is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.strip(), value


def train_run_name(cfg: "Config") -> str:
    return f"{cfg.run.name}-train"


def model_dir_for(cfg: "Config | None", run_name: str | None = None) -> str:
    """Where a training publishes its model, relative to the run root: `models/<run>-train`, or
    `models/<run_name>` for a training given its own run name; the `nearid` scorer's default."""
    return f"models/{run_name or train_run_name(cfg)}"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(data).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(data, key, value, f"override '{item}'")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            value = err.get("input")
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{loc}'")
            else:
                lines.append(f"field '{loc}' = {value!r}: {err['msg']}")
        raise ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines)) from None


def config_to_dict(cfg: Config) -> dict:
    """The resolved config with secrets removed (safe to save and to log as params)."""
    d = cfg.model_dump(mode="json")
    for k in ("access_key_id", "secret_access_key"):
        if d["storage"].get(k) is not None:
            d["storage"][k] = "***"
    return d


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def add_config_args(parser) -> None:
    parser.add_argument("--config", default="configs/local.yaml", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config value (repeatable)")
