"""Contrastive losses for NearID training: the two-tier NearID loss and the paper's ablations.

Every loss is an ``nn.Module`` called as::

    loss(anchor[B, D], positive[B, P, D], negative[B, K, D], pos_mask=None, neg_mask=None)

and returns :class:`LossOutput`. ``positive[b]`` are the other views of anchor ``b``'s identity,
``negative[b]`` its near-identity distractors. Masks are bool (True = valid slot); invalid slots
are removed from every softmax, pool, sum and count (masked with -inf, never with zero), so
padding never changes a loss. Embeddings are L2-normalised here and computed in at least float32.

The "pool" is every valid positive of the batch (B*P rows). Under ``torch.distributed`` it is
the *global* batch: positives are all-gathered with gradients
(``torch.distributed.nn.functional.all_gather``) and rank r's targets are offset by r*B*P.
Every rank must then pass the same B, P and D (checked; ValueError otherwise). Each rank returns
the mean over its own anchors, so averaging the per-rank losses (as DDP averages gradients)
gives the loss of the concatenated batch when every rank has the same number of valid slots.

With all slots valid and the reference defaults, each loss equals the reference class of
Gorluxor/NearID ``training/losses.py`` named in its docstring (core.py: NearID, InfoNCE;
ablation.py: the rest). ``circle_softplus_ranking`` is ours, not in the reference.
"""
from __future__ import annotations

import inspect

from torch import nn

from .ablation import (ArcFaceLoss, CircleLoss, CircleRankingLoss, CircleSoftplusRankingLoss, SigLIPLoss,
                       TripletLoss)
from .core import InfoNCELoss, LossOutput, NearIDLoss, _PairLoss

__all__ = [
    "LossOutput",
    "NearIDLoss",
    "InfoNCELoss",
    "CircleLoss",
    "CircleRankingLoss",
    "CircleSoftplusRankingLoss",
    "TripletLoss",
    "SigLIPLoss",
    "ArcFaceLoss",
    "LOSSES",
    "build_loss",
]

LOSSES: dict[str, type[_PairLoss]] = {
    "nearid": NearIDLoss,
    "infonce": InfoNCELoss,
    "circle": CircleLoss,
    "circle_ranking": CircleRankingLoss,
    "circle_softplus_ranking": CircleSoftplusRankingLoss,
    "triplet": TripletLoss,
    "siglip": SigLIPLoss,
    "arcface": ArcFaceLoss,
}


def build_loss(name: str, **hparams: object) -> nn.Module:
    """Build the loss called ``name`` (see LOSSES) with its hyper-parameters as keywords.

    Raises ValueError for an unknown name, an unknown hyper-parameter or an invalid value.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for loss {name!r}; "
                         f"valid: {', '.join(accepted)}")
    return cls(**hparams)
