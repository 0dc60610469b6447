"""The shared machinery of every loss (inputs, masks, the gathered pool) plus NearID and InfoNCE.

See the package docstring (nearid/losses/__init__.py) for the calling convention, the masking
rule and the pool. Definitions follow the NearID paper's loss (arXiv 2604.01973: discrimination
term + ranking regularizer), s(x, y) = x.y / tau,
- discrimination: for each positive slot q, cross-entropy of [s(a_b, pool) || s(a_b, n_b)] with
  target a_b's own p_{b,q}; mean over valid b, then over slots q that have a valid b;
- ranking: softplus(LSE_b - s(a_b, n_{b,k})) with LSE_b over the pool minus a_b's own
  positives; mean over valid (b, k);
- nearid = discrimination + alpha * ranking.
These equal the reference's ExtendedInfoNCELoss / BaselineInfoNCELoss on all-valid inputs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A scalar loss to backpropagate plus its named parts as plain floats (for logging)."""

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Batch:
    """Validated, normalised inputs plus the (possibly global) positive pool."""

    anchor: Tensor  # [B, D]
    positive: Tensor  # [B, P, D]
    negative: Tensor  # [B, K, D]
    pos_mask: Tensor  # [B, P] bool
    neg_mask: Tensor  # [B, K] bool
    pool: Tensor  # [N, D], N = world_size * B * P
    pool_mask: Tensor  # [N] bool
    own_index: Tensor  # [B, P] long: pool row of p_{b,q}
    own_in_pool: Tensor  # [B, N] bool: pool rows that are a_b's own positives

    @property
    def cos_pool(self) -> Tensor:
        """Cosine of every anchor with every pool row, [B, N]."""
        return self.anchor @ self.pool.T

    @property
    def cos_neg(self) -> Tensor:
        """Cosine of every anchor with its own distractors, [B, K]."""
        return torch.einsum("bd,bkd->bk", self.anchor, self.negative)

    @property
    def cos_pos(self) -> Tensor:
        """Cosine of every anchor with its own positives, [B, P]."""
        return torch.einsum("bd,bpd->bp", self.anchor, self.positive)

    @property
    def other_pool_mask(self) -> Tensor:
        """[B, N]: valid pool rows that belong to other samples (the in-batch random negatives)."""
        return self.pool_mask.unsqueeze(0) & ~self.own_in_pool


# --------------------------------------------------------------------------- input handling


def _check_mask(mask: Tensor | None, name: str, shape: tuple[int, int], device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = valid slot), got dtype {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    return mask.to(device)


def _check_inputs(anchor: Tensor, positive: Tensor, negative: Tensor) -> None:
    for name, x, ndim, layout in (("anchor", anchor, 2, "[B, D]"), ("positive", positive, 3, "[B, P, D]"),
                                  ("negative", negative, 3, "[B, K, D]")):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != ndim:
            raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    batch, dim = anchor.shape
    if batch == 0:
        raise ValueError("anchor has batch size 0")
    for name, x in (("positive", positive), ("negative", negative)):
        if x.shape[0] != batch:
            raise ValueError(f"{name} batch size {x.shape[0]} does not match anchor batch size {batch}")
        if x.shape[2] != dim:
            raise ValueError(f"{name} embedding dim {x.shape[2]} does not match anchor dim {dim}")
    if positive.shape[1] == 0:
        raise ValueError("positive must have at least one slot (P >= 1)")
    for name, x in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        # Checked on masked slots too: a NaN there would leak into gradients through the matmul.
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values")


def _distributed_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_pool(positive: Tensor, pos_mask: Tensor, gather: bool) -> tuple[Tensor, Tensor, int]:
    """Flatten the positives into the pool, all-gathered with gradients across ranks.

    Returns (pool [N, D], pool_mask [N], offset of this rank's rows in the pool).
    """
    batch, slots, dim = positive.shape
    flat, flat_mask = positive.reshape(batch * slots, dim), pos_mask.reshape(batch * slots)
    rank, world = _distributed_world() if gather else (0, 1)
    if world == 1:
        return flat, flat_mask, 0
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    shape = torch.tensor([batch, slots, dim], dtype=torch.long, device=positive.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        seen = [s.tolist() for s in shapes]
        raise ValueError(f"every rank must pass the same positive shape [B, P, D] to gather the pool; "
                         f"got {seen} across ranks")
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); still differentiable
        # with every backend, gloo included, which is what the pool needs.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        pool = torch.cat(all_gather(flat), dim=0)  # backward sums every rank's grads into ours
    masks = [torch.empty_like(flat_mask, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(masks, flat_mask.to(torch.uint8))
    return pool, torch.cat(masks).bool(), rank * batch * slots


def _prepare(anchor: Tensor, positive: Tensor, negative: Tensor, pos_mask: Tensor | None,
             neg_mask: Tensor | None, gather: bool) -> _Batch:
    _check_inputs(anchor, positive, negative)
    batch, slots, n_neg = anchor.shape[0], positive.shape[1], negative.shape[1]
    pos_mask = _check_mask(pos_mask, "pos_mask", (batch, slots), anchor.device)
    neg_mask = _check_mask(neg_mask, "neg_mask", (batch, n_neg), anchor.device)
    dtype = torch.promote_types(anchor.dtype, torch.float32)  # fp16/bf16 embeddings: loss in fp32
    anchor, positive, negative = (F.normalize(x.to(dtype), dim=-1) for x in (anchor, positive, negative))
    pool, pool_mask, offset = _gather_pool(positive, pos_mask, gather)
    own_index = offset + torch.arange(batch * slots, device=anchor.device).view(batch, slots)
    own_in_pool = torch.zeros(batch, pool.shape[0], dtype=torch.bool, device=anchor.device)
    own_in_pool.scatter_(1, own_index, True)
    return _Batch(anchor, positive, negative, pos_mask, neg_mask, pool, pool_mask, own_index, own_in_pool)


# --------------------------------------------------------------------------- shared pieces


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values where mask; 0 (still attached to the graph) when nothing is valid."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _masked_logsumexp(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """logsumexp over the last dim of the valid entries, and whether a row had any.

    Empty rows are replaced by zeros before the reduction so that no NaN reaches backward.
    """
    has_any = mask.any(dim=-1)
    safe = torch.where(has_any.unsqueeze(-1), logits.masked_fill(~mask, -math.inf), 0.0)
    return torch.logsumexp(safe, dim=-1), has_any


def _pool_softmax_term(batch: _Batch, temperature: float, use_negatives: bool,
                       target_cosine: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Tier 1: per positive slot CE over [pool || own distractors], mean over b then over q.

    target_cosine maps the target's cosine to the one used in its logit (margins, ArcFace).
    """
    columns, column_mask = [batch.cos_pool], [batch.pool_mask.expand(batch.anchor.shape[0], -1)]
    if use_negatives:
        columns.append(batch.cos_neg)
        column_mask.append(batch.neg_mask)
    cosine, valid = torch.cat(columns, dim=1), torch.cat(column_mask, dim=1)  # [B, C]
    slots = batch.own_index.shape[1]
    target = batch.own_index.unsqueeze(-1)  # [B, P, 1]
    per_slot = cosine.unsqueeze(1).expand(-1, slots, -1)  # [B, P, C]
    if target_cosine is not None:
        modified = target_cosine(per_slot.gather(2, target))
        per_slot = per_slot.scatter(2, target, modified)
    logits = (per_slot / temperature).masked_fill(~valid.unsqueeze(1), -math.inf)
    # A slot whose own positive is masked has no target: give it a harmless finite row.
    row_valid = batch.pos_mask
    logits = torch.where(row_valid.unsqueeze(-1), logits, 0.0)
    ce = -logits.log_softmax(dim=-1).gather(2, target).squeeze(-1)  # [B, P]
    count = row_valid.sum(dim=0)
    per_q = torch.where(row_valid, ce, 0.0).sum(dim=0) / count.clamp(min=1)
    return _masked_mean(per_q, count > 0)


def _ranking_term(batch: _Batch, temperature: float) -> Tensor:
    """Tier 2: softplus(LSE over other samples' positives - s(a_b, n_{b,k})), mean over valid (b, k)."""
    lse, has_others = _masked_logsumexp(batch.cos_pool / temperature, batch.other_pool_mask)
    term = F.softplus(lse.unsqueeze(1) - batch.cos_neg / temperature)
    return _masked_mean(term, batch.neg_mask & has_others.unsqueeze(1))


def _in_batch_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """Cosines with all negatives of each anchor: other samples' positives then its distractors."""
    cosine = torch.cat([batch.cos_pool, batch.cos_neg], dim=1)
    valid = torch.cat([batch.other_pool_mask, batch.neg_mask], dim=1)
    return cosine, valid


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class _PairLoss(nn.Module):
    """Validates and normalises the inputs, builds the pool, then calls ``_compute``."""

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor,
                pos_mask: Tensor | None = None, neg_mask: Tensor | None = None) -> LossOutput:
        batch = _prepare(anchor, positive, negative, pos_mask, neg_mask, self.gather)
        loss, terms = self._compute(batch)
        return LossOutput(loss=loss, terms={k: float(v.detach()) for k, v in terms.items()})

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


# --------------------------------------------------------------------------- the losses


class NearIDLoss(_PairLoss):
    """Two-tier NearID loss: discrimination + alpha * ranking (alpha=0 gives tier 1 only).

    margin (cosine units, default off) is subtracted from the target's cosine before /tau.
    """

    def __init__(self, *, temperature: float = 0.07, alpha: float = 0.5, margin: float = 0.0,
                 gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(temperature=temperature)
        _check_non_negative(alpha=alpha, margin=margin)
        self.temperature, self.alpha, self.margin = temperature, alpha, margin

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        shift = (lambda c: c - self.margin) if self.margin else None
        discrimination = _pool_softmax_term(batch, self.temperature, True, shift)
        ranking = _ranking_term(batch, self.temperature)
        total = discrimination + self.alpha * ranking
        return total, {"discrimination": discrimination, "ranking": ranking, "total": total}


class InfoNCELoss(_PairLoss):
    """The discrimination term alone; use_negatives=False drops the distractors from the softmax."""

    def __init__(self, *, temperature: float = 0.07, use_negatives: bool = True, gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(temperature=temperature)
        self.temperature, self.use_negatives = temperature, use_negatives

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss = _pool_softmax_term(batch, self.temperature, self.use_negatives)
        return loss, {"discrimination": loss, "total": loss}

