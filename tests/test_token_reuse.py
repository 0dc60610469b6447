"""Backbone identity (issue 32 item 3): the evaluation reuses cached tokens for a trained model only
when the backbone that extracted them is the model's, by identity (name + a random backbone's seed
and dims), not by name: the same name at another resolution gives other tokens."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from nearid.config import BackboneConfig, load_config
from nearid.schema import tensor_column
from nearid.io.storage import Storage


def test_identity_is_the_name_plus_what_changes_a_random_backbones_tokens(tmp_path):
    base = BackboneConfig(name="tiny-random").identity()
    assert base == {"name": "tiny-random", "seed": 0, "tiny": {}}
    assert BackboneConfig(name="tiny-random", tiny={"image_size": 32}).identity() != base   # other resolution
    assert BackboneConfig(name="tiny-random", seed=1).identity() != base
    assert BackboneConfig(name="tiny-random", dtype="bf16").identity() == base              # numerics, not identity
    # a named pretrained backbone: its resolution is in the name, seed and tiny dims do not apply
    assert BackboneConfig(name="dinov2-small@112", seed=3).identity() == {"name": "dinov2-small@112"}
    assert BackboneConfig(name="dinov2-small@112").identity() != BackboneConfig(name="dinov2-small@224").identity()
    # a local checkpoint folder is known by its absolute path, however it is written
    (tmp_path / "ckpt").mkdir()
    rel = BackboneConfig(name=str(tmp_path / "ckpt" / ".." / "ckpt")).identity()
    assert rel == {"name": str((tmp_path / "ckpt").resolve())}


def _root_with_features(tmp_path, tiny: dict):
    """A run root whose features table (with a tokens column) was extracted by tiny-random `tiny`."""
    from nearid.stages.extract import _check_same_scorer

    root = tmp_path / "root"
    cfg = load_config(None, [f"run.root={root}", f"extract.backbone.tiny={tiny}"])
    st = Storage.open(str(root))
    _check_same_scorer(st, "features", cfg.extract)     # what extraction records before its first part
    st.write_table("features", pa.table({"id": ["a"], "view": [0], "source": ["positive"], "split": ["test"],
                                         "tokens": tensor_column(np.zeros((1, 4, 8), np.float16))}),
                   check_keys=False)
    return cfg, st


@pytest.mark.parametrize("features_tiny, reused", [({}, True), ({"image_size": 32}, False)],
                         ids=["same-identity", "same-name-other-resolution"])
def test_tokens_are_reused_only_for_the_models_backbone_identity(tmp_path, features_tiny, reused):
    from nearid.model import NearIDModel
    from nearid.stages.evaluate import _nearid_embeddings, tokens_reusable

    model = NearIDModel.from_backbone("tiny-random")           # 64 px: TINY_DEFAULTS
    model_dir = model.save_pretrained(tmp_path / "model")
    cfg, st = _root_with_features(tmp_path, features_tiny)
    # the config names the same backbone either way: the features' own record decides
    assert cfg.extract.backbone.name == model.backbone.name == "tiny-random"
    loaded = NearIDModel.from_pretrained(str(model_dir))
    assert loaded.backbone.identity() == model.backbone.identity()
    assert tokens_reusable(loaded, st, cfg) is reused
    if not reused:   # it goes to its own extraction, which needs Ray: without one, a clear error
        with pytest.raises(ValueError, match="needs its own extraction"):
            _nearid_embeddings(st, cfg, str(model_dir), None)


def test_scorer_records_written_before_identities_were_kept_still_match(tmp_path):
    from nearid.stages.extract import _check_same_scorer, features_identity

    cfg = load_config(None, [f"run.root={tmp_path}", "extract.backbone.tiny={image_size: 32}"])
    st = Storage.open(str(tmp_path))
    e = cfg.extract
    st.write_json("features/_scorer.json", {"backbone": e.backbone.model_dump(mode="json"),
                                            "model_dir": None, "readouts": e.readouts,
                                            "write_tokens": e.write_tokens})
    assert features_identity(st, cfg) == e.backbone.identity()
    _check_same_scorer(st, "features", e)                      # a resume: same scorer, no error
    other = cfg.model_copy(deep=True)
    other.extract.backbone.tiny = {}
    with pytest.raises(ValueError, match="was extracted with"):
        _check_same_scorer(st, "features", other.extract)


def test_one_model_dir_for_a_runs_training(tmp_path):
    from nearid.config import model_dir_for, train_run_name
    from nearid.stages.evaluate import default_model_dir

    cfg = load_config(None, ["run.name=exp", f"run.root={tmp_path}"])
    assert train_run_name(cfg) == "exp-train" and model_dir_for(cfg) == "models/exp-train"
    assert model_dir_for(cfg, "fault-driver") == "models/fault-driver"
    assert default_model_dir(cfg, Storage.open(str(tmp_path))) == f"{tmp_path}/models/exp-train"
