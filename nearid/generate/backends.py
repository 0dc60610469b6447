"""One interface for every distractor generator, and the factory the generation job calls.

    backend = build_backend("sdxl_inpaint", steps=30, resolution=1024)   # once per actor
    distractors = backend.inpaint(images, masks, prompts, seeds)          # per batch

Kinds: "procedural" (renders the prompt's object into the mask; no model, the embedded
default) and the diffusers families in `nearid.generate.diffusers_backend.KINDS`
("sdxl_inpaint", "flux_fill", "flux_canny", "sd_inpaint", "qwen_edit", "auto").
Heavy imports (torch, diffusers) happen only when a diffusers kind is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

DIFFUSERS_KINDS = ("sdxl_inpaint", "flux_fill", "flux_canny", "sd_inpaint", "qwen_edit", "auto")
VALID_KINDS = ("procedural", *DIFFUSERS_KINDS)


@runtime_checkable
class InpaintBackend(Protocol):
    """Turns (view, object mask, prompt, seed) rows into distractor images of the view's size."""

    name: str

    def inpaint(
        self, images: list[Image.Image], masks: list[Image.Image], prompts: list[str], seeds: list[int]
    ) -> list[Image.Image]:
        """Return one image per row, same size as the row's input image."""
        ...


def build_backend(kind: str, **params) -> InpaintBackend:
    """Build the backend for `kind` with its parameters (see each backend's docstring).

    Raises ValueError for an unknown kind, listing the valid ones.
    """
    if kind == "procedural":
        from nearid.generate.procedural import ProceduralBackend

        return ProceduralBackend(**params)
    if kind in DIFFUSERS_KINDS:
        from nearid.generate.diffusers_backend import DiffusersInpaintBackend

        return DiffusersInpaintBackend(kind, **params)
    raise ValueError(f"unknown backend kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
