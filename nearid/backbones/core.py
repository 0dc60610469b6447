"""Frozen vision backbones (SigLIP, CLIP, DINOv2) behind one small interface.

A `Backbone` turns PIL images into pixel tensors (`preprocess`), pixel tensors into the
final-layer token sequence (`tokens`, [B, T, D]) and tokens into the fixed readouts the
evaluation compares against (`readouts`: SigLIP's pretrained "map" head, patch "mean",
and "cls" for CLIP/DINOv2).

Where the final layer norm sits in transformers 5.23 (checked in the installed source):
- SigLIP (`SiglipVisionModel.forward`): `last_hidden_state = post_layernorm(encoder_out)`
  for every token, and `pooler_output = head(last_hidden_state)`. So `last_hidden_state`
  already is the head's input; no extra norm is applied here.
- CLIP (`CLIPVisionModel.forward`): `last_hidden_state` is the raw encoder output and only
  the pooled CLS token goes through `post_layernorm`. We apply `post_layernorm` to all
  tokens, so `tokens[:, 0]` equals `pooler_output`; token 0 is CLS and is kept.
- DINOv2 (`Dinov2Model.forward`): `last_hidden_state = layernorm(encoder_out)`, token 0 is
  CLS (`pooler_output = last_hidden_state[:, 0]`); Dinov2Model has no register tokens.

Nothing here downloads unless given a hub id that is not cached; `trust_remote_code` is
never enabled and backbone weights are read from safetensors only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import RANDOM_BACKBONE_NAMES, BackboneConfig
from ..numerics import rowwise
from ..io.storage import download_s3_dir
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TINY_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
)

# google/siglip2-so400m-patch14-384 vision tower (fixed resolution, model_type "siglip").
SO400M_CONFIG: dict[str, Any] = dict(
    image_size=384,
    patch_size=14,
    hidden_size=1152,
    num_hidden_layers=27,
    num_attention_heads=16,
    intermediate_size=4304,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)

RANDOM_BACKBONES = RANDOM_BACKBONE_NAMES

# model_type -> (kind, model class, config class, default PIL processor class)
_ARCHITECTURES: dict[str, tuple[str, type, type, type]] = {
    "siglip": ("siglip", SiglipVisionModel, SiglipVisionConfig, SiglipImageProcessorPil),
    "siglip_vision_model": ("siglip", SiglipVisionModel, SiglipVisionConfig, SiglipImageProcessorPil),
    "clip": ("clip", CLIPVisionModel, CLIPVisionConfig, CLIPImageProcessorPil),
    "clip_vision_model": ("clip", CLIPVisionModel, CLIPVisionConfig, CLIPImageProcessorPil),
    "dinov2": ("dinov2", Dinov2Model, Dinov2Config, BitImageProcessorPil),
}
KIND_CLASSES: dict[str, tuple[type, type]] = {
    kind: (model_cls, config_cls) for kind, model_cls, config_cls, _ in _ARCHITECTURES.values()
}
# Processor classes a saved NearID model may name; anything else is refused on load.
PROCESSOR_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (SiglipImageProcessorPil, CLIPImageProcessorPil, BitImageProcessorPil)
}


def tiny_siglip_config(**overrides: Any) -> SiglipVisionConfig:
    """A small SigLIP vision config (TINY_DEFAULTS updated with `overrides`).

    Raises ValueError naming any override that is not a SigLIP vision config field, since
    the config class would otherwise keep a misspelt key silently.
    """
    known = set(SiglipVisionConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"tiny_overrides has unknown SiglipVisionConfig field(s): {unknown}")
    return SiglipVisionConfig(**{**TINY_DEFAULTS, **overrides})


def siglip_processor(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP preprocessing built from the class (no download): square resize, mean = std = 0.5."""
    return SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


# Not a SiglipVisionConfig field: a tiny-random option. False zeroes every attention output
# projection, so each layer is a per-token MLP block: tokens become nonlinear *local* patch
# features (random attention would mix background into every token; docs/world_study.md).
TOKEN_MIXING_KEY = "token_mixing"


def _random_siglip(config: SiglipVisionConfig, seed: int, token_mixing: bool = True) -> SiglipVisionModel:
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(config)
    if not token_mixing:
        with torch.no_grad():
            for layer in model.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
    return model


class Backbone(nn.Module):
    """A frozen vision encoder with its preprocessing and fixed readouts.

    Attributes: `name` (how it was loaded: "tiny-random", "so400m-random", hub id, local
    dir or s3 path), `kind` ("siglip" / "clip" / "dinov2"), `hidden_size`, `image_size`
    (processed pixel size), `num_tokens` (T of `tokens()`), `num_prefix_tokens` (1 for the
    CLS token of CLIP/DINOv2, else 0), `has_map_head`, `reloadable` (load_backbone(name)
    rebuilds the same weights), `tiny_overrides` and `seed` (random backbones only).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        image_processor: Any,
        *,
        name: str = "custom",
        reloadable: bool = False,
        tiny_overrides: dict | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in KIND_CLASSES:
            raise ValueError(f"unknown backbone kind {kind!r}; expected one of {sorted(KIND_CLASSES)}")
        self.model = model
        self.kind = kind
        self.image_processor = image_processor
        self.name = name
        self.reloadable = reloadable
        self.tiny_overrides = dict(tiny_overrides or {})
        self.seed = seed
        config = model.config
        self.hidden_size: int = config.hidden_size
        self.patch_size: int = config.patch_size
        self.num_prefix_tokens = 0 if kind == "siglip" else 1
        self.has_map_head = kind == "siglip" and getattr(model, "head", None) is not None
        # The processor decides the pixel size (DINOv2 crops 224 although its config says 518).
        probe_pixels = self.preprocess([Image.new("RGB", (8, 8))])
        height, width = probe_pixels.shape[-2:]
        if height != width:
            raise ValueError(f"{name}: processor yields non-square {height}x{width} images")
        self.image_size: int = int(height)
        self.num_tokens: int = (height // self.patch_size) * (width // self.patch_size) + self.num_prefix_tokens
        model.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # The backbone is frozen: switching a parent module to train mode must not turn
        # on dropout or other train-time behaviour inside it.
        self.training = mode
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images (any mode) -> float32 pixel tensor [B, 3, S, S] on the CPU."""
        rgb = [image.convert("RGB") for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-layer tokens after the model's last layer norm: [B, T, D] in the model dtype.

        Runs without autograd (the backbone is frozen); the result can still feed a trained
        head. For SigLIP the model's forward also runs its head (under 1% of the FLOPs).
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        if self.kind == "clip":
            hidden = self.model.post_layernorm(hidden)
        return hidden

    def readouts(
        self, pixel_values: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Fixed embeddings [B, D]: "map" (SigLIP's pretrained head = pooler_output), "mean"
        (mean of the patch tokens, CLS excluded) and "cls" (CLIP/DINOv2 only)."""
        if tokens is None:
            if pixel_values is None:
                raise ValueError("readouts needs pixel_values or tokens")
            tokens = self.tokens(pixel_values)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.has_map_head:
                out["map"] = rowwise(self.model.head, tokens)   # batch-independent (numerics)
            out["mean"] = tokens[:, self.num_prefix_tokens:].mean(dim=1)
            if self.num_prefix_tokens:
                out["cls"] = tokens[:, 0]
        return out

    def map_head_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of SigLIP's pretrained MAP head weights, keyed as in `model.head`."""
        if not self.has_map_head:
            raise ValueError(f"backbone {self.name!r} ({self.kind}) has no MAP head")
        return {key: value.detach().clone() for key, value in self.model.head.state_dict().items()}

    def identity(self) -> dict[str, Any]:
        """`BackboneConfig.identity` of the config this backbone was loaded from."""
        return BackboneConfig(name=self.name, tiny=self.tiny_overrides, seed=self.seed or 0).identity()

    def processor_spec(self) -> dict[str, Any]:
        """Class name and settings of the image processor, enough to rebuild it offline."""
        settings = self.image_processor.to_dict()
        settings.pop("image_processor_type", None)
        if "resample" in settings:
            settings["resample"] = int(settings["resample"])
        return {"class": type(self.image_processor).__name__, "settings": settings}


def processor_from_spec(spec: dict[str, Any]) -> Any:
    """Rebuild an image processor saved by `Backbone.processor_spec` (allow-listed classes only)."""
    class_name = spec.get("class")
    if class_name not in PROCESSOR_CLASSES:
        raise ValueError(f"image processor class {class_name!r} is not one of {sorted(PROCESSOR_CLASSES)}")
    return PROCESSOR_CLASSES[class_name](**spec.get("settings", {}))


def _default_processor(kind: str, processor_cls: type, config: Any) -> Any:
    if kind == "siglip":
        return siglip_processor(config.image_size)
    if kind == "clip":
        size = config.image_size
        return processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # DINOv2 checkpoints ship with resize 256 + crop 224 and ImageNet statistics (the class defaults).
    return processor_cls()


def _load_processor(source: str, kind: str, processor_cls: type, config: Any) -> Any:
    try:
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError):
        # No preprocessor_config.json (e.g. a bare vision checkpoint): use the family default.
        return _default_processor(kind, processor_cls, config)
    return processor


def load_random_backbone(name: str, *, tiny_overrides: dict | None = None, seed: int = 0) -> Backbone:
    """"tiny-random" (TINY_DEFAULTS + `tiny_overrides`, weights from `seed`) or "so400m-random"
    (the real SigLIP2 so400m@384 shape, random weights from `seed`), frozen, on the CPU."""
    overrides = dict(tiny_overrides or {})
    token_mixing = bool(overrides.pop(TOKEN_MIXING_KEY, True))
    if name == "tiny-random":
        config = tiny_siglip_config(**overrides)
    elif name == "so400m-random":
        if tiny_overrides:
            raise ValueError("tiny_overrides only applies to 'tiny-random'")
        config = SiglipVisionConfig(**SO400M_CONFIG)
    else:
        raise ValueError(f"{name!r} is not a random backbone ({', '.join(RANDOM_BACKBONES)})")
    model = _random_siglip(config, seed, token_mixing)
    return Backbone(model, "siglip", siglip_processor(config.image_size), name=name, reloadable=True,
                    tiny_overrides=tiny_overrides if name == "tiny-random" else None, seed=seed)


def random_processor(name: str, tiny_overrides: dict | None = None) -> SiglipImageProcessorPil:
    """The processor `load_random_backbone(name, tiny_overrides=...)` uses, without the weights."""
    if name == "so400m-random":
        return siglip_processor(SO400M_CONFIG["image_size"])
    overrides = {k: v for k, v in (tiny_overrides or {}).items() if k != TOKEN_MIXING_KEY}
    return siglip_processor(tiny_siglip_config(**overrides).image_size)


def random_config(name: str, tiny_overrides: dict | None = None) -> SiglipVisionConfig:
    if name == "so400m-random":
        return SiglipVisionConfig(**SO400M_CONFIG)
    return tiny_siglip_config(**{k: v for k, v in (tiny_overrides or {}).items() if k != TOKEN_MIXING_KEY})


def _hub_source(name: str, storage_options: dict | None, cache_dir) -> str:
    source = str(download_s3_dir(name, storage_options, cache_dir)) if name.startswith("s3://") else name
    return str(Path(source).resolve()) if os.path.isdir(source) else source


def _architecture(hf_config, name: str) -> tuple[str, type, type, type]:
    model_type = hf_config.model_type
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported backbone model_type {model_type!r} in {name}; expected one of {sorted(_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[model_type]


def load_hub_backbone(name: str, *, dtype: torch.dtype | None = None, storage_options: dict | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Backbone:
    """A SigLIP, CLIP or DINOv2 checkpoint: a hub id, a local directory or an `s3://` directory
    (fetched into `cache_dir` with `storage_options`), dispatched on its config's model_type.
    Raises ValueError naming an unsupported model_type."""
    source = _hub_source(name, storage_options, cache_dir)
    hf_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    kind, model_cls, _, processor_cls = _architecture(hf_config, name)
    # The vision classes pull `vision_config` and the `vision_model.` weights out of a full
    # two-tower (image + text) checkpoint; the text weights are reported and dropped.
    model, info = model_cls.from_pretrained(
        source, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ValueError(f"{name}: checkpoint lacks vision weights {sorted(info['missing_keys'])}")
    processor = _load_processor(source, kind, processor_cls, model.config)
    reload_name = name if name.startswith("s3://") or not os.path.isdir(name) else source
    return Backbone(model, kind, processor, name=reload_name, reloadable=True)


def hub_processor(name: str) -> Any:
    """The processor `load_hub_backbone(name)` uses (the checkpoint's, else the family default),
    from its config alone."""
    hf_config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    kind, _, _, processor_cls = _architecture(hf_config, name)
    return _load_processor(name, kind, processor_cls, getattr(hf_config, "vision_config", hf_config))


def hub_vision_config(name: str) -> Any:
    hf_config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    return getattr(hf_config, "vision_config", hf_config)


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
