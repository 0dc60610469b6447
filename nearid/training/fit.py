"""The fitting core: batch size per worker, steps per epoch, optimizer, schedule, mixed precision
and the train step. Pure torch (no Ray, no storage).

The training loop (`training.loop`: Ray Train workers, Tune trials, in-process runs), the sweep's
report cadence (`tune.sweep.plan_reports`) and the synthetic-world study (`bench/world_study.py`)
all count and take their steps here, so a benchmark number comes from the production step.

`tc` is anything with the recipe's attributes: `nearid.config.TrainConfig` (lr, weight_decay,
warmup_steps, grad_clip, precision, n_positives, fast_head) or the study's `ModelConfig`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def per_worker_batch(batch_size: int, world: int = 1) -> int:
    """Items per worker and step: the global batch split over the workers, at least 2."""
    return max(2, batch_size // max(1, world))


def steps_per_epoch(n_items: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch of n_items (the last partial global batch is dropped)."""
    return max(1, n_items // (per_worker_batch(batch_size, world) * max(1, world)))


def build_optimizer(head: torch.nn.Module, tc, loss_fn: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over the head and the loss's own parameters (SigLIP's learnable scale and bias train
    with the head)."""
    params = [*head.parameters(), *(loss_fn.parameters() if loss_fn is not None else ())]
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, tc, total_steps: int):
    """Linear warm-up (at most half the run), then cosine decay to 0 at `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, min(tc.warmup_steps, total_steps // 2), total_steps)


def amp_dtype(precision: str, use_cuda: bool) -> torch.dtype | None:
    """The autocast dtype: fp16 / bf16 on CUDA ("auto" = fp16), None (fp32) otherwise."""
    if not use_cuda:
        return None
    if precision == "auto":
        return torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def build_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, active for fp16 only (a no-op pass-through otherwise)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def drop_tokens(tokens: torch.Tensor, p: float, keep_prefix: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Token dropout, the augmentation cached tokens still allow: each image [.., T, D] keeps the
    same number of randomly chosen patch tokens (round((T - prefix) * (1 - p)), at least one), in
    their order, plus its `keep_prefix` leading tokens (DINOv2's CLS). p = 0 returns `tokens`."""
    if p <= 0:
        return tokens
    lead, (T, D) = tokens.shape[:-2], tokens.shape[-2:]
    flat = tokens.reshape(-1, T, D)
    n_patch = T - keep_prefix
    keep = max(1, int(round(n_patch * (1.0 - p))))
    scores = torch.rand(flat.shape[0], n_patch, generator=generator).to(flat.device)
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values + keep_prefix
    kept = torch.gather(flat, 1, idx[:, :, None].expand(-1, -1, D))
    return torch.cat([flat[:, :keep_prefix], kept], dim=1).reshape(*lead, keep_prefix + keep, D)


class TrainStep:
    """One optimizer step: forward under autocast, loss, zero_grad, scaled backward, unscale,
    grad-norm clip, scaler step/update, schedule step.

    `net` is what runs forward (the head, or its DDP wrapper); the grad norm is clipped over
    `clip_params` (the head's parameters). The tokens of a batch [b, m, T, D] are slot 0 = anchor,
    then `n_positives` positives, then the distractors; `token_dropout` > 0 drops that share of
    each image's patch tokens (`drop_tokens`, the first `keep_prefix` tokens always kept)."""

    def __init__(self, net, loss_fn, opt, sched, scaler, *, clip_params: Iterable[torch.nn.Parameter],
                 grad_clip: float, n_positives: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, fast: bool = True, token_dropout: float = 0.0,
                 keep_prefix: int = 0, seed: int = 0):
        self.net, self.loss_fn, self.opt, self.sched, self.scaler = net, loss_fn, opt, sched, scaler
        self.token_dropout, self.keep_prefix = float(token_dropout), int(keep_prefix)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.clip_params, self.grad_clip = list(clip_params), grad_clip
        self.n_positives, self.device, self.dtype, self.fast = n_positives, torch.device(device), dtype, fast

    def __call__(self, tokens: torch.Tensor | Callable[[], torch.Tensor], pos_mask, neg_mask):
        """tokens [b, m, T, D] (or a callable making them, run under autocast: backbone-in-the-loop)
        -> (the loss output, with `.loss` and `.terms`; the grad norm before clipping)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            tok = tokens() if callable(tokens) else tokens
            tok = drop_tokens(tok, self.token_dropout, self.keep_prefix, self.generator)
            b, m = tok.shape[:2]
            emb = self.net(tok.reshape(b * m, *tok.shape[2:]), fast=self.fast).float().reshape(b, m, -1)
        P = self.n_positives
        out = self.loss_fn(emb[:, 0], emb[:, 1:1 + P], emb[:, 1 + P:],
                           pos_mask=torch.as_tensor(pos_mask, device=self.device),
                           neg_mask=torch.as_tensor(neg_mask, device=self.device))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return out, gnorm
