"""Token dropout (`training.fit.drop_tokens`, `train.token_dropout`): the augmentation on cached tokens."""
import pytest
import torch

from nearid.training.fit import drop_tokens


def _numbered(b: int, m: int, T: int, D: int = 3) -> torch.Tensor:
    """Token t of every image holds the value t in all D channels, so kept positions can be read back."""
    return torch.arange(T, dtype=torch.float32)[None, None, :, None].expand(b, m, T, D).clone()


def test_p_zero_returns_the_same_tensor():
    t = torch.randn(2, 3, 5, 4)
    assert drop_tokens(t, 0.0) is t


def test_keeps_the_prefix_and_an_ordered_subset_of_patches():
    t = _numbered(4, 6, 17)            # 1 CLS + 16 patches
    out = drop_tokens(t, 0.5, keep_prefix=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 6, 1 + 8, 3)
    pos = out[..., 0].reshape(-1, 9)
    assert (pos[:, 0] == 0).all()                       # the CLS token stays first
    patches = pos[:, 1:]
    assert (patches >= 1).all() and (patches <= 16).all()
    assert (patches[:, 1:] > patches[:, :-1]).all()     # distinct and in their original order
    assert (out[..., 0:1] == out).all()                 # whole tokens are moved, channels together
    # images draw their own subsets
    assert len({tuple(r.tolist()) for r in patches}) > 1


def test_seeded_generator_is_deterministic_and_at_least_one_patch_survives():
    t = _numbered(2, 2, 5)
    a = drop_tokens(t, 0.99, generator=torch.Generator().manual_seed(3))
    b = drop_tokens(t, 0.99, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 2, 1, 3) and torch.equal(a, b)


def test_config_rejects_a_dropout_of_one():
    from nearid.config import TrainConfig

    assert TrainConfig(token_dropout=0.5).token_dropout == 0.5
    with pytest.raises(ValueError, match="token_dropout"):
        TrainConfig(token_dropout=1.0)
