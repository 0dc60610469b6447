"""Scorer strings, parsed in one place.

    frozen:<readout>             a readout (map, mean, cls) of the run's own backbone (cached features)
    frozen:<readout>@<backbone>  the same readout of another frozen backbone: a hub id, a local or
                                 s3:// dir (CLIP, DINOv2, SigLIP), dinov2-small[@px], tiny-random
    nearid                       the run's trained model (models/<run>-train)
    nearid:<model>               another trained model dir (local, s3://, hub id)
"""
from __future__ import annotations

from typing import NamedTuple

READOUTS = ("map", "mean", "cls")


class Scorer(NamedTuple):
    kind: str                 # "frozen" | "nearid"
    readout: str | None       # frozen: the readout
    model: str | None         # frozen: another backbone; nearid: a model dir (None = the run's own)

    @property
    def other_backbone(self) -> bool:
        return self.kind == "frozen" and self.model is not None

    @property
    def may_extract(self) -> bool:
        """Whether scoring may run an extraction (Ray): a trained model whose backbone's tokens are not
        cached, or a frozen readout of another backbone."""
        return self.kind == "nearid" or self.other_backbone


def parse_scorer(text: str) -> Scorer:
    """ValueError naming the string and the accepted forms for anything else."""
    if text == "nearid":
        return Scorer("nearid", None, None)
    if text.startswith("nearid:") and len(text) > len("nearid:"):
        return Scorer("nearid", None, text.split(":", 1)[1])
    if text.startswith("frozen:"):
        readout, at, model = text[len("frozen:"):].partition("@")
        if readout not in READOUTS:
            raise ValueError(f"scorer {text!r}: unknown readout {readout!r}; use one of {list(READOUTS)}")
        if at and not model:
            raise ValueError(f"scorer {text!r}: no backbone after '@' (e.g. frozen:{readout}@facebook/dinov2-small)")
        return Scorer("frozen", readout, model or None)
    raise ValueError(f"unknown scorer {text!r}: use frozen:<readout>, frozen:<readout>@<backbone>, nearid or "
                     "nearid:<model dir>")
