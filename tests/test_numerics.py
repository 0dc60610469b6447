"""Portable numerics (nearid.numerics): pinned kernel choices reach every process, and a pooled
embedding does not depend on the batch it was computed in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nearid import numerics

ROOT = Path(__file__).resolve().parents[1]
needs_avx2 = pytest.mark.skipif(not numerics._cpu_has_avx2(), reason="portable pins apply to x86-64 with AVX2")


def _child_env(**extra) -> dict:
    """`import nearid` in a fresh interpreter; what it sees of the pinned variables."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.ENV_KEYS}
    env.update(extra)
    code = ("import json, os, nearid, torch; torch.zeros(2).sum(); "
            "print(json.dumps({'env': {k: os.environ.get(k) for k in nearid.numerics.PORTABLE_ENV}, "
            "'aten': torch.backends.cpu.get_cpu_capability()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_avx2
def test_import_pins_portable_kernels_before_torch_dispatches():
    seen = _child_env()
    assert seen["env"] == numerics.PORTABLE_ENV
    assert seen["aten"] == "AVX2"


@needs_avx2
def test_user_settings_and_native_mode_are_respected():
    assert _child_env(ATEN_CPU_CAPABILITY="default")["aten"] == "DEFAULT"
    native = _child_env(NEARID_NUMERICS="native")
    assert native["env"] == {k: None for k in numerics.PORTABLE_ENV}
    with pytest.raises(AssertionError, match="NEARID_NUMERICS"):
        _child_env(NEARID_NUMERICS="fast")


@needs_avx2
@pytest.mark.timeout(180)
def test_ray_workers_run_the_pinned_kernels(ray_local):
    @ray_local.remote(num_cpus=0.25)
    def capability():
        import torch

        torch.zeros(2).sum()
        return torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR")

    assert ray_local.get(capability.remote(), timeout=120) == ("AVX2", "AVX2")


def test_pooled_embeddings_do_not_depend_on_their_batch():
    """A row's embedding is the same alone, in a batch of 37 or at another position: without
    `rowwise` the MAP head's small-row GEMMs differ in the last bits (measured on AVX2 and AVX-512)."""
    from nearid.model import NearIDModel

    torch.set_num_threads(1)
    model = NearIDModel.from_backbone("tiny-random", tiny_overrides=dict(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
        intermediate_size=128))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, 64, generator=g)
    perm = torch.randperm(50, generator=g)
    with torch.no_grad():
        full = model.embed_tokens(x)
        assert torch.equal(full[:37], model.embed_tokens(x[:37]))
        assert torch.equal(full[3:4], model.embed_tokens(x[3:4]))
        assert torch.equal(full[perm], model.embed_tokens(x[perm]))
        readout = model.backbone.readouts(tokens=x)["map"]
        assert torch.equal(readout[perm], model.backbone.readouts(tokens=x[perm])["map"])
    # with autograd on (training) the head runs batched: the same values to float tolerance
    assert torch.allclose(model.embed_tokens(x).detach(), full, atol=1e-5)


def test_rowwise_is_the_identity_for_tiny_batches_and_keeps_shapes():
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return t * 2

    x = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(numerics.rowwise(fn, x), x * 2) and calls == [1, 1, 1]
    assert torch.equal(numerics.rowwise(fn, x[:1]), x[:1] * 2)


def test_fixed_threads_restores_the_count():
    before = torch.get_num_threads()
    with numerics.fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
