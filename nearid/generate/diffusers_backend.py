"""Inpainting backends on top of diffusers pipelines, one class for every generator family.

`DiffusersInpaintBackend(kind, ...)` loads (or, with `tiny=True`, builds) the pipeline once and
then turns batches of (view, object mask, prompt, seed) into distractors: the prompt's object
inpainted into the mask region of the view, composited so every pixel outside the (dilated)
mask is the view's own pixel.

Batch semantics: one pipeline call per batch (per generation size, when views differ in size),
with one CPU `torch.Generator` per row seeded from that row's seed. diffusers draws the initial
noise and the VAE-encoding noise per generator and pads every prompt to a fixed length (CLIP 77,
T5 `max_sequence_length`), so a row's output does not depend on its batch mates except through
floating-point differences of batched kernels (measured on CPU fp32: identical to within one
8-bit level; see tests). CPU generators also make a seed mean the same noise on any device.
Qwen-Image edit pads its prompts to the longest in the batch (masked attention); it is not
covered by a tiny test because a tiny Qwen2.5-VL text encoder + processor is not built here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from nearid.generate.masks import canny_edges, check_mask, composite, dilate_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindSpec:
    """What differs between generator families: pipeline class, checkpoint, sampler defaults."""

    pipeline_class: str
    default_model: str | None
    steps: int
    guidance: float
    strength: float
    packed_latents: bool  # FLUX/Qwen pack 2x2 latents: sizes must be multiples of 2 * vae scale
    guidance_argument: str = "guidance_scale"
    cuda_dtype: str = "fp16"


KINDS: dict[str, KindSpec] = {
    "sdxl_inpaint": KindSpec(
        "StableDiffusionXLInpaintPipeline", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", 30, 8.0, 0.99, False
    ),
    "flux_fill": KindSpec(
        "FluxFillPipeline", "black-forest-labs/FLUX.1-Fill-dev", 50, 30.0, 1.0, True, cuda_dtype="bf16"
    ),
    # FLUX.1-Canny-dev is a control (not fill) checkpoint; the inpaint variant of the control
    # pipeline keeps the background and guides the new object with the view's edges.
    "flux_canny": KindSpec(
        "FluxControlInpaintPipeline", "black-forest-labs/FLUX.1-Canny-dev", 50, 30.0, 1.0, True, cuda_dtype="bf16"
    ),
    "sd_inpaint": KindSpec(
        "StableDiffusionInpaintPipeline", "stable-diffusion-v1-5/stable-diffusion-inpainting", 50, 7.5, 1.0, False
    ),
    "qwen_edit": KindSpec(
        "QwenImageEditInpaintPipeline",
        "Qwen/Qwen-Image-Edit",
        50,
        4.0,
        1.0,
        True,
        guidance_argument="true_cfg_scale",
        cuda_dtype="bf16",
    ),
    "auto": KindSpec("AutoPipelineForInpainting", None, 50, 7.5, 1.0, False),
}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TINY_T5_MAX_LENGTH = 32


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def resolve_model_path(model: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """Return something `from_pretrained` can open: hub ids and local dirs as given, `s3://`
    pipeline dirs copied once into the shared cache (`nearid.io.storage.download_s3_dir`)."""
    if not model.startswith("s3://"):
        return model
    from ..io.storage import download_s3_dir, s3_filesystem

    remote = model[len("s3://"):].rstrip("/")
    if not s3_filesystem(storage_options).exists(remote + "/model_index.json"):
        raise ValueError(f"model {model!r}: no model_index.json there (not a diffusers pipeline directory)")
    return str(download_s3_dir(model, storage_options, cache_dir))


def _round_to_multiple(value: float, multiple: int) -> int:
    # Half rounds up (not Python's half-to-even) so sizes are predictable.
    return max(multiple, int(value / multiple + 0.5) * multiple)


class DiffusersInpaintBackend:
    """Distractor generator backed by one diffusers inpainting pipeline.

    Args mirror `build_backend(kind, **params)`: `model` (hub id, local dir or s3:// dir),
    `dtype` ("fp16"/"bf16"/"fp32"; default: the family's half type on CUDA, fp32 on CPU),
    `device` (default "cuda" when available), `steps`, `guidance`, `strength`,
    `resolution` (int: longer side at generation, aspect kept; (w, h): exact; None: input
    size), `negative_prompt`, `tiny` (random-weight pipeline, no download), `mask_dilation`
    (pixels added around the object mask), `composite` (paste onto the source so the
    background is exact; default True), `storage_options`/`cache_dir` (for s3://),
    `variant` (e.g. "fp16" weight files), `max_sequence_length` (T5/Qwen prompt length).
    """

    def __init__(
        self,
        kind: str,
        model: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        strength: float | None = None,
        resolution: int | tuple[int, int] | None = None,
        negative_prompt: str | None = None,
        tiny: bool = False,
        mask_dilation: int = 0,
        composite: bool = True,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        variant: str | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown diffusers backend kind {kind!r}; valid kinds: {sorted(KINDS)}")
        spec = KINDS[kind]
        self.name = kind
        self.kind = kind
        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (spec.cuda_dtype if self.device.startswith("cuda") else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.dtype_name = dtype
        self.steps = steps or spec.steps
        self.guidance = spec.guidance if guidance is None else guidance
        self.strength = spec.strength if strength is None else strength
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.resolution = resolution
        self.negative_prompt = negative_prompt
        self.mask_dilation = mask_dilation
        self.composite = composite
        self.tiny = tiny
        self.model = "tiny-random" if tiny else (model or spec.default_model)
        if self.model is None:
            raise ValueError(f"kind {kind!r} needs a model (hub id, local dir or s3:// path)")
        tiny_length = TINY_T5_MAX_LENGTH if tiny and spec.packed_latents else None
        self.max_sequence_length = max_sequence_length or tiny_length
        self.pipeline = self._load(storage_options, cache_dir, variant)
        self.pipeline.set_progress_bar_config(disable=True)
        self._call_parameters = set(inspect.signature(self.pipeline.__call__).parameters)
        self._warned: set[str] = set()

    def _load(self, storage_options: dict | None, cache_dir: str | None, variant: str | None):
        torch_dtype = DTYPES[self.dtype_name]
        if self.tiny:
            from nearid.generate.tiny_pipelines import TINY_BUILDERS, tiny_sd_inpaint

            if self.kind == "auto":
                import diffusers

                pipeline = diffusers.AutoPipelineForInpainting.from_pipe(tiny_sd_inpaint())
            elif self.kind in TINY_BUILDERS:
                pipeline = TINY_BUILDERS[self.kind]()
            else:
                raise ValueError(
                    f"kind {self.kind!r} has no tiny pipeline; tiny kinds: {sorted([*TINY_BUILDERS, 'auto'])}"
                )
            # The builders are cached per process: never cast or move the shared object in place.
            if self.device != "cpu" or torch_dtype != torch.float32:
                pipeline = copy.deepcopy(pipeline)
            # Passing a dtype to `.to()` warns even when it is a no-op: only cast when needed.
            return pipeline.to(self.device) if torch_dtype == torch.float32 else pipeline.to(self.device, torch_dtype)
        import diffusers

        path = resolve_model_path(self.model, storage_options, cache_dir)
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype,
            "local_files_only": hub_offline() or os.path.isdir(path),
            "use_safetensors": True,   # never unpickle weights from a model hub or a folder
        }
        if variant:
            kwargs["variant"] = variant
        if self.kind in ("sd_inpaint", "auto"):
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.kind == "sdxl_inpaint":
            kwargs["add_watermarker"] = False  # a watermark would change background pixels
        pipeline_class = getattr(diffusers, self.spec.pipeline_class)
        try:
            pipeline = pipeline_class.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            if "safetensors" not in str(e).lower():
                raise
            raise ValueError(f"diffusers model {self.model!r}: no safetensors weights (only pickle files such "
                             f"as .bin?); refusing to unpickle them. Convert the repo to safetensors or pick "
                             f"a revision that has them. ({type(e).__name__}: {str(e)[:300]})") from None
        return pipeline.to(self.device)

    def describe(self) -> dict:
        """Settings worth logging next to the generated rows (MLflow params, `generator` column)."""
        return {
            "kind": self.kind,
            "model": self.model,
            "pipeline": type(self.pipeline).__name__,
            "dtype": self.dtype_name,
            "steps": self.steps,
            "guidance": self.guidance,
            "strength": self.strength,
            "resolution": self.resolution,
            "mask_dilation": self.mask_dilation,
        }

    @property
    def size_multiple(self) -> int:
        """Generation sizes must be multiples of this (VAE scale, times 2 for packed latents)."""
        scale = int(getattr(self.pipeline, "vae_scale_factor", 8))
        return scale * (2 if self.spec.packed_latents else 1)

    def generation_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) the model runs at for an input of `size`."""
        multiple = self.size_multiple
        if self.resolution is None:
            width, height = size
        elif isinstance(self.resolution, int):
            scale = self.resolution / max(size)
            width, height = size[0] * scale, size[1] * scale
        else:
            width, height = self.resolution
        return _round_to_multiple(width, multiple), _round_to_multiple(height, multiple)

    def inpaint(
        self, images: list[Image.Image], masks: list[Image.Image], prompts: list[str], seeds: list[int]
    ) -> list[Image.Image]:
        """Inpaint prompt i's object into mask i of image i with seed i; outputs have the input sizes."""
        lengths = {"images": len(images), "masks": len(masks), "prompts": len(prompts), "seeds": len(seeds)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"inpaint needs one mask, prompt and seed per image, got lengths {lengths}")
        checked = []
        for index, (image, mask) in enumerate(zip(images, masks)):
            try:
                binary = check_mask(mask, image.size)
            except ValueError as error:
                raise ValueError(f"row {index}: {error}") from error
            checked.append(dilate_mask(binary, self.mask_dilation) if self.mask_dilation else binary)

        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(self.generation_size(image.size), []).append(index)
        outputs: list[Image.Image | None] = [None] * len(images)
        for size, rows in groups.items():
            generated = self._run(
                [images[i] for i in rows], [checked[i] for i in rows], [prompts[i] for i in rows],
                [seeds[i] for i in rows], size,
            )
            for row, image in zip(rows, generated):
                if self.composite:
                    outputs[row] = composite(images[row], image, checked[row])
                else:
                    outputs[row] = image.resize(images[row].size, Image.Resampling.LANCZOS)
        return outputs  # type: ignore[return-value]

    def _run(
        self,
        images: list[Image.Image],
        masks: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        size: tuple[int, int],
    ) -> list[Image.Image]:
        """One pipeline call for rows that share a generation size."""
        width, height = size
        resized = [image.convert("RGB").resize(size, Image.Resampling.LANCZOS) for image in images]
        # BOX + "any coverage" keeps thin mask parts when downscaling (the mask may only grow).
        resized_masks = [mask.resize(size, Image.Resampling.BOX).point(lambda v: 255 if v > 0 else 0) for mask in masks]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "image": resized,
            "mask_image": resized_masks,
            "height": height,
            "width": width,
            "num_inference_steps": self.steps,
            self.spec.guidance_argument: self.guidance,
            "strength": self.strength,
            "generator": [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds],
            "output_type": "pil",
        }
        if self.kind == "flux_canny":
            # Edges of the whole view: the new object follows the old one's outline and layout,
            # which is what makes the Canny-guided distractors hard.
            kwargs["control_image"] = [canny_edges(image).convert("RGB") for image in resized]
        if self.negative_prompt is not None or self.kind == "qwen_edit":
            # Qwen's true CFG only runs with a negative prompt; " " is the documented neutral one.
            kwargs["negative_prompt"] = [self.negative_prompt or " "] * len(prompts)
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        for name in [name for name in kwargs if name not in self._call_parameters]:
            if name not in self._warned:
                logger.warning("%s (%s) ignores %r", self.kind, type(self.pipeline).__name__, name)
                self._warned.add(name)
            kwargs.pop(name)
        with torch.inference_mode():
            return list(self.pipeline(**kwargs).images)
