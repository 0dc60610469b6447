"""The paper's ablation losses, each equal to a reference class of Gorluxor/NearID training/losses.py.

"Equal" means: the same number (to float rounding) on all-valid inputs with the reference
defaults. The one deliberate difference is masking: the reference keeps some invalid slots in
its sums (e.g. invalid pool rows among Circle's negatives); here an invalid slot is removed from
every sum and every count, so padding a batch never changes a loss (package docstring).

Cosines c(x, y) = x.y of L2-normalised embeddings; "pool" is every valid positive of the
(global) batch, as in core.py. Per loss, which reference class it equals:

- circle: BaselineCircleLoss (Sun et al. 2020, m 0.25, gamma 64);
- circle_ranking: ExtendedCircleLoss = circle + alpha * a cosine hinge over the pool;
- circle_softplus_ranking: our own variant, circle + alpha * the NearID softplus ranking term;
- triplet: BaselineCosineTripletLoss (cosine distance, semi-hard mining, margin 0.2);
- siglip: BaselineSigLIPLoss (t = 1/0.07, b = -10);
- arcface: BaselineAngularContrastiveLoss (m 0.5 rad, logit scale 64 / tau, distractors only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import (_Batch, _check_non_negative, _check_positive, _in_batch_negatives, _masked_logsumexp,
                   _masked_mean, _PairLoss, _ranking_term)


def _circle(batch: _Batch, margin: float, gamma: float) -> Tensor:
    """Circle loss per anchor, mean over anchors with a positive and a negative."""
    s_pos, pos_valid = batch.cos_pos, batch.pos_mask
    s_neg, neg_valid = _in_batch_negatives(batch)
    # The adaptive weights are treated as constants, as in the paper and the reference.
    alpha_pos = (1 + margin - s_pos).clamp(min=0).detach()
    alpha_neg = (s_neg + margin).clamp(min=0).detach()
    lse_pos, has_pos = _masked_logsumexp(-gamma * alpha_pos * (s_pos - (1 - margin)), pos_valid)
    lse_neg, has_neg = _masked_logsumexp(gamma * alpha_neg * (s_neg - margin), neg_valid)
    return _masked_mean(F.softplus(lse_pos + lse_neg), has_pos & has_neg)


def _hinge_ranking(batch: _Batch, margin: float) -> Tensor:
    """ExtendedCircleLoss's tier: mean over valid (b, k) of
    (1/M) * sum over other samples' valid positives x of relu(c(a_b, x) - c(a_b, n_{b,k}) + margin).

    M counts every valid pool row, a_b's own positives included (they add 0): the reference
    divides by the whole pool, so this keeps its scale; invalid rows leave both sum and M.
    """
    hinge = F.relu(batch.cos_pool.unsqueeze(1) - batch.cos_neg.unsqueeze(2) + margin)  # [B, K, N]
    summed = torch.where(batch.other_pool_mask.unsqueeze(1), hinge, 0.0).sum(dim=-1)
    per_slot = summed / batch.pool_mask.sum().clamp(min=1)
    return _masked_mean(per_slot, batch.neg_mask)


class CircleLoss(_PairLoss):
    """Circle loss = reference BaselineCircleLoss: positives = own views; negatives = own
    distractors + other samples' positives (the reference also keeps invalid pool rows; we drop them).
    """

    def __init__(self, *, margin: float = 0.25, gamma: float = 64.0, gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(gamma=gamma)
        _check_non_negative(margin=margin)
        self.margin, self.gamma = margin, gamma

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        circle = _circle(batch, self.margin, self.gamma)
        return circle, {"circle": circle, "total": circle}


class CircleRankingLoss(_PairLoss):
    """Circle + alpha * cosine hinge = reference ExtendedCircleLoss (the paper's "Circle + Ranking").

    The hinge (see _hinge_ranking) reuses Circle's margin, as the reference does, and has no
    temperature. The NearID softplus ranking on top of Circle is circle_softplus_ranking.
    """

    def __init__(self, *, margin: float = 0.25, gamma: float = 64.0, alpha: float = 0.5,
                 gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(gamma=gamma)
        _check_non_negative(margin=margin, alpha=alpha)
        self.margin, self.gamma, self.alpha = margin, gamma, alpha

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        circle = _circle(batch, self.margin, self.gamma)
        ranking = _hinge_ranking(batch, self.margin)
        total = circle + self.alpha * ranking
        return total, {"circle": circle, "ranking": ranking, "total": total}


class CircleSoftplusRankingLoss(_PairLoss):
    """Circle + alpha * the NearID softplus ranking term at temperature tau (no reference class).

    Kept because it isolates the discrimination part: NearID's own tier 2 on top of Circle
    instead of on top of InfoNCE.
    """

    def __init__(self, *, margin: float = 0.25, gamma: float = 64.0, alpha: float = 0.5,
                 temperature: float = 0.07, gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(gamma=gamma, temperature=temperature)
        _check_non_negative(margin=margin, alpha=alpha)
        self.margin, self.gamma, self.alpha, self.temperature = margin, gamma, alpha, temperature

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        circle = _circle(batch, self.margin, self.gamma)
        ranking = _ranking_term(batch, self.temperature)
        total = circle + self.alpha * ranking
        return total, {"circle": circle, "ranking": ranking, "total": total}


class TripletLoss(_PairLoss):
    """Cosine-distance triplet loss with semi-hard mining = reference BaselineCosineTripletLoss.

    One triplet per (anchor, positive). Semi-hard: d(a,p) < d(a,n) < d(a,p) + margin; the
    closest semi-hard negative is used, and the hardest (closest) negative when none is
    semi-hard. Negatives are the anchor's distractors and the other samples' positives.
    """

    def __init__(self, *, margin: float = 0.2, gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(margin=margin)
        self.margin = margin

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        d_pos = 1 - batch.cos_pos  # [B, P]
        s_neg, neg_valid = _in_batch_negatives(batch)
        d_neg = 1 - s_neg  # [B, C]
        with torch.no_grad():
            gap = d_neg.unsqueeze(1) - d_pos.unsqueeze(2)  # [B, P, C]
            valid = neg_valid.unsqueeze(1).expand_as(gap)
            semi_hard = valid & (gap > 0) & (gap < self.margin)
            far = torch.finfo(d_neg.dtype).max
            candidates = d_neg.unsqueeze(1).expand_as(gap)
            pick_semi = candidates.masked_fill(~semi_hard, far).argmin(dim=-1)
            pick_hard = candidates.masked_fill(~valid, far).argmin(dim=-1)
            has_semi = semi_hard.any(dim=-1)
            chosen = torch.where(has_semi, pick_semi, pick_hard)  # [B, P]
            row_valid = batch.pos_mask & neg_valid.any(dim=1, keepdim=True)
        d_chosen = d_neg.gather(1, chosen)
        loss = _masked_mean(F.relu(d_pos - d_chosen + self.margin), row_valid)
        semi_fraction = _masked_mean(has_semi.to(d_pos.dtype), row_valid)
        return loss, {"triplet": loss, "semi_hard_fraction": semi_fraction, "total": loss}


class SigLIPLoss(_PairLoss):
    """Sigmoid pair loss = reference BaselineSigLIPLoss: dense + hard, logits z = t * c + b.

    dense: BCE of z(a_b, pool) with label 1 for a_b's own positives, 0 for the rest, averaged
    over B x valid pool rows; hard: BCE of z(a_b, n_{b,k}) against 0, averaged over valid (b, k).
    Two separate means, not one sum: the reference weights the K distractors as much as the
    whole pool. (The reference skips the hard part when neg_mask is None, a quirk of its
    signature; its training always passes a mask, and None means all-valid here.)
    learnable=True makes t (initialised at 1/temperature) and b parameters, as the reference.
    """

    def __init__(self, *, temperature: float = 0.07, bias: float = -10.0, learnable: bool = False,
                 gather: bool = True) -> None:
        super().__init__(gather)
        _check_positive(temperature=temperature)
        if not math.isfinite(bias):
            raise ValueError(f"bias must be finite, got {bias!r}")
        scale, bias_t = torch.tensor(1.0 / temperature), torch.tensor(float(bias))
        if learnable:
            self.scale, self.bias = nn.Parameter(scale), nn.Parameter(bias_t)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias_t)

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        z_pool = self.scale * batch.cos_pool + self.bias  # [B, N]
        # BCE with logits: label 1 -> softplus(-z), label 0 -> softplus(z).
        bce = F.softplus(torch.where(batch.own_in_pool, -z_pool, z_pool))
        valid = batch.pool_mask.expand_as(bce)
        dense = torch.where(valid, bce, 0.0).sum() / valid.sum().clamp(min=1)
        hard = _masked_mean(F.softplus(self.scale * batch.cos_neg + self.bias), batch.neg_mask)
        loss = dense + hard
        return loss, {"dense": dense, "hard": hard, "siglip": loss, "total": loss}


def _arc_margin(cosine: Tensor, margin: float) -> Tensor:
    """cos(theta + margin) the way the reference computes it (_arcface_apply_margin).

    The cosine is clamped 1e-4 inside [-1, 1] before and after: that keeps sqrt's gradient
    finite at |cos| = 1, and keeping the same clamp (not a tighter one) keeps the same numbers
    near cos = 1. No fallback past theta + m > pi, as in the reference.
    """
    if margin == 0:
        return cosine
    eps = 1e-4
    cosine = cosine.clamp(-1 + eps, 1 - eps)
    sine = (1 - cosine * cosine).clamp(min=0).sqrt()
    return (cosine * math.cos(margin) - sine * math.sin(margin)).clamp(-1 + eps, 1 - eps)


class ArcFaceLoss(_PairLoss):
    """Additive angular margin softmax = reference BaselineAngularContrastiveLoss.

    For each valid (b, q): cross-entropy of (scale / tau) * [cos(theta_{b,q} + m), c(a_b, n_{b,1..K})]
    with target 0, mean over valid (b, q). Only the anchor's own distractors compete (no pool,
    so nothing is gathered across ranks). With K = 0 the reference uses softplus(-logit), kept.
    """

    def __init__(self, *, margin: float = 0.5, temperature: float = 0.07, scale: float = 64.0) -> None:
        super().__init__(gather=False)
        _check_positive(temperature=temperature, scale=scale)
        _check_non_negative(margin=margin)
        if margin >= math.pi / 2:
            raise ValueError(f"margin must be < pi/2 radians, got {margin!r}")
        self.margin, self.temperature, self.scale = margin, temperature, scale

    def _compute(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logit_scale = self.scale / self.temperature
        target = _arc_margin(batch.cos_pos, self.margin) * logit_scale  # [B, P]
        if batch.cos_neg.shape[1] == 0:
            per_pair = F.softplus(-target)
        else:
            negatives = (batch.cos_neg * logit_scale).masked_fill(~batch.neg_mask, -math.inf)  # [B, K]
            slots = target.shape[1]
            logits = torch.cat([target.unsqueeze(-1), negatives.unsqueeze(1).expand(-1, slots, -1)], dim=-1)
            per_pair = torch.logsumexp(logits, dim=-1) - target  # the target logit is always finite
        loss = _masked_mean(per_pair, batch.pos_mask)
        return loss, {"arcface": loss, "total": loss}
