"""Tests for nearid.losses: hand-computed answers, loop references, masking, errors, DDP."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nearid.losses import LOSSES, LossOutput, build_loss

ALL_NAMES = ["nearid", "infonce", "circle", "circle_ranking", "circle_softplus_ranking", "triplet", "siglip",
             "arcface"]
E = math.e


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-6) -> None:
    actual = actual.detach() if isinstance(actual, torch.Tensor) else actual
    expected = expected.detach() if isinstance(expected, torch.Tensor) else expected
    assert math.isclose(float(actual), float(expected), rel_tol=tol, abs_tol=tol), (float(actual), expected)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Example 1: B=2, P=1, K=1. Cosines: a0.p0=1, a0.p1=0, a0.n0=0; a1.p0=0, a1.p1=1, a1.n1=-1.
# Lengths differ from 1 on purpose: the loss must normalise.
EX1 = dict(anchor=t([[1, 0], [0, 3]]), positive=t([[[2, 0]], [[0, 1]]]), negative=t([[[0, 1]], [[0, -2]]]))


def example1():
    return EX1["anchor"], EX1["positive"], EX1["negative"]


def test_nearid_discrimination_and_ranking_by_hand():
    out = build_loss("nearid", temperature=0.5, alpha=0.5)(*example1())
    # tau = 0.5 doubles every cosine. b0 logits [p0 2 | p1 0 | n0 0], b1 [p0 0 | p1 2 | n1 -2].
    disc = ((math.log(E**2 + 2) - 2) + (math.log(1 + E**2 + E**-2) - 2)) / 2
    # LSE over other samples' positives is 0 for both anchors; distractor logits 0 and -2.
    ranking = (softplus(0 - 0) + softplus(0 - (-2))) / 2
    close(out.terms["discrimination"], disc)
    close(out.terms["ranking"], ranking)
    close(out.loss, disc + 0.5 * ranking)
    close(out.terms["total"], disc + 0.5 * ranking)
    assert isinstance(out, LossOutput) and out.loss.ndim == 0


def test_nearid_margin_by_hand():
    out = build_loss("nearid", temperature=0.5, alpha=0.0, margin=0.2)(*example1())
    target = (1 - 0.2) / 0.5
    disc = ((math.log(E**target + 2) - target) + (math.log(1 + E**target + E**-2) - target)) / 2
    close(out.loss, disc)


def test_infonce_by_hand_with_and_without_distractors():
    with_neg = build_loss("infonce", temperature=0.5)(*example1())
    close(with_neg.loss, ((math.log(E**2 + 2) - 2) + (math.log(1 + E**2 + E**-2) - 2)) / 2)
    pool_only = build_loss("infonce", temperature=0.5, use_negatives=False)(*example1())
    close(pool_only.loss, math.log(E**2 + 1) - 2)


def test_circle_and_circle_ranking_by_hand():
    m, gamma = 0.25, 1.0
    # Positive cosine 1: alpha_p = 0.25, logit -gamma * 0.25 * (1 - 0.75) = -0.0625.
    # Negative cosine 0: alpha_n = 0.25, logit 0.25 * (0 - 0.25) = -0.0625; cosine -1: alpha_n = 0.
    loss0 = math.log(1 + 2 * math.exp(-0.125))
    loss1 = math.log(1 + math.exp(-0.0625) * (math.exp(-0.0625) + 1))
    circle = build_loss("circle", margin=m, gamma=gamma)(*example1())
    close(circle.loss, (loss0 + loss1) / 2)
    # ExtendedCircleLoss's hinge, pool of M = 2 rows: b0 vs p1 (cos 0), distractor cos 0 ->
    # relu(0 - 0 + 0.25) / 2; b1 vs p0 (cos 0), distractor cos -1 -> relu(0 + 1 + 0.25) / 2.
    both = build_loss("circle_ranking", margin=m, gamma=gamma, alpha=0.5)(*example1())
    hinge = (0.25 / 2 + 1.25 / 2) / 2
    close(both.terms["ranking"], hinge)
    close(both.loss, (loss0 + loss1) / 2 + 0.5 * hinge)
    ours = build_loss("circle_softplus_ranking", margin=m, gamma=gamma, alpha=0.5, temperature=0.5)(*example1())
    ranking = (softplus(0) + softplus(2)) / 2
    close(ours.terms["ranking"], ranking)
    close(ours.loss, (loss0 + loss1) / 2 + 0.5 * ranking)


def test_siglip_by_hand():
    out = build_loss("siglip", temperature=0.5, bias=-1.0)(*example1())
    # logit = 2 cos - 1. Dense (2 anchors x 2 pool rows): own positives cos 1 -> softplus(-1),
    # the other row cos 0 -> softplus(-1); mean softplus(-1). Hard: distractors cos 0 and -1.
    dense, hard = softplus(-1), (softplus(-1) + softplus(-3)) / 2
    close(out.terms["dense"], dense)
    close(out.terms["hard"], hard)
    close(out.loss, dense + hard)


def test_triplet_semi_hard_and_fallback_by_hand():
    anchor = t([[1, 0], [0, 1]])
    positive = t([[[1, 1]], [[0, -1]]])
    negative = t([[[0.6, 0.8], [0, 1]], [[1, 0], [-1, 0]]])
    out = build_loss("triplet", margin=0.2)(anchor, positive, negative)
    d_ap0 = 1 - 1 / math.sqrt(2)
    # b0: negatives at distance 1 (p1), 0.4 (semi-hard, picked), 1.
    loss0 = d_ap0 - 0.4 + 0.2
    # b1: d_ap = 2, nothing lies in (2, 2.2): the hardest negative is p0 at distance 1 - 1/sqrt2.
    loss1 = 2 - (1 - 1 / math.sqrt(2)) + 0.2
    close(out.loss, (loss0 + loss1) / 2)
    close(out.terms["semi_hard_fraction"], 0.5)


def test_arcface_by_hand_distractors_only_and_no_fallback():
    anchor = t([[1, 0], [1, 0]])
    wide = math.radians(170)  # theta + m passes pi: the reference still uses cos(theta + m)
    positive = t([[[1, math.sqrt(3)]], [[math.cos(wide), math.sin(wide)]]])
    negative = t([[[0, 1]], [[0, -1]]])  # both distractors at cos 0; the pool takes no part
    out = build_loss("arcface", margin=0.5, temperature=1.0, scale=1.0)(anchor, positive, negative)
    phi0, phi1 = math.cos(math.pi / 3 + 0.5), math.cos(wide + 0.5)
    ce0 = math.log(math.exp(phi0) + 1) - phi0
    ce1 = math.log(math.exp(phi1) + 1) - phi1
    close(out.loss, (ce0 + ce1) / 2, tol=1e-5)
    # The logit scale is scale / temperature (64 / 0.07 by default).
    scaled = build_loss("arcface", margin=0.5, temperature=0.5, scale=2.0)(anchor, positive, negative)
    close(scaled.loss, sum(math.log(math.exp(4 * f) + 1) - 4 * f for f in (phi0, phi1)) / 2, tol=1e-5)
    # No distractor slots (K = 0): the reference switches to softplus(-logit).
    alone = build_loss("arcface", margin=0.5, temperature=1.0, scale=1.0)(anchor, positive, negative[:, :0])
    close(alone.loss, (softplus(-phi0) + softplus(-phi1)) / 2, tol=1e-5)


def test_arcface_clamps_a_positive_equal_to_the_anchor_like_the_reference():
    anchor = t([[3, 4]]).requires_grad_(True)
    positive = t([[[3, 4]]]).requires_grad_(True)  # cos exactly 1
    negative = t([[[-4, 3]]])  # cos 0
    out = build_loss("arcface", margin=0.5, temperature=1.0, scale=1.0)(anchor, positive, negative)
    c = 1 - 1e-4  # the reference clamps first: cos(acos(1 - 1e-4) + m), not cos(m)
    phi = math.cos(math.acos(c) + 0.5)
    assert abs(phi - math.cos(0.5)) > 1e-3
    close(out.loss, math.log(math.exp(phi) + 1) - phi, tol=1e-6)
    out.loss.backward()  # at the clamp, sqrt(1 - cos^2) must not send NaN back
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(positive.grad).all()


def test_nearid_with_masked_slots_by_hand():
    # B=2, P=2, K=2; p11 and n01 are masked and hold values that would change the answer.
    anchor = t([[1, 0], [0, 1]])
    positive = t([[[1, 0], [0, 1]], [[0, 1], [1, 0]]])
    negative = t([[[-1, 0], [5, -3]], [[1, 1], [-1, 0]]])
    pos_mask = torch.tensor([[True, True], [True, False]])
    neg_mask = torch.tensor([[True, False], [True, True]])
    out = build_loss("nearid", temperature=1.0, alpha=1.0)(anchor, positive, negative, pos_mask, neg_mask)
    r = 1 / math.sqrt(2)
    lse0 = math.log(E + 1 + 1 + E**-1)  # b0: pool [p00 1, p01 0, p10 0] + n00 -1
    lse1 = math.log(1 + E + E + E**r + 1)  # b1: pool [p00 0, p01 1, p10 1] + n10 r + n11 0
    disc = (((lse0 - 1) + (lse1 - 1)) / 2 + (lse0 - 0)) / 2  # slot q=1 has only b0
    ranking = (softplus(0 + 1) + softplus(math.log(1 + E) - r) + softplus(math.log(1 + E) - 0)) / 3
    close(out.terms["discrimination"], disc)
    close(out.terms["ranking"], ranking)


# ------------------------------------------------------------------ loop references, random inputs


def random_batch(seed: int, b=4, p=2, k=3, d=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, p, d, generator=g, dtype=dtype),
            torch.randn(b, k, d, generator=g, dtype=dtype))


def unit(a, p, n):
    return F.normalize(a, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)


def negatives_of(a, p, n, b):
    """Cosines of anchor b with other samples' positives and its own distractors (all valid)."""
    bsz, slots, _ = p.shape
    return [float(a[b] @ p[c, q]) for c in range(bsz) for q in range(slots) if c != b] + \
        [float(a[b] @ n[b, k]) for k in range(n.shape[1])]


def lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def reference_pool_ce(a, p, n, tau, target_fn=lambda c: c):
    bsz, slots, _ = p.shape
    pool = p.reshape(bsz * slots, -1)
    per_q = []
    for q in range(slots):
        ces = []
        for b in range(bsz):
            cos = [float(a[b] @ x) for x in pool] + [float(a[b] @ x) for x in n[b]]
            cos[b * slots + q] = target_fn(cos[b * slots + q])
            ces.append(lse([c / tau for c in cos]) - cos[b * slots + q] / tau)
        per_q.append(sum(ces) / bsz)
    return sum(per_q) / slots


def reference_ranking(a, p, n, tau):
    bsz, slots, _ = p.shape
    terms = []
    for b in range(bsz):
        others = lse([float(a[b] @ p[c, q]) / tau for c in range(bsz) for q in range(slots) if c != b])
        terms += [softplus(others - float(a[b] @ x) / tau) for x in n[b]]
    return sum(terms) / len(terms)


def test_nearid_and_infonce_equal_loop_reference():
    raw = random_batch(1)
    a, p, n = unit(*raw)
    disc, ranking = reference_pool_ce(a, p, n, 0.07), reference_ranking(a, p, n, 0.07)
    out = build_loss("nearid")(*raw)
    close(out.terms["discrimination"], disc)
    close(out.terms["ranking"], ranking)
    close(out.loss, disc + 0.5 * ranking)
    tier1 = build_loss("nearid", alpha=0.0)(*raw)
    close(build_loss("infonce")(*raw).loss, tier1.loss)
    close(tier1.loss, disc)


def test_circle_triplet_softplus_ranking_equal_loop_reference():
    raw = random_batch(2)
    a, p, n = unit(*raw)
    bsz, slots = p.shape[:2]
    triplet = []
    for b in range(bsz):
        for s in [float(a[b] @ x) for x in p[b]]:
            d_ap, d_an = 1 - s, [1 - x for x in negatives_of(a, p, n, b)]
            semi = [d for d in d_an if d_ap < d < d_ap + 0.2]
            triplet.append(max(0.0, d_ap - (min(semi) if semi else min(d_an)) + 0.2))
    circle = ref_circle(a, p, n, *all_valid(p, n))
    close(build_loss("circle")(*raw).loss, circle)
    close(build_loss("triplet")(*raw).loss, sum(triplet) / (bsz * slots))
    ranking = reference_ranking(a, p, n, 0.07)
    close(build_loss("circle_softplus_ranking")(*raw).loss, circle + 0.5 * ranking)


# The three reference forms below are written from Gorluxor/NearID training/losses.py
# (ExtendedCircleLoss, BaselineSigLIPLoss, BaselineAngularContrastiveLoss) as plain loops over
# the valid entries only: an invalid slot appears in no sum and no count.


def valid_pool(pm):
    return [(c, q) for c in range(pm.shape[0]) for q in range(pm.shape[1]) if pm[c, q]]


def ref_circle_hinge(a, p, n, pm, nm, m=0.25):
    """Mean over valid (b, k) of sum_{valid pool rows of other samples} relu(c_pool - c_neg + m) / M,
    M = every valid pool row (the anchor's own positives count in M and add 0)."""
    pool = valid_pool(pm)
    terms = []
    for b in range(a.shape[0]):
        for k in range(n.shape[1]):
            if nm[b, k]:
                c_neg = float(a[b] @ n[b, k])
                hinge = sum(max(0.0, float(a[b] @ p[c, q]) - c_neg + m) for c, q in pool if c != b)
                terms.append(hinge / len(pool))
    return sum(terms) / len(terms)


def ref_circle(a, p, n, pm, nm, m=0.25, gamma=64.0):
    values = []
    for b in range(a.shape[0]):
        sp = [float(a[b] @ p[b, q]) for q in range(p.shape[1]) if pm[b, q]]
        sn = [float(a[b] @ p[c, q]) for c, q in valid_pool(pm) if c != b] + \
            [float(a[b] @ n[b, k]) for k in range(n.shape[1]) if nm[b, k]]
        pos_part = lse([-gamma * max(0, 1 + m - s) * (s - (1 - m)) for s in sp])
        neg_part = lse([gamma * max(0, s + m) * (s - m) for s in sn])
        values.append(softplus(pos_part + neg_part))
    return sum(values) / len(values)


def ref_siglip(a, p, n, pm, nm, t=1 / 0.07, bias=-10.0):
    """mean over B x valid pool rows of BCE(t c + b, own positive ?) + mean over valid (b, k) of
    BCE(t c + b, 0); BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)."""
    pool = valid_pool(pm)
    dense = 0.0
    for b in range(a.shape[0]):
        for c, q in pool:
            z = t * float(a[b] @ p[c, q]) + bias
            dense += softplus(-z) if c == b else softplus(z)
    dense /= a.shape[0] * len(pool)
    hard = [softplus(t * float(a[b] @ n[b, k]) + bias)
            for b in range(a.shape[0]) for k in range(n.shape[1]) if nm[b, k]]
    return dense + sum(hard) / len(hard)


def ref_arcface(a, p, n, pm, nm, m=0.5, scale=64.0, tau=0.07):
    """Mean over valid (b, q) of CE([cos(theta + m), c(a_b, valid n_b)] * scale / tau, target 0);
    the cosine is clamped 1e-4 inside [-1, 1] before and after the margin, as the reference does."""
    s, eps = scale / tau, 1e-4
    ces = []
    for b in range(a.shape[0]):
        for q in range(p.shape[1]):
            if pm[b, q]:
                c = min(max(float(a[b] @ p[b, q]), -1 + eps), 1 - eps)
                phi = min(max(math.cos(math.acos(c) + m), -1 + eps), 1 - eps)
                logits = [phi * s] + [float(a[b] @ n[b, k]) * s for k in range(n.shape[1]) if nm[b, k]]
                ces.append(lse(logits) - phi * s)
    return sum(ces) / len(ces)


def all_valid(p, n):
    return torch.ones(p.shape[:2], dtype=torch.bool), torch.ones(n.shape[:2], dtype=torch.bool)


# The reference classes themselves, run once offline (float64 inputs; they compute Circle and
# ArcFace in float32) on random_batch(0, b=4, p=2, k=3, d=8):
REF_SEED0 = {"circle": 99.51637268066406, "circle_ranking.tier": 0.21662516983677524,
             "circle_ranking": 99.62468526558246, "siglip": 2.9082866919832053, "arcface": 843.8917236328125}


def test_circle_ranking_siglip_arcface_equal_the_reference_formulas():
    raw = random_batch(0, b=4, p=2, k=3, d=8)
    a, p, n = unit(*raw)
    pm, nm = all_valid(p, n)
    hinge, circle = ref_circle_hinge(a, p, n, pm, nm), ref_circle(a, p, n, pm, nm)
    both = build_loss("circle_ranking")(*raw)
    close(both.terms["ranking"], hinge, tol=1e-5)
    close(both.terms["circle"], circle, tol=1e-5)
    close(both.loss, circle + 0.5 * hinge, tol=1e-5)
    close(build_loss("siglip")(*raw).loss, ref_siglip(a, p, n, pm, nm), tol=1e-5)
    close(build_loss("arcface")(*raw).loss, ref_arcface(a, p, n, pm, nm), tol=1e-5)
    # ... and the loop formulas are the reference classes' numbers.
    close(circle, REF_SEED0["circle"], tol=1e-5)
    close(hinge, REF_SEED0["circle_ranking.tier"], tol=1e-5)
    close(circle + 0.5 * hinge, REF_SEED0["circle_ranking"], tol=1e-5)
    close(ref_siglip(a, p, n, pm, nm), REF_SEED0["siglip"], tol=1e-5)
    close(ref_arcface(a, p, n, pm, nm), REF_SEED0["arcface"], tol=1e-5)


def test_circle_ranking_siglip_arcface_with_masked_slots_equal_the_formulas_over_valid_slots():
    raw_a, raw_p, raw_n = random_batch(10, b=4, p=3, k=3, d=8)
    pm = torch.tensor([[True, False, True], [True, True, True], [False, True, False], [True, True, False]])
    nm = torch.tensor([[True, True, False], [False, False, False], [True, False, True], [True, True, True]])
    a, p, n = unit(raw_a, raw_p, raw_n)
    # Masked slots hold the anchor's own direction: if they leaked into any sum the loss would move.
    garbage_p, garbage_n = raw_p.clone(), raw_n.clone()
    garbage_p[~pm] = raw_a[(~pm).nonzero()[:, 0]]
    garbage_n[~nm] = raw_a[(~nm).nonzero()[:, 0]]
    args = (raw_a, garbage_p, garbage_n, pm, nm)
    both = build_loss("circle_ranking", gamma=4.0)(*args)
    close(both.terms["ranking"], ref_circle_hinge(a, p, n, pm, nm), tol=1e-5)
    close(both.terms["circle"], ref_circle(a, p, n, pm, nm, gamma=4.0), tol=1e-5)
    siglip = build_loss("siglip")(*args)
    close(siglip.loss, ref_siglip(a, p, n, pm, nm), tol=1e-5)
    close(build_loss("arcface", scale=1.0)(*args).loss, ref_arcface(a, p, n, pm, nm, scale=1.0), tol=1e-5)
    close(build_loss("arcface")(*args).loss, ref_arcface(a, p, n, pm, nm), tol=1e-5)
    # Not vacuous: counting the masked slots (all-valid masks over the same tensors) changes every one.
    everything = (raw_a, garbage_p, garbage_n)
    assert abs(build_loss("circle_ranking", gamma=4.0)(*everything).terms["ranking"] - both.terms["ranking"]) > 1e-3
    assert abs(build_loss("siglip")(*everything).terms["total"] - siglip.terms["total"]) > 1e-3
    assert abs(build_loss("arcface", scale=1.0)(*everything).terms["total"]
               - ref_arcface(a, p, n, pm, nm, scale=1.0)) > 1e-3


# ------------------------------------------------------------------ masking


@pytest.mark.parametrize("name", ALL_NAMES)
def test_masking_a_distractor_equals_dropping_it(name):
    a, p, n = random_batch(3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[:, 1] = False
    garbage = n.clone()
    garbage[:, 1] = 100.0  # contents of a masked slot must not matter
    masked = build_loss(name)(a, p, garbage, neg_mask=mask)
    dropped = build_loss(name)(a, p, n[:, [0, 2]])
    close(masked.loss, dropped.loss)
    # Per-sample masking: changing a masked slot's contents changes nothing.
    one = torch.ones(4, 3, dtype=torch.bool)
    one[2, 0] = False
    other = n.clone()
    other[2, 0] = -n[2, 0] * 3
    close(build_loss(name)(a, p, n, neg_mask=one).loss, build_loss(name)(a, p, other, neg_mask=one).loss)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_masking_a_positive_removes_it_from_the_pool(name):
    a, p, n = random_batch(4)
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[:, 1] = False
    garbage = p.clone()
    garbage[:, 1] = a  # a masked copy of the anchor would dominate every softmax if it leaked
    close(build_loss(name)(a, garbage, n, pos_mask=mask).loss, build_loss(name)(a, p[:, :1], n).loss)
    one = torch.ones(4, 2, dtype=torch.bool)
    one[1, 1] = False
    leaked = p.clone()
    leaked[1, 1] = a[0]  # sample 0's anchor direction: a strong pool negative for sample 0 if not masked
    close(build_loss(name)(a, p, n, pos_mask=one).loss, build_loss(name)(a, leaked, n, pos_mask=one).loss)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_loss_is_finite_and_has_gradients(name):
    a, p, n = (x.float().requires_grad_(True) for x in random_batch(5))
    pos_mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    neg_mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True], [True, False, True]])
    for masks in ({}, {"pos_mask": pos_mask, "neg_mask": neg_mask}):
        for x in (a, p, n):
            x.grad = None
        out = build_loss(name)(a, p, n, **masks)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss), out
        assert all(math.isfinite(v) for v in out.terms.values()) and "total" in out.terms
        out.loss.backward()
        for x in (a, p, n):
            assert torch.isfinite(x.grad).all()
        assert a.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
        if masks:  # a masked slot receives no gradient
            assert p.grad[1, 1].abs().sum() == 0 and n.grad[0, 2].abs().sum() == 0


def test_half_precision_inputs_give_float32_loss():
    a, p, n = (x.to(torch.bfloat16) for x in random_batch(6))
    out = build_loss("nearid")(a, p, n)
    assert out.loss.dtype == torch.float32
    close(out.loss, build_loss("nearid")(a.float(), p.float(), n.float()).loss)


def test_learnable_siglip_has_parameters_that_get_gradients():
    loss = build_loss("siglip", learnable=True)
    out = loss(*random_batch(7, dtype=torch.float32))
    out.loss.backward()
    assert loss.scale.grad is not None and loss.bias.grad is not None
    close(loss.scale, 1 / 0.07)
    assert len(list(build_loss("siglip").parameters())) == 0


# ------------------------------------------------------------------ errors


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nearid.*triplet|triplet.*nearid"):
        build_loss("cosface")
    assert set(LOSSES) == set(ALL_NAMES)


@pytest.mark.parametrize("name, hparams, needle", [
    ("nearid", {"temprature": 0.1}, "temprature"),
    ("triplet", {"gamma": 3}, "gamma"),
    ("nearid", {"temperature": 0.0}, "temperature"),
    ("nearid", {"alpha": -1.0}, "alpha"),
    ("circle", {"gamma": float("nan")}, "gamma"),
    ("arcface", {"margin": 2.0}, "margin"),
])
def test_bad_hparams_are_named(name, hparams, needle):
    with pytest.raises(ValueError, match=needle):
        build_loss(name, **hparams)


def test_bad_inputs_are_named():
    a, p, n = random_batch(8, dtype=torch.float32)
    loss = build_loss("nearid")
    bad_mask = torch.ones(4, 2, dtype=torch.bool)
    nan_p = p.clone()
    nan_p[0, 0, 0] = float("nan")
    inf_a = a.clone()
    inf_a[1, 1] = float("inf")
    cases = [
        ((a[None], p, n), {}, "anchor"),
        ((a, p[0], n), {}, "positive"),
        ((a, p, n[0]), {}, "negative"),
        ((a, p[:3], n), {}, "positive batch size"),
        ((a, p, n[:2]), {}, "negative batch size"),
        ((a, p[..., :5], n), {}, "positive embedding dim"),
        ((a, p, n[..., :4]), {}, "negative embedding dim"),
        ((a, p[:, :0], n), {}, "at least one"),
        ((a, p, n), {"neg_mask": bad_mask}, "neg_mask must have shape"),
        ((a, p, n), {"pos_mask": bad_mask[:3]}, "pos_mask must have shape"),
        ((a, p, n), {"pos_mask": bad_mask.int()}, "pos_mask must be a bool"),
        ((a, nan_p, n), {}, "positive contains NaN"),
        ((inf_a, p, n), {}, "anchor contains NaN or inf"),
        ((a.long(), p, n), {}, "anchor must be a floating"),
    ]
    for args, kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            loss(*args, **kwargs)


# ------------------------------------------------------------------ DDP


def test_two_gloo_ranks_match_the_single_process_loss_and_gradients(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # both ranks on loopback: gloo otherwise picks the host interface, which a busy CI box
    # (or one with several interfaces) can make abort the rendezvous
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")

    from tests._ddp_loss_worker import run_rank  # spawned children import it by this name

    world = 2
    a, p, n = random_batch(9, b=6, p=2, k=3, d=8)
    # The same mask pattern on each rank keeps per-rank valid counts equal (see module docstring).
    pos_mask = torch.ones(6, 2, dtype=torch.bool)
    neg_mask = torch.ones(6, 3, dtype=torch.bool)
    pos_mask[[1, 4], 1] = False
    neg_mask[[0, 3], 2] = False
    hparams = {name: {} for name in ALL_NAMES}
    for name in ("circle", "circle_ranking", "circle_softplus_ranking"):
        hparams[name] = {"gamma": 4.0}  # gamma 64 saturates at random inputs
    torch.save({"anchor": a, "positive": p, "negative": n, "pos_mask": pos_mask, "neg_mask": neg_mask,
                "losses": hparams}, tmp_path / "data.pt")
    mp.spawn(run_rank, args=(world, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for name in ALL_NAMES:
        inputs = [x.clone().requires_grad_(True) for x in (a, p, n)]
        single = build_loss(name, **hparams[name])(*inputs, pos_mask=pos_mask, neg_mask=neg_mask)
        single.loss.backward()
        mean_rank_loss = sum(float(r[name]["loss"]) for r in ranks) / world
        close(mean_rank_loss, single.loss, tol=1e-9)
        for i, x in enumerate(inputs):
            ddp_grad = torch.cat([r[name]["grads"][i] for r in ranks])
            assert torch.allclose(ddp_grad, x.grad, atol=1e-10), (name, i)
        assert inputs[0].grad.abs().sum() > 0 and inputs[1].grad.abs().sum() > 0  # not a trivial match
    for r in ranks:
        assert r["uneven_error"] is not None and "same positive shape" in r["uneven_error"]
