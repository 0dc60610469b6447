"""The extraction's storage estimate derives (T, D) without loading weights; it must agree with
the loaded backbone for every family."""
import pytest
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

from nearid.backbones.dispatch import load_backbone
from nearid.config import ExtractConfig
from nearid.stages.extract import token_shape


@pytest.mark.parametrize("family", ["tiny", "clip", "dinov2"])
def test_token_shape_matches_the_loaded_backbone(family, tmp_path):
    if family == "tiny":
        e = ExtractConfig(backbone={"name": "tiny-random", "tiny": {"patch_size": 4, "token_mixing": False}})
        bb = load_backbone("tiny-random", tiny_overrides={"patch_size": 4, "token_mixing": False})
    else:
        if family == "clip":
            model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
        else:
            model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, mlp_ratio=2))
        model.save_pretrained(tmp_path)
        e = ExtractConfig(backbone={"name": str(tmp_path)})
        bb = load_backbone(str(tmp_path))
    assert token_shape(e) == (bb.num_tokens, bb.hidden_size)
