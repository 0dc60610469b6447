"""`NearIDScore`: the NearID identity score as a `torchmetrics.Metric`, for evaluation harnesses.

    from nearid import NearIDScore
    metric = NearIDScore("runs/demo/models/demo-train")      # or a released checkpoint dir,
    metric.update(["ref.png"], ["gen.png"])                  # "models:/nearid/1", s3://, a hub id
    metric.update(ref_images, gen_images)                    # PIL images or uint8 [B,3,H,W] tensors
    metric.compute()   # {"scores": [cosine per pair, in update order], "mean": float}

Scores are the cosine of the two L2-normalised embeddings, in [-1, 1], equal to `nearid score`
pair by pair (each image is pooled on its own: an embedding does not depend on its batch).
`metric.to("cuda")` moves the model with the state. In a `torch.distributed` run each rank
updates with its own pairs; `compute()` gathers the scores of every rank, rank 0's first (as
torchmetrics does for a `cat` state).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               tracking_uri: str | None = None):
    """The NearIDModel at `source`: a model dir (local, `s3://`, a hub id), a released NearID
    checkpoint dir, or an MLflow model URI (`models:/<name>/<version>`, `runs:/...`: the logged
    pyfunc's `artifacts/model_dir`, fetched from `tracking_uri` or MLflow's current one)."""
    from .model import NearIDModel

    src = str(source)
    if src.startswith(MLFLOW_SCHEMES):
        from .mlflow_model import download_model_dir

        src = str(download_model_dir(src, tracking_uri=tracking_uri))
    model = NearIDModel.from_pretrained(src, device=device, dtype=dtype)
    return model.eval()


def as_items(items: ImageLike | Sequence[ImageLike], what: str) -> list:
    """One entry per image: a [B,3,H,W] tensor becomes B [3,H,W] tensors, a single item a list."""
    if isinstance(items, torch.Tensor):
        if items.dim() == 3:
            return [items]
        if items.dim() == 4:
            return list(items)
        raise ValueError(f"{what}: a tensor must be [3,H,W] or [B,3,H,W] uint8, got shape {tuple(items.shape)}")
    if isinstance(items, (str, os.PathLike, Image.Image)):
        return [items]
    return list(items)


def to_image(item: ImageLike, what: str) -> Image.Image:
    """A path (local or fsspec URL), a PIL image or a uint8 tensor [3,H,W] -> an RGB PIL image."""
    if isinstance(item, Image.Image):
        from .images import to_rgb

        return to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        from .model import open_image

        return open_image(str(item))
    if isinstance(item, torch.Tensor):
        return _tensor_image(item, what)
    raise TypeError(f"{what}: expected a path, a PIL image or a uint8 tensor, got {type(item).__name__}")


def to_images(items: ImageLike | Sequence[ImageLike], what: str) -> list[Image.Image]:
    """Paths, PIL images, uint8 tensors [3,H,W] / [B,3,H,W], or a list of any of them -> RGB PIL
    images. Errors name `what` and the item's position."""
    return [to_image(x, f"{what}[{i}]") for i, x in enumerate(as_items(items, what))]


def _tensor_image(t: torch.Tensor, what: str) -> Image.Image:
    if t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected a uint8 tensor (0..255), got {t.dtype}")
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"{what}: expected [3,H,W] (or [1,H,W]), got shape {tuple(t.shape)}")
    arr = np.ascontiguousarray(t.detach().cpu().permute(1, 2, 0).numpy())
    return Image.fromarray(arr[..., 0], "L").convert("RGB") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


class NearIDScore(Metric):
    """Identity similarity of (reference, generated) pairs with a trained NearID model.

    `model`: a NearIDModel, or where to load one (`load_model`). `batch_size`: images embedded
    per forward pass. Other keyword arguments go to `torchmetrics.Metric` (`sync_on_compute`,
    `process_group`, ...)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model: Any, batch_size: int = 32, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, tracking_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, dtype=dtype, tracking_uri=tracking_uri)
        self.model = model.eval()
        self.batch_size = int(batch_size)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        if device is not None:
            self.to(device)

    @property
    def protocol(self) -> dict | None:
        """The model's pinned protocol (backbone, resolution, preprocessing, dtype, readout, dim)."""
        return getattr(self.model, "protocol", None)

    def update(self, references: ImageLike | Sequence[ImageLike], generated: ImageLike | Sequence[ImageLike]) -> None:
        refs, gens = as_items(references, "references"), as_items(generated, "generated")
        if len(refs) != len(gens):
            raise ValueError(f"update needs as many generated images as references: {len(refs)} vs {len(gens)}")
        if not refs:
            return
        # each distinct image is embedded once (many generations against one reference: one
        # reference embedding), as `nearid score --pairs` does; paths by name, others by object
        slots: dict = {}
        images = []
        index = []
        for what, items in (("references", refs), ("generated", gens)):
            for i, item in enumerate(items):
                key = ("path", os.fspath(item)) if isinstance(item, (str, os.PathLike)) else ("obj", id(item))
                if key not in slots:
                    slots[key] = len(images)
                    images.append(to_image(item, f"{what}[{i}]"))
                index.append(slots[key])
        emb = self.model.embed(images, batch_size=self.batch_size)
        n = len(refs)
        rows = torch.tensor(index)
        scores = (emb[rows[:n]] * emb[rows[n:]]).sum(dim=-1)
        self.scores.append(scores.to(device=self.device, dtype=torch.float32))

    def compute(self) -> dict:
        scores = dim_zero_cat(self.scores) if isinstance(self.scores, list) and self.scores else \
            (self.scores if isinstance(self.scores, torch.Tensor) else torch.empty(0))
        values = [float(s) for s in scores.flatten().tolist()]
        return {"scores": values, "mean": float(np.mean(values)) if values else math.nan}
