"""The released NearID checkpoint layout (`Aleksandar/nearid-siglip2`), loaded without its code.

What the reference repo publishes (its `configuration_nearid.py` / `modeling_nearid.py`, saved
by transformers 4.x; those Python files are never imported or run here, `auto_map` is ignored):
- `config.json`: `model_type: "nearid"`, `vision_config` (SiglipVisionConfig keyword arguments;
  the reference falls back to the so400m@384 shape when it is empty), `embed_dim`,
  `normalize_embeddings`, `auto_map`, plus `architectures` / `torch_dtype` / `transformers_version`.
- `model.safetensors` (fp16; or shards listed in `model.safetensors.index.json`): the whole SigLIP
  vision tower, MAP head included, as `backbone.vision_model.<name>` (4.x `SiglipVisionModel`
  names). `backbone.<name>` (5.x names, no `vision_model.`) loads as well.
- `preprocessor_config.json`: the SigLIP image processor settings.

The reference `get_image_features` is `F.normalize(tower(pixels).pooler_output)`; the tower's
`pooler_output` is `head(last_hidden_state)` with `last_hidden_state` already after
`post_layernorm`, which is what `Backbone.tokens` returns. So the tower's head is copied into our
`MAPHead` (same parameter names) and `NearIDModel.embed` (fast single-query path included)
computes the same embedding. The tower keeps its own head too, so the backbone's "map" readout
equals it. `normalize_embeddings` only changes the reference's `forward`; `get_image_features`
always normalises, as we do.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from .backbones.core import SO400M_CONFIG, Backbone, siglip_processor
from .head import MAPHead

log = logging.getLogger("nearid.released")

RELEASED_MODEL_TYPE = "nearid"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# transformers 4.x wrote SiglipVisionModel weights under `vision_model.`; 5.x drops that level.
TOWER_PREFIX_4X = "backbone.vision_model."
TOWER_PREFIX_5X = "backbone."
SIGLIP_PROCESSOR_TYPES = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
_VISION_CONFIG_METADATA = ("model_type", "transformers_version", "torch_dtype", "dtype", "architectures",
                           "_name_or_path")
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def is_released_config(config: dict) -> bool:
    """True for a transformers-style config.json (a `model_type`, no NearID `format` field)."""
    return "format" not in config and "model_type" in config


def released_vision_config(config: dict, config_path: Path | str) -> SiglipVisionConfig:
    """The tower's SiglipVisionConfig; ValueError naming `config_path` for anything else."""
    model_type = config.get("model_type")
    if model_type != RELEASED_MODEL_TYPE:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is not a released NearID checkpoint (expected "
            f"{RELEASED_MODEL_TYPE!r}), and there is no 'format' field of a NearID model dir ('nearid-model')"
        )
    raw = config.get("vision_config") or dict(SO400M_CONFIG)  # the reference's default when absent
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: vision_config must be an object, got {type(raw).__name__}")
    vision = SiglipVisionConfig(**{k: v for k, v in raw.items() if k not in _VISION_CONFIG_METADATA})
    if not getattr(vision, "vision_use_head", True):
        raise ValueError(f"{config_path}: vision_config.vision_use_head is false: no MAP head to load")
    embed_dim = config.get("embed_dim", vision.hidden_size)
    if embed_dim != vision.hidden_size:
        raise ValueError(f"{config_path}: embed_dim {embed_dim} != vision_config.hidden_size "
                         f"{vision.hidden_size} (the MAP head outputs hidden_size)")
    return vision


def released_processor(directory: Path, config: dict, config_path: Path | str | None = None):
    """The checkpoint's own SigLIP image processor (PIL backend) from `preprocessor_config.json`.

    Without that file: SigLIP's preprocessing (square resize to the tower's size, mean = std = 0.5),
    with a warning. A non-SigLIP processor type is refused, naming the file.
    """
    directory = Path(directory)
    path = directory / PREPROCESSOR_FILE
    if not path.is_file():
        vision = released_vision_config(config, config_path or directory / "config.json")
        log.warning("%s: no %s, using SigLIP preprocessing at %d px (mean = std = 0.5)",
                    directory, PREPROCESSOR_FILE, vision.image_size)
        return siglip_processor(vision.image_size)
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    kind = settings.get("image_processor_type", "SiglipImageProcessor")
    if kind not in SIGLIP_PROCESSOR_TYPES:
        raise ValueError(f"{path}: image_processor_type {kind!r} is not one of {list(SIGLIP_PROCESSOR_TYPES)}")
    return SiglipImageProcessorPil.from_dict(settings)


def _weight_files(directory: Path, label: str) -> tuple[list[Path], Path]:
    """(safetensors files, the path named in errors): one file, or the shards of an index."""
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single], single
    index = directory / WEIGHTS_INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {label} (looked for {single})")
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    files = []
    for shard in shards:
        shard_path = directory / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise FileNotFoundError(f"{index} names shard {shard!r}, which is not in {label}")
        files.append(shard_path)
    return files, index


def stored_dtype(directory: Path, tensor: str | None = None) -> torch.dtype:
    """The floating dtype the checkpoint's tensors are stored in (fp16 for the release); that of
    `tensor` where the (first) weights file has it."""
    files, _ = _weight_files(Path(directory), str(directory))
    with safe_open(str(files[0]), framework="pt") as handle:
        names = list(handle.keys())
        for name in ([tensor] if tensor in names else []) + names:
            dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _uninitialised_tower(vision: SiglipVisionConfig) -> SiglipVisionModel:
    """The tower's modules in float32 without their random init (so400m: ~11 s of a 2-core CPU),
    since the checkpoint overwrites every weight: built on the meta device, given uninitialised
    memory, and the one buffer not in the checkpoint (`embeddings.position_ids`) rebuilt."""
    with torch.device("meta"):
        tower = SiglipVisionModel(vision)
    transient = set(dict(tower.named_buffers())) - set(tower.state_dict())
    if transient != {"embeddings.position_ids"}:  # another transformers version: initialise it all
        return SiglipVisionModel(vision)
    tower.to_empty(device="cpu")
    with torch.no_grad():
        ids = tower.embeddings.position_ids
        ids.copy_(torch.arange(ids.shape[-1], dtype=ids.dtype).expand_as(ids))
    return tower


def check_tensor_names(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path) -> None:
    """ValueError naming `source` for missing, unexpected or misshapen tensors (every weights load)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
    misshapen = sorted(
        f"{name} {list(tensors[name].shape)} != {list(shape)}"
        for name, shape in expected.items()
        if tensors[name].shape != shape
    )
    if misshapen:
        raise ValueError(f"{source}: tensors with wrong shape: {misshapen}")


def load_released(directory: Path, config: dict, config_path: Path, *, name: str) -> tuple[Backbone, MAPHead]:
    """(backbone, head) in float32 from a released checkpoint dir; `name` becomes the backbone's name.

    Raises FileNotFoundError for a missing weights file and ValueError for a config that is not
    a NearID checkpoint or for missing/unexpected/misshapen tensors, each naming the file.
    """
    directory = Path(directory)
    vision = released_vision_config(config, config_path)
    files, weights_path = _weight_files(directory, name)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    # Some old checkpoints carry the (non-persistent) position ids buffer: it is rebuilt, not loaded.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("embeddings.position_ids")}
    prefix = TOWER_PREFIX_4X if any(k.startswith(TOWER_PREFIX_4X) for k in tensors) else TOWER_PREFIX_5X
    # float32; fp16/bf16 tensors are upcast on load.
    tower = _uninitialised_tower(vision)
    expected = {prefix + key: value.shape for key, value in tower.state_dict().items()}
    check_tensor_names(tensors, expected, weights_path)
    tower.load_state_dict({key[len(prefix):]: value for key, value in tensors.items()})
    processor = released_processor(directory, config, config_path)
    backbone = Backbone(tower, "siglip", processor, name=name, reloadable=False)
    if backbone.image_size != vision.image_size:
        raise ValueError(f"{directory / PREPROCESSOR_FILE}: images are resized to {backbone.image_size} px but "
                         f"the tower in {config_path} takes {vision.image_size} px")
    return backbone, MAPHead.from_backbone(backbone)
