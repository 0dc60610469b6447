"""Backbones: tiny-random determinism, token shapes, readouts, and loading CLIP/DINOv2/SigLIP dirs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
)

from nearid.backbones.core import TINY_DEFAULTS, tiny_siglip_config

from nearid.backbones.dispatch import load_backbone

HEAD_KEYS = {
    "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
    "attention.out_proj.bias", "layernorm.weight", "layernorm.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}


def images(n: int = 2) -> list[Image.Image]:
    """Small images of different sizes and modes (the processor must cope with all)."""
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        array = (torch.rand(40 + 7 * i, 50, 3) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(array, "RGB"))
    out[-1] = out[-1].convert("L") if n > 1 else out[-1]
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random")


def test_tiny_random_is_deterministic_per_seed_and_keeps_global_rng():
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    a = load_backbone("tiny-random")
    assert torch.equal(torch.rand(3), expected_draw), "loading must not consume the caller's RNG"
    b = load_backbone("tiny-random", seed=0)
    c = load_backbone("tiny-random", seed=1)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not torch.equal(a.model.head.probe, c.model.head.probe)


def test_tiny_config_and_overrides():
    config = tiny_siglip_config(hidden_size=32)
    assert config.hidden_size == 32 and config.num_hidden_layers == TINY_DEFAULTS["num_hidden_layers"]
    with pytest.raises(ValueError, match="hidden_sise"):
        tiny_siglip_config(hidden_sise=32)
    small = load_backbone("tiny-random", tiny_overrides={"image_size": 32, "hidden_size": 32})
    assert (small.image_size, small.num_tokens, small.hidden_size) == (32, 16, 32)


def test_frozen_and_eval(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert tiny.training and not tiny.model.training, "train() must leave the frozen model in eval"
    tiny.eval()


def test_preprocess_known_values(tiny):
    gray = Image.new("L", (30, 20), 128)  # any mode -> RGB, resized to 64x64, mean = std = 0.5
    pixels = tiny.preprocess([gray])
    assert pixels.shape == (1, 3, 64, 64)
    torch.testing.assert_close(pixels, torch.full_like(pixels, (128 / 255 - 0.5) / 0.5))


def test_tokens_shape_and_post_layernorm(tiny):
    pixels = tiny.preprocess(images(2))
    tokens = tiny.tokens(pixels)
    assert tokens.shape == (2, 64, 64) == (2, tiny.num_tokens, tiny.hidden_size)
    assert (tiny.kind, tiny.has_map_head, tiny.num_prefix_tokens) == ("siglip", True, 0)
    # The post_layernorm has weight 1, bias 0 at init: every token has mean 0 and variance 1.
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3, rtol=0)
    with torch.no_grad():
        reference = tiny.model(pixel_values=pixels)
    torch.testing.assert_close(tokens, reference.last_hidden_state)


def test_readouts_map_and_mean(tiny):
    pixels = tiny.preprocess(images(2))
    readouts = tiny.readouts(pixels)
    assert set(readouts) == {"map", "mean"}
    with torch.no_grad():
        reference = tiny.model(pixel_values=pixels)
    torch.testing.assert_close(readouts["map"], reference.pooler_output)
    tokens = reference.last_hidden_state
    hand_mean = torch.stack([sum(tokens[b, t] for t in range(64)) / 64 for b in range(2)])
    torch.testing.assert_close(readouts["mean"], hand_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.readouts(tokens=tokens)["map"], readouts["map"])


def test_map_head_state_dict_is_a_copy(tiny):
    state = tiny.map_head_state_dict()
    assert set(state) == HEAD_KEYS
    assert state["probe"].shape == (1, 1, 64)
    state["probe"].add_(1.0)
    assert not torch.equal(state["probe"], tiny.model.head.probe)


def test_bfloat16_backbone():
    backbone = load_backbone("tiny-random", dtype=torch.bfloat16)
    tokens = backbone.tokens(backbone.preprocess(images(1)))
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (1, 64, 64)
    assert backbone.readouts(tokens=tokens)["map"].dtype == torch.bfloat16


def test_full_siglip_checkpoint_loads_vision_tower(tmp_path):
    config = SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=37),
    )
    torch.manual_seed(0)
    full = SiglipModel(config).eval()
    full.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert (backbone.kind, backbone.image_size, backbone.num_tokens) == ("siglip", 32, 16)
    pixels = backbone.preprocess(images(2))
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(backbone.readouts(pixels)["map"], expected)


def test_tiny_clip_dir(tmp_path):
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    # A processor saved with the model must be used (mean 0, std 1 -> pixels in [0, 1]).
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=[0.0] * 3, image_std=[1.0] * 3).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert (backbone.kind, backbone.has_map_head, backbone.num_tokens) == ("clip", False, 17)
    pixels = backbone.preprocess([Image.new("RGB", (40, 40), (255, 0, 0))])
    torch.testing.assert_close(pixels[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    pixels = backbone.preprocess(images(2))
    readouts = backbone.readouts(pixels)
    assert set(readouts) == {"mean", "cls"}
    with torch.no_grad():
        out = backbone.model(pixel_values=pixels)
        normed = backbone.model.post_layernorm(out.last_hidden_state)
    torch.testing.assert_close(readouts["cls"], out.pooler_output)  # CLIP's pooled = LN(CLS)
    torch.testing.assert_close(readouts["mean"], normed[:, 1:].mean(1))
    torch.testing.assert_close(backbone.tokens(pixels), normed)


def test_tiny_dinov2_dir_with_default_processor(tmp_path):
    config = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, mlp_ratio=2)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    # No processor saved: DINOv2's usual resize-256 / crop-224 -> 16x16 patches + CLS.
    assert isinstance(backbone.image_processor, BitImageProcessorPil)
    assert (backbone.kind, backbone.image_size, backbone.num_tokens) == ("dinov2", 224, 257)
    pixels = backbone.preprocess(images(2))
    readouts = backbone.readouts(pixels)
    assert set(readouts) == {"mean", "cls"}
    with torch.no_grad():
        out = backbone.model(pixel_values=pixels)
    torch.testing.assert_close(readouts["cls"], out.pooler_output)
    torch.testing.assert_close(readouts["mean"], out.last_hidden_state[:, 1:].mean(1))


def test_unknown_model_type_is_named(tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit'"):
        load_backbone(str(tmp_path))
