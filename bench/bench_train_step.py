"""One training step with cached tokens vs backbone-in-the-loop: same head, same loss, same batch,
at the real SigLIP2 so400m dims (random weights: T=729, D=1152). Prints seconds and the ratio.

    .venv/bin/python -m bench.bench_train_step [--items 2] [--backbone so400m-random]
"""
from __future__ import annotations

import argparse
import time

import torch

from nearid.backbones.dispatch import load_backbone
from nearid.head import MAPHead
from nearid.losses import build_loss


def step(head, opt, loss_fn, tokens, b, m):
    emb = head(tokens.reshape(b * m, *tokens.shape[2:])).reshape(b, m, -1)
    out = loss_fn(emb[:, 0], emb[:, 1:3], emb[:, 3:])
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=2, help="batch items (each: anchor + 2 pos + 3 distractors)")
    p.add_argument("--backbone", default="so400m-random")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb = load_backbone(args.backbone)
    print(f"built {args.backbone} in {time.perf_counter() - t0:.1f}s: T={bb.num_tokens}, D={bb.hidden_size}, "
          f"{torch.get_num_threads()} threads")
    head = MAPHead.from_backbone(bb)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    loss_fn = build_loss("nearid")
    b, m = args.items, 6
    pix = torch.randn(b * m, 3, bb.image_size, bb.image_size)
    cached = bb.tokens(pix).reshape(b, m, bb.num_tokens, -1).float()
    times = {"cached tokens": [], "backbone in the loop": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        step(head, opt, loss_fn, cached, b, m)
        times["cached tokens"].append(time.perf_counter() - t)
        t = time.perf_counter()
        tok = bb.tokens(pix).reshape(b, m, bb.num_tokens, -1).float()
        step(head, opt, loss_fn, tok, b, m)
        times["backbone in the loop"].append(time.perf_counter() - t)
    c, f = min(times["cached tokens"]), min(times["backbone in the loop"])
    print(f"| mode | s/step ({b} items = {b * m} images) |\n|---|---|")
    print(f"| cached tokens | {c:.3f} |\n| backbone in the loop | {f:.3f} |")
    print(f"ratio (in-loop / cached): {f / c:.0f}x")


if __name__ == "__main__":
    main()
