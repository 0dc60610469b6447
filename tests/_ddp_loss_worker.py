"""One rank of the 2-process gloo test in test_losses.py (spawned; imported as `tests._ddp_loss_worker`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nearid.losses import build_loss


def run_rank(rank: int, world_size: int, init_file: str, data_file: str, out_dir: str) -> None:
    """Compute every loss on this rank's slice of the saved batch and save loss + input grads."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        data = torch.load(data_file)
        per_rank = data["anchor"].shape[0] // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        results: dict[str, object] = {}
        for name, hparams in data["losses"].items():
            inputs = [data[k][rows].clone().requires_grad_(True) for k in ("anchor", "positive", "negative")]
            out = build_loss(name, **hparams)(*inputs, pos_mask=data["pos_mask"][rows],
                                              neg_mask=data["neg_mask"][rows])
            # DDP averages gradients over ranks: the same as backpropagating loss / world_size.
            (out.loss / world_size).backward()
            results[name] = {"loss": out.loss.detach(), "grads": [x.grad for x in inputs]}
        # Unequal batch sizes across ranks must be refused on every rank, not hang or mis-index.
        uneven = rank + 1
        try:
            build_loss("nearid")(data["anchor"][:uneven], data["positive"][:uneven], data["negative"][:uneven])
            results["uneven_error"] = None
        except ValueError as err:
            results["uneven_error"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears its pair down while the other still uses it
    finally:
        dist.destroy_process_group()
    # The results are on disk; skip interpreter finalization, where gloo's C++ teardown can
    # abort the process ("terminate called without an active exception", about 1 exit in 4
    # on a loaded 2-core box, even after destroy_process_group and a barrier).
    sys.stderr.flush()
    os._exit(0)
