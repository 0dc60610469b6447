"""MAP head: SigLIP-compatible layout, and the single-query fast path equals the standard one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from nearid.backbones.dispatch import load_backbone
from nearid.head import MAPHead


def randomised_head(hidden: int = 64, heads: int = 4, mlp: int = 96, seed: int = 0) -> MAPHead:
    """A head whose every parameter (biases included, notably the key bias) is non-trivial."""
    torch.manual_seed(seed)
    head = MAPHead.from_config(hidden_size=hidden, num_heads=heads, intermediate_size=mlp)
    with torch.no_grad():
        for param in head.parameters():
            # ~1/sqrt(D) scale keeps activations O(1), like a trained head.
            param.copy_(torch.randn_like(param) * hidden**-0.5)
        head.layernorm.weight.add_(1.0)
    return head


def outputs_and_grads(head: MAPHead, tokens: torch.Tensor, fast: bool):
    head.zero_grad()
    tokens = tokens.clone().requires_grad_(True)
    out = head(tokens, fast=fast)
    # A non-symmetric scalar so every output coordinate carries its own gradient.
    # Divided by B like a batch-mean loss, so gradients stay O(1) whatever the batch size.
    weights = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape) / out.shape[0]
    (out * weights).sum().backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in head.named_parameters()}
    return out.detach(), tokens.grad.clone(), grads


def assert_paths_agree(head: MAPHead, tokens: torch.Tensor, atol: float = 1e-5) -> None:
    out_fast, dtok_fast, grads_fast = outputs_and_grads(head, tokens, fast=True)
    out_std, dtok_std, grads_std = outputs_and_grads(head, tokens, fast=False)
    torch.testing.assert_close(out_fast, out_std, atol=atol, rtol=0)
    torch.testing.assert_close(dtok_fast, dtok_std, atol=atol, rtol=0)
    assert set(grads_fast) == set(grads_std)
    for name in grads_std:
        torch.testing.assert_close(grads_fast[name], grads_std[name], atol=atol, rtol=0, msg=name)


def test_layout_matches_siglip_head():
    config = SiglipVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96)
    reference = SiglipMultiheadAttentionPoolingHead(config)
    head = MAPHead.from_config(hidden_size=64, num_heads=4, intermediate_size=96)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert ours["probe"] == (1, 1, 64) and ours["attention.in_proj_weight"] == (192, 64)


def test_so400m_head_parameter_count():
    d, m = 1152, 4304
    by_hand = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    assert by_hand == 15_238_352  # the paper's trainable parameter count
    head = MAPHead.from_config(hidden_size=d, num_heads=16, intermediate_size=m)
    assert sum(p.numel() for p in head.parameters()) == by_hand


def test_single_token_known_answer():
    # With one token the softmax weight is 1: attention = out_proj(W_v x + b_v).
    head = randomised_head()
    x = torch.randn(2, 1, 64)
    w_v = head.attention.in_proj_weight[128:]
    b_v = head.attention.in_proj_bias[128:]
    attended = head.attention.out_proj(x[:, 0] @ w_v.T + b_v)
    ln = head.layernorm
    normed = (attended - attended.mean(-1, keepdim=True)) / torch.sqrt(attended.var(-1, unbiased=False, keepdim=True) + ln.eps)
    mlp_in = normed * ln.weight + ln.bias
    hidden = F.gelu(mlp_in @ head.mlp.fc1.weight.T + head.mlp.fc1.bias, approximate="tanh")
    expected = attended + hidden @ head.mlp.fc2.weight.T + head.mlp.fc2.bias
    torch.testing.assert_close(head(x, fast=True), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(x, fast=False), expected, atol=1e-5, rtol=1e-5)
    # Repeating the same token T times changes nothing (uniform attention over equal tokens).
    torch.testing.assert_close(head(x.expand(2, 9, 64), fast=True), expected, atol=1e-5, rtol=1e-5)


def test_fast_equals_standard_random_tokens():
    head = randomised_head()
    torch.manual_seed(1)
    assert_paths_agree(head, torch.randn(3, 29, 64))


def test_fast_equals_standard_tiny_dims_t256():
    head = randomised_head(seed=3)
    torch.manual_seed(2)
    assert_paths_agree(head, torch.randn(2, 256, 64))


def test_fast_equals_standard_on_tiny_random_tokens():
    backbone = load_backbone("tiny-random")
    torch.manual_seed(4)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    tokens = backbone.tokens(pixels)
    head = MAPHead.from_backbone(backbone)
    assert_paths_agree(head, tokens)
    torch.testing.assert_close(head(tokens).detach(), backbone.readouts(tokens=tokens)["map"], atol=1e-5, rtol=0)


def test_key_bias_gradient_is_zero():
    # The key bias only shifts all scores of a head by a constant: softmax ignores it.
    head = randomised_head()
    _, _, grads = outputs_and_grads(head, torch.randn(2, 11, 64), fast=False)
    key_bias_grad = grads["attention.in_proj_bias"][64:128]
    torch.testing.assert_close(key_bias_grad, torch.zeros(64), atol=1e-5, rtol=0)


def test_state_dict_round_trips_into_siglip_layout():
    backbone = load_backbone("tiny-random")
    head = MAPHead.from_backbone(backbone)
    for key, value in head.state_dict().items():
        assert torch.equal(value, backbone.model.head.state_dict()[key]), key
    with torch.no_grad():
        head.probe.add_(0.5)
    fresh = SiglipMultiheadAttentionPoolingHead(backbone.model.config)
    fresh.load_state_dict(head.state_dict())  # strict: same names and shapes
    tokens = torch.randn(2, 64, 64)
    torch.testing.assert_close(fresh(tokens), head(tokens, fast=False))


def test_bfloat16_fast_path_is_as_accurate_as_standard():
    head = randomised_head()
    tokens = torch.randn(4, 33, 64)
    with torch.no_grad():
        expected = head(tokens, fast=False)
        head16, tokens16 = head.to(torch.bfloat16), tokens.to(torch.bfloat16)
        fast, standard = head16(tokens16, fast=True), head16(tokens16, fast=False)
    assert fast.dtype == torch.bfloat16
    fast_error = (fast.float() - expected).abs().max().item()
    standard_error = (standard.float() - expected).abs().max().item()
    assert fast_error <= 2 * standard_error + 1e-2, (fast_error, standard_error)


def test_rejects_wrong_token_shape():
    head = MAPHead.from_config(hidden_size=64, num_heads=4, intermediate_size=96)
    with pytest.raises(ValueError, match=r"\[B, T, 64\]"):
        head(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="divisible"):
        MAPHead.from_config(hidden_size=66, num_heads=4, intermediate_size=96)
