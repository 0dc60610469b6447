"""Tiny random-weight diffusers pipelines built from component configs (no download).

They run the real diffusers pipeline classes end to end (tokenizers, text encoders, VAE,
UNet/transformer, scheduler) in well under a second at 64x64, so tests and benchmarks exercise
exactly the code path the real checkpoints take. Weights are random but seeded: two builds in
different processes are identical. Images must be multiples of 4 pixels (2-block VAE =
scale factor 2; FLUX packs 2x2 latents on top).

Builders are cached per process (functools.lru_cache): every caller gets the SAME pipeline
object, so do not mutate it beyond `.to(device)`.
"""

from __future__ import annotations

import functools
import string
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlInpaintPipeline,
    FluxFillPipeline,
    FluxTransformer2DModel,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SEED = 0
CLIP_MAX_LENGTH = 77  # the pipelines pad prompts to this; a smaller value overflows position ids
T5_MAX_LENGTH = 32  # FLUX pads T5 prompts to max_sequence_length; keep the tiny model's short


def _seeded(build: Callable[[], torch.nn.Module], offset: int) -> torch.nn.Module:
    """Build a module under a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + offset)
        module = build()
    return module.eval()


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP tokenizer with one token per byte (plus end-of-word forms), no merges.

    Built in memory from the GPT-2 byte alphabet, so any prompt tokenizes without a vocab file.
    Ids: 0..255 bytes, 256..511 bytes + "</w>", 512 <|startoftext|>, 513 <|endoftext|>.
    """
    alphabet = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """Character-level T5 (Unigram) tokenizer over printable ASCII; <pad>=0, </s>=1, <unk>=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    # Two blocks -> scale factor 2: a 64x64 image becomes a 32x32 latent.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        force_upcast=False,  # already fp32; True makes SDXL re-cast (and warn) on every encode
        **extra,
    )


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


@functools.lru_cache(maxsize=None)
def tiny_sd_inpaint() -> StableDiffusionInpaintPipeline:
    """SD-1.5-style inpainting pipeline (UNet in_channels = 4 latent + 1 mask + 4 masked image)."""
    tokenizer = tiny_clip_tokenizer()
    text_encoder = _seeded(lambda: CLIPTextModel(_clip_text_config(tokenizer, hidden=32)), 1)
    unet = _seeded(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=9,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        2,
    )
    vae = _seeded(_tiny_vae, 3)
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@functools.lru_cache(maxsize=None)
def tiny_sdxl_inpaint() -> StableDiffusionXLInpaintPipeline:
    """SDXL-style inpainting pipeline: two CLIP text encoders (the second with projection),
    a UNet with SDXL's text+time added conditioning and 9 input channels."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder = _seeded(lambda: CLIPTextModel(_clip_text_config(tokenizer, hidden=32)), 11)
    text_encoder_2 = _seeded(
        lambda: CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, hidden=32, projection=32)), 12
    )
    time_embed_dim = 8
    # add_time_ids = original size (2) + crop top-left (2) + target size (2), each embedded to
    # time_embed_dim, concatenated with the pooled text embedding (projection dim 32).
    unet = _seeded(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=9,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=64,  # both encoders' hidden states concatenated: 32 + 32
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        ),
        13,
    )
    vae = _seeded(_tiny_vae, 14)
    return StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_ddim(),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _flux_components(transformer_in: int, transformer_out: int, offset: int) -> dict:
    """Shared tiny FLUX parts: CLIP (pooled) + T5 (sequence) encoders, VAE, flow-matching scheduler."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder = _seeded(lambda: CLIPTextModel(_clip_text_config(tokenizer, hidden=32)), offset + 1)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    text_encoder_2 = _seeded(lambda: T5EncoderModel(t5_config), offset + 2)
    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=transformer_in,
            out_channels=transformer_out,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP hidden size
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
        offset + 3,
    )
    vae = _seeded(lambda: _tiny_vae(shift_factor=0.0, scaling_factor=1.0), offset + 4)
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@functools.lru_cache(maxsize=None)
def tiny_flux_fill() -> FluxFillPipeline:
    """FLUX.1-Fill-style pipeline. Transformer input = packed noise latents (4 ch x 2x2) +
    packed masked-image latents (16) + the mask folded to latent resolution (2x2 VAE pixels x
    2x2 packing = 16)."""
    latent_packed = 4 * 4
    mask_packed = (2 * 2) * 4
    return FluxFillPipeline(**_flux_components(2 * latent_packed + mask_packed, latent_packed, 20))


@functools.lru_cache(maxsize=None)
def tiny_flux_control_inpaint() -> FluxControlInpaintPipeline:
    """FLUX-Canny-style control inpainting: transformer input = packed latents + packed control latents."""
    latent_packed = 4 * 4
    return FluxControlInpaintPipeline(**_flux_components(2 * latent_packed, latent_packed, 30))


# kind -> builder, for build_backend(kind, tiny=True)
TINY_BUILDERS: dict[str, Callable[[], object]] = {
    "sd_inpaint": tiny_sd_inpaint,
    "sdxl_inpaint": tiny_sdxl_inpaint,
    "flux_fill": tiny_flux_fill,
    "flux_canny": tiny_flux_control_inpaint,
}
