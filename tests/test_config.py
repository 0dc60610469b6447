import pytest

from nearid.config import ConfigError, config_to_dict, dump_yaml, load_config


def test_local_and_paper_configs_load():
    tiny = load_config("configs/tiny.yaml")
    paper = load_config("configs/paper.yaml")
    assert tiny.extract.backbone.name == "tiny-random" and tiny.synth.backgrounds == "procedural"
    assert paper.extract.backbone.name == "google/siglip2-so400m-patch14-384"
    assert paper.run.root.startswith("s3://")
    # the NearID paper's training recipe (arXiv 2604.01973) is the default of the training config
    assert (paper.train.lr, paper.train.weight_decay, paper.train.warmup_steps, paper.train.epochs,
            paper.train.batch_size, paper.train.grad_clip) == (1e-4, 1e-4, 100, 11, 128, 1.0)


def test_the_embedded_default_runs_the_real_backbone_on_photos():
    cfg = load_config("configs/local.yaml")
    assert cfg.extract.backbone.name == "dinov2-small@112" and cfg.extract.readouts == ["cls", "mean"]
    assert cfg.synth.backgrounds == "photo" and cfg.synth.min_visible_share > 0
    assert cfg.eval.scorers == ["frozen:cls", "frozen:mean", "nearid"]
    assert sorted(s.n_changes for s in cfg.generate.settings.values()) == [3, 3, 4]
    assert cfg.train.loss.name == "nearid" and 0 < cfg.train.token_dropout < 1


def test_override_parses_yaml_values():
    cfg = load_config("configs/local.yaml", ["train.lr=3e-4", "train.loss.name=infonce",
                                              "generate.splits=[test]"])
    assert cfg.train.lr == 3e-4 and cfg.train.loss.name == "infonce" and cfg.generate.splits == ["test"]


@pytest.mark.parametrize("override, needle", [
    (["train.lrr=1"], "unknown key 'train.lrr'"),
    (["train.epochs=abc"], "field 'train.epochs' = 'abc'"),
    (["train.lr=-1"], "field 'train.lr' = -1"),
    (["synth.split={train: 1, holdout: 1}"], "unknown split names ['holdout']"),
    (["nonsense"], "must look like section.field=value"),
])
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/local.yaml", override)
    assert needle in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_secrets_never_dumped():
    cfg = load_config(None, ["storage.secret_access_key=TOPSECRET123", "storage.access_key_id=AKIAXYZ"])
    text = dump_yaml(cfg)
    assert "TOPSECRET123" not in text and "AKIAXYZ" not in text
    assert config_to_dict(cfg)["storage"]["secret_access_key"] == "***"
    assert cfg.storage.secret_access_key.get_secret_value() == "TOPSECRET123"


def test_secret_rule_hides_credentials_but_not_settings_named_like_them():
    from nearid.tracking import scrub

    out = scrub({"storage.secret_access_key": "abc", "storage.key": "k", "hub.hf_token": "t", "x.api_key": "a",
                 "db.password": "p", "extract.backbone.tiny.token_mixing": False, "extract.write_tokens": True,
                 "train.max_tokens": 5, "storage.access_key": "ak", "tracking.auth": "u:p"})
    hidden = {k for k, v in out.items() if v == "***"}
    assert hidden == {"storage.secret_access_key", "hub.hf_token", "x.api_key", "db.password",
                      "storage.access_key", "tracking.auth"}
    assert out["extract.backbone.tiny.token_mixing"] == "False" and out["extract.write_tokens"] == "True"


def test_training_threads_come_from_the_config_never_the_machine():
    """A CPU worker's torch threads (its float sums split by them): `train.threads`, else
    int(`train.cpus_per_worker`); the embedded default trains on both cores of its 2-core box."""
    from nearid.training.loop import worker_threads

    assert worker_threads(load_config("configs/local.yaml").train) == 2
    assert worker_threads(load_config("configs/tiny.yaml").train) == 1
    assert worker_threads(load_config("configs/tiny.yaml", ["train.cpus_per_worker=0.5"]).train) == 1
    assert worker_threads(load_config("configs/paper.yaml").train) == 8
    assert worker_threads(load_config("configs/tiny.yaml", ["train.threads=3"]).train) == 3
    with pytest.raises(ConfigError, match="train.threads"):
        load_config("configs/tiny.yaml", ["train.threads=0"])
