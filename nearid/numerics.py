"""Bit-reproducible CPU numerics: the same config and seed give the same bytes on any x86-64 machine.

Two machines running the same code differ in the kernels their CPUs dispatch to: ATen picks its
vectorised kernels (softmax, layer norm, reductions) by the widest ISA it finds (AVX-512 here,
AVX2 on most laptops and AMD servers), and MKL picks a GEMM code path per microarchitecture. Each
choice sums in another order, so a training step differs in the last bits, and 400 steps amplify
that into another head (measured: `tests/test_numerics.py`; the demo printed 85.19 SSR on one
machine and 86.30 on another from the same config and seed). Thread counts change reductions too.

`pin()` (run when `nearid` is imported, before any torch op can fix the dispatch) sets, unless
already set or `NEARID_NUMERICS=native`:
  ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2, ONEDNN_MAX_CPU_ISA=AVX2
on x86-64 CPUs that have AVX2 (every x86 server and laptop since 2013-2015). The variables travel
to Ray workers (`raytools.WORKER_ENV`). Cost on an AVX-512 CPU: DINOv2-S forward ~1.3-1.6x slower
(README performance section); GPUs are unaffected (their determinism is cuBLAS/cuDNN's business).
A GEMM with few rows (the MAP head pools one query per image, so its matrices have one row per
image) takes another kernel for another row count and sums a row by its position in the batch,
so a head's output for an image depends on which images share its batch: the order Ray Data
delivers rows in. `rowwise` runs such a function one image at a time on the CPU (on CUDA it runs
batched). Thread counts are fixed by the config (`train.threads` or `train.cpus_per_worker`,
`extract.cpus_per_actor`) and by `fixed_threads` for in-driver evaluation, never by the machine's
core count.
"""
from __future__ import annotations

import contextlib
import os
import platform

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODE_VAR = "NEARID_NUMERICS"     # portable (default) | native
ENV_KEYS = (MODE_VAR, *PORTABLE_ENV)
EVAL_THREADS = 1


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " avx2 " in f" {line.split(':', 1)[1].strip()} "
    except OSError:
        return False
    return False


def mode() -> str:
    value = os.environ.get(MODE_VAR, "portable").strip().lower() or "portable"
    if value not in ("portable", "native"):
        raise ValueError(f"{MODE_VAR}={value!r}: expected 'portable' or 'native'")
    return value


def pin() -> dict[str, str]:
    """Set the portable kernel choices in this process's environment (children inherit them);
    returns what is in force. A variable the user set is kept as it is."""
    if mode() == "portable" and _cpu_has_avx2():
        for key, value in PORTABLE_ENV.items():
            os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in PORTABLE_ENV if k in os.environ}


def describe() -> str:
    """What the numerics of this process are, for run metadata: e.g. `portable (avx2, mkl AVX2)`."""
    env = {k: os.environ.get(k) for k in PORTABLE_ENV}
    if env["ATEN_CPU_CAPABILITY"] and env["MKL_CBWR"]:
        return f"portable (aten {env['ATEN_CPU_CAPABILITY']}, mkl {env['MKL_CBWR']})"
    return f"native ({platform.machine()})"


@contextlib.contextmanager
def fixed_threads(n: int = EVAL_THREADS):
    """torch intra-op threads fixed to n for the block (reductions split by thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rowwise(fn, x):
    """fn(x) for a batch x [B, ...] computed one row at a time on the CPU, each row in a fresh
    (aligned) tensor, so a row's result does not depend on the rows beside it; batched on GPUs."""
    import torch

    if x.device.type != "cpu" or x.shape[0] <= 1:
        return fn(x)
    return torch.cat([fn(x[i:i + 1].clone()) for i in range(x.shape[0])])
