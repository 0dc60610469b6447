"""SigLIP's multihead attention pooling (MAP) head with an exact single-query fast path.

`MAPHead` subclasses transformers' `SiglipMultiheadAttentionPoolingHead`, so parameter
names and shapes are those of SigLIP checkpoints (`probe`, `attention.in_proj_*`,
`attention.out_proj.*`, `layernorm.*`, `mlp.fc1.*`, `mlp.fc2.*`).

Why a fast path: the head has one query (the probe). The standard forward projects all T
tokens to keys and values (2*T*D^2 multiply-adds per image). With one query,
    score_{h,t} = q_h . (W_k,h x_t + b_k,h) / sqrt(d_h) = x_t . u_h + const,
    u_h = W_k,h^T q_h / sqrt(d_h),
and the constant (from the key bias) cancels in the softmax. Because the attention weights
sum to one, sum_t a_{h,t} (W_v,h x_t + b_v,h) = W_v,h (sum_t a_{h,t} x_t) + b_v,h, so the
value projection moves after pooling. Scores and pooling cost O(T*D*H) per image; the
remaining projections are O(H*D*d_h) = O(D^2) once per image instead of per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead


class MAPHead(SiglipMultiheadAttentionPoolingHead):
    """Attention-pooling head: tokens [B, T, D] -> embedding [B, D] (not normalised)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_attention_heads}"
            )
        super().__init__(config)
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads
        self.intermediate_size: int = config.intermediate_size
        self.layer_norm_eps: float = config.layer_norm_eps
        self.hidden_act: str = config.hidden_act

    @classmethod
    def from_config(
        cls,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> "MAPHead":
        """A randomly initialised head with the given dimensions."""
        config = SiglipVisionConfig(
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            layer_norm_eps=layer_norm_eps,
            hidden_act=hidden_act,
        )
        return cls(config)

    @classmethod
    def from_backbone(cls, backbone) -> "MAPHead":
        """A float32 head initialised from a SigLIP backbone's pretrained MAP head."""
        config = backbone.model.config
        head = cls.from_config(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
        )
        head.load_state_dict(backbone.map_head_state_dict())
        return head

    def dims(self) -> dict:
        """The arguments of `from_config` that rebuild this head's shape."""
        return dict(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
        )

    def forward(self, tokens: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """tokens [B, T, D] -> [B, D]. `fast` selects the single-query path (same function)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"tokens must be [B, T, {self.hidden_size}], got {list(tokens.shape)}")
        if not fast:
            return super().forward(tokens)
        pooled = self._attend_single_query(tokens)
        hidden = pooled + self.mlp(self.layernorm(pooled))
        return hidden

    def _attend_single_query(self, tokens: torch.Tensor) -> torch.Tensor:
        attention = self.attention
        dim, heads = self.hidden_size, self.num_heads
        head_dim = dim // heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3, dim=0)  # each [D, D]
        b_q, _b_k, b_v = attention.in_proj_bias.chunk(3, dim=0)  # the key bias cancels in softmax
        query = F.linear(self.probe.reshape(dim), w_q, b_q).reshape(heads, head_dim)
        # u_h = W_k,h^T q_h / sqrt(d_h): one D-vector per head, [H, D].
        key_probe = torch.einsum("hd,hdD->hD", query, w_k.reshape(heads, head_dim, dim)) / math.sqrt(head_dim)
        scores = torch.einsum("btD,hD->bht", tokens, key_probe)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(tokens.dtype)
        pooled_tokens = torch.einsum("bht,btD->bhD", weights, tokens)  # [B, H, D]
        values = torch.einsum("bhD,hdD->bhd", pooled_tokens, w_v.reshape(heads, head_dim, dim))
        values = values + b_v.reshape(heads, head_dim)
        return attention.out_proj(values.reshape(tokens.shape[0], dim))
