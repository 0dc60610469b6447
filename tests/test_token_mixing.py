"""tiny-random with token_mixing=false: every token depends on its own patch only."""
import torch

from nearid.backbones.dispatch import load_backbone
from nearid.model import NearIDModel

TINY = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64}


def _tokens_after_patch_change(token_mixing: bool):
    bb = load_backbone("tiny-random", tiny_overrides={**TINY, "token_mixing": token_mixing}, seed=0)
    pix = torch.randn(1, 3, 16, 16)
    changed = pix.clone()
    changed[..., :4, :4] += 1.0          # patch 0 only
    return bb.tokens(pix)[0], bb.tokens(changed)[0]


def test_local_tokens_ignore_other_patches():
    a, b = _tokens_after_patch_change(False)
    assert not torch.allclose(a[0], b[0])                 # its own token changes
    assert torch.allclose(a[1:], b[1:], atol=1e-6)        # no other token does


def test_mixing_tokens_see_other_patches():
    a, b = _tokens_after_patch_change(True)
    assert not torch.allclose(a[1:], b[1:], atol=1e-4)


def test_option_survives_save_and_load(tmp_path):
    m = NearIDModel.from_backbone("tiny-random", tiny_overrides={**TINY, "token_mixing": False})
    m.save_pretrained(tmp_path)
    back = NearIDModel.from_pretrained(tmp_path)
    pix = torch.randn(2, 3, 16, 16)
    assert torch.allclose(back.backbone.tokens(pix), m.backbone.tokens(pix))
    assert back.backbone.tiny_overrides["token_mixing"] is False
