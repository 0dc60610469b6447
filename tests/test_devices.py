"""Model outputs leave the device only through `to_host`: a tensor that claims to live off the
host (a subclass whose `.numpy()` raises like a CUDA tensor's) runs through the stage code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nearid.devices import to_host


class OffHost(torch.Tensor):
    """Behaves like a CUDA tensor for NumPy: `.numpy()` raises unless it was moved to the CPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
        to_cpu = func is torch.Tensor.cpu or (func is torch.Tensor.to and (
            "cpu" in [str(a) for a in args[1:]] or str(kwargs.get("device")) == "cpu"))
        if to_cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)   # now a host tensor
        return super().__torch_function__(func, types, args, kwargs)


def test_the_off_host_tensor_behaves_like_cuda():
    t = torch.ones(2, 3).as_subclass(OffHost)
    with pytest.raises(TypeError, match="cuda"):
        t.numpy()
    with pytest.raises(TypeError):
        (t * 2).float().numpy()                      # stays off host through ops
    out = to_host((t * 2).to(torch.bfloat16))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and (out == 2).all()
    assert to_host(torch.ones(2, dtype=torch.float16)).dtype == np.float32


def _off_host(fn):
    return lambda *a, **k: fn(*a, **k).as_subclass(OffHost)


def test_extraction_actor_moves_results_to_host_before_arrow():
    from nearid.config import load_config
    from nearid.stages.extract import Embed

    cfg = load_config(None, ["extract.backbone.name=tiny-random", "extract.readouts=[map, mean]"])
    actor = Embed(cfg.extract.model_dump_json(), write_tokens=True)
    actor.backbone.tokens = _off_host(actor.backbone.tokens)
    size = actor.backbone.image_size
    batch = {"id": np.array(["a", "b"]), "view": np.array([0, 1]), "source": np.array(["positive"] * 2),
             "split": np.array(["test"] * 2), "error": np.array(["", ""]),
             "pixel_values": np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)}
    out = actor(batch)
    assert out.num_rows == 2 and {"emb_map", "emb_mean", "tokens"} <= set(out.column_names)


def test_validation_embeddings_move_to_host():
    from nearid.backbones.core import tiny_siglip_config
    from nearid.head import MAPHead
    from nearid.training.validate import embed_items

    head = MAPHead(tiny_siglip_config(hidden_size=16, num_attention_heads=2, intermediate_size=32))
    head.forward = _off_host(head.forward)
    emb = embed_items(head, torch.randn(3, 2, 5, 16))
    assert isinstance(emb, np.ndarray) and emb.shape == (3, 2, 16)
