"""NearIDModel: embeddings, scores, and the safetensors-only save/load format (local and S3)."""
from __future__ import annotations

import json
import os

import pytest
import s3fs
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionModel

from nearid.backbones.core import Backbone, siglip_processor, tiny_siglip_config
from nearid.model import NearIDModel, score_pairs


def colour_images() -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), c) for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]] + [
        Image.new("L", (20, 60), 90)
    ]


def trained_looking(model: NearIDModel, seed: int = 7) -> NearIDModel:
    """Perturb the head so a round trip cannot pass by reloading the pretrained head."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.head.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.fixture()
def model() -> NearIDModel:
    return trained_looking(NearIDModel.from_backbone("tiny-random"))


def test_from_backbone_equals_frozen_siglip_readout():
    fresh = NearIDModel.from_backbone("tiny-random")
    pixels = fresh.backbone.preprocess(colour_images())
    expected = F.normalize(fresh.backbone.readouts(pixels)["map"], dim=-1)
    torch.testing.assert_close(fresh.embed(colour_images()), expected, atol=1e-5, rtol=0)


def test_embed_and_score(model):
    emb = model.embed(colour_images(), batch_size=3)  # two batches
    assert emb.shape == (4, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    tokens = model.backbone.tokens(model.backbone.preprocess(colour_images()))
    torch.testing.assert_close(model.embed_tokens(tokens), emb, atol=1e-5, rtol=0)
    a, b = colour_images()[:2], colour_images()[1:3]
    torch.testing.assert_close(model.score(a, b), (emb[:2] * emb[1:3]).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.score(a, a), torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="equal lengths"):
        model.score(a, b[:1])


def test_embed_tokens_is_differentiable(model):
    tokens = torch.randn(2, 64, 64)
    model.embed_tokens(tokens).sum().backward()
    assert model.head.probe.grad is not None and model.head.probe.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path, metrics={"ssr": 99.17, "pa": 99.71})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                          "protocol.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["backbone"] == {
        "name": "tiny-random", "kind": "siglip", "weights_included": False, "seed": 0, "tiny_overrides": {},
        "hidden_size": 64, "image_size": 64, "num_tokens": 64,
        "identity": {"name": "tiny-random", "seed": 0, "tiny": {}},   # BackboneConfig.identity()
    }
    assert config["head"] == {"hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
                              "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == {f"head.{k}" for k in model.head.state_dict()}  # backbone rebuilt by name
    card = (tmp_path / "README.md").read_text()
    assert "| ssr | 99.17 |" in card and "tiny-random" in card and "from_pretrained" in card
    loaded = NearIDModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.embed(colour_images()), model.embed(colour_images()))


def test_tiny_overrides_and_seed_survive(tmp_path):
    original = trained_looking(NearIDModel.from_backbone(
        "tiny-random", tiny_overrides={"hidden_size": 32, "intermediate_size": 48}, seed=3))
    original.save_pretrained(tmp_path)
    loaded = NearIDModel.from_pretrained(tmp_path)
    assert (loaded.backbone.seed, loaded.backbone.hidden_size) == (3, 32)
    assert torch.equal(loaded.embed(colour_images()), original.embed(colour_images()))


def test_unnamed_backbone_is_saved_with_weights(tmp_path):
    torch.manual_seed(11)
    config = tiny_siglip_config(hidden_size=32, image_size=32)
    custom = Backbone(SiglipVisionModel(config), "siglip", siglip_processor(32), name="my-finetune")
    original = NearIDModel(custom, trained_looking(NearIDModel.from_backbone("tiny-random",
                           tiny_overrides={"hidden_size": 32})).head)
    with pytest.raises(ValueError, match="save_backbone"):
        original.save_pretrained(tmp_path / "no", save_backbone=False)
    original.save_pretrained(tmp_path / "yes")
    keys = load_file(tmp_path / "yes" / "model.safetensors").keys()
    assert "backbone.embeddings.patch_embedding.weight" in keys and "head.probe" in keys
    loaded = NearIDModel.from_pretrained(tmp_path / "yes")
    assert torch.equal(loaded.embed(colour_images()), original.embed(colour_images()))


def test_clip_backbone_gets_fresh_head_and_round_trips(tmp_path):
    clip_dir = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37)).save_pretrained(clip_dir)
    original = NearIDModel.from_backbone(str(clip_dir))
    assert original.head.dims()["num_heads"] == 2 and original.head.dims()["hidden_act"] == "quick_gelu"
    original.save_pretrained(tmp_path / "model")
    loaded = NearIDModel.from_pretrained(tmp_path / "model")
    assert loaded.backbone.kind == "clip"
    assert torch.equal(loaded.embed(colour_images()), original.embed(colour_images()))


def test_refuses_pickle_files(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="refuses pickle-based file.*pytorch_model.bin"):
        NearIDModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["head.probe"]
    tensors["head.extra_scale"] = torch.ones(3)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"missing tensors \['head.probe'\].*unexpected tensors \['head.extra_scale'\]"):
        NearIDModel.from_pretrained(tmp_path)


def test_wrong_shape_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["head.mlp.fc1.bias"] = torch.zeros(7)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"head.mlp.fc1.bias \[7\] != \[128\]"):
        NearIDModel.from_pretrained(tmp_path)


def test_missing_config_names_path(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        NearIDModel.from_pretrained(tmp_path)


def test_load_in_bfloat16(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = NearIDModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.head.probe.dtype == torch.bfloat16 and loaded.backbone.dtype == torch.bfloat16
    emb = loaded.embed(colour_images())
    torch.testing.assert_close(emb, model.embed(colour_images()), atol=0.05, rtol=0)


def test_score_pairs_from_files(model, tmp_path):
    paths = []
    for i, image in enumerate(colour_images()):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    pairs = [(paths[0], paths[1]), (paths[0], paths[0]), (paths[2], paths[3])]
    scores = score_pairs(model, pairs, batch_size=2)
    emb = model.embed(colour_images())
    expected = [float(emb[0] @ emb[1]), 1.0, float(emb[2] @ emb[3])]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert score_pairs(model, []) == []


def test_s3_round_trip(model, tmp_path, s3_server):
    endpoint, bucket = s3_server
    options = {"endpoint_url": endpoint, "key": os.environ["AWS_ACCESS_KEY_ID"],
               "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    local = model.save_pretrained(tmp_path / "local", metrics={"ssr": 50.0})
    fs = s3fs.S3FileSystem(**options)
    for file in local.iterdir():
        fs.put_file(str(file), f"{bucket}/models/m1/{file.name}")
    loaded = NearIDModel.from_pretrained(f"s3://{bucket}/models/m1", storage_options=options,
                                         cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "s3" / bucket / "models" / "m1" / "config.json").is_file()
    assert torch.equal(loaded.embed(colour_images()), model.embed(colour_images()))
    with pytest.raises(FileNotFoundError, match="no objects"):
        NearIDModel.from_pretrained(f"s3://{bucket}/models/absent", storage_options=options,
                                    cache_dir=tmp_path / "cache")
