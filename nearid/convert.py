"""`nearid convert`: any model dir `NearIDModel.from_pretrained` loads (the released checkpoint
layout included) written as a NearID model dir with the backbone's weights."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import NearIDModel, resolve_model_dir
from .released import stored_dtype


def convert_released(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a NearID model dir (`NearIDModel.save_pretrained`, backbone weights included) for
    the model at `source` (a released checkpoint, or any dir `from_pretrained` loads).

    `dtype=None` keeps the dtype the source tensors are stored in (fp16 for the release), so the
    converted dir loads to exactly the same weights. Refuses to write into `source` itself.
    """
    local = resolve_model_dir(source, storage_options, cache_dir)
    out_path = Path(out)
    if out_path.exists() and out_path.resolve() == local.resolve():
        raise ValueError(f"{out_path}: the output dir is the source dir; choose another OUT")
    if dtype is None:
        dtype = stored_dtype(local)
    model = NearIDModel.from_pretrained(source, storage_options=storage_options, cache_dir=cache_dir)
    return model.to(dtype=dtype).save_pretrained(out_path, save_backbone=True)


def cli_convert(args) -> int:
    """`nearid convert DIR OUT [--dtype]`: a user mistake is one `error:` line and exit code 2."""
    import sys

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    try:
        out = convert_released(args.source, args.out, dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote NearID model dir {out} (from {args.source})")
    return 0
