"""Device and dtype plumbing shared by every model-running stage.

Model outputs may live on a GPU and in bf16/fp16; NumPy and Arrow need host memory and a dtype
NumPy has (it has no bfloat16). `to_host` is the one way results leave the model."""
from __future__ import annotations

import numpy as np
import torch

_HOST_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A detached host NumPy copy of `t` (bf16/fp16 become fp32 unless `dtype` says otherwise)."""
    t = t.detach()
    target = dtype or _HOST_DTYPES.get(t.dtype, t.dtype)
    return t.to(device="cpu", dtype=target).numpy()


def pick_device(use_gpu: bool = True, index: int = 0) -> torch.device:
    return torch.device("cuda", index) if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision where it belongs (matmuls on the accelerator); a no-op on CPU or fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type != "cpu")
