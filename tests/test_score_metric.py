"""`from nearid import NearIDScore`: a torchmetrics Metric equal to `nearid score` pair by pair, for
paths, PIL images and uint8 tensors; reset; two-process gloo sync as torchmetrics does it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from nearid import NearIDScore, cli
from nearid.model import NearIDModel

from tests.conftest import noisy_pngs

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    model = NearIDModel.from_backbone("tiny-random")
    torch.manual_seed(3)
    with torch.no_grad():   # a head unlike the backbone's own, so scores are the trained model's
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return str(model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return noisy_pngs(tmp_path_factory.mktemp("images"), 6, heights=[36 + 4 * i for i in range(6)])


PAIRS = [(0, 1), (0, 2), (3, 3), (4, 5), (5, 1)]


@pytest.fixture(scope="module")
def cli_scores(model_dir, images, tmp_path_factory) -> list[float]:
    """What `nearid score --pairs` writes for PAIRS (JSON output)."""
    tmp = tmp_path_factory.mktemp("cli")
    pd.DataFrame({"reference": [images[a] for a, _ in PAIRS],
                  "generated": [images[b] for _, b in PAIRS]}).to_csv(tmp / "pairs.csv", index=False)
    assert cli.main(["score", "--pairs", str(tmp / "pairs.csv"), "--model", model_dir,
                     "--out", str(tmp / "scores.json")]) == 0
    return [r["score"] for r in json.loads((tmp / "scores.json").read_text())]


def _uint8(path: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def test_paths_pil_and_tensors_equal_the_cli_pair_by_pair(model_dir, images, cli_scores):
    metric = NearIDScore(model_dir, batch_size=2)
    refs, gens = [images[a] for a, _ in PAIRS], [images[b] for _, b in PAIRS]
    metric.update(refs[:2], gens[:2])                                       # paths
    metric.update([Image.open(p) for p in refs[2:4]], [Image.open(p) for p in gens[2:4]])   # PIL
    metric.update(_uint8(refs[4]), _uint8(gens[4]))                         # one [3,H,W] tensor
    out = metric.compute()
    assert out["scores"] == pytest.approx(cli_scores, abs=1e-6)
    assert out["mean"] == pytest.approx(float(np.mean(cli_scores)), abs=1e-6)
    assert out["scores"][2] == pytest.approx(1.0, abs=1e-5)               # an image with itself
    assert len({round(s, 4) for s in out["scores"]}) == len(PAIRS)           # not one constant
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in out["scores"])


def test_batched_tensor_input_and_batch_size_do_not_change_a_score(model_dir, images, cli_scores):
    # same-size images stack into one [B,3,H,W] uint8 batch; a list may mix sizes
    same = [images[0]] * 3
    gens = [images[1], images[2], images[0]]
    one = NearIDScore(model_dir, batch_size=1)
    one.update(torch.stack([_uint8(p) for p in same]), [_uint8(p) for p in gens])
    many = NearIDScore(model_dir, batch_size=64)
    many.update(same, gens)
    assert one.compute()["scores"] == pytest.approx(many.compute()["scores"], abs=1e-6)
    assert many.compute()["scores"][:2] == pytest.approx(cli_scores[:2], abs=1e-6)


def test_reset_empties_and_compute_before_update_says_so(model_dir, images):
    metric = NearIDScore(model_dir)
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["scores"] == [] and math.isnan(empty["mean"])
    metric.update(images[0], images[1])
    assert len(metric.compute()["scores"]) == 1
    metric.reset()
    metric.update([images[2], images[3]], [images[3], images[3]])
    got = metric.compute()["scores"]
    assert len(got) == 2 and got[1] == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_name_the_item(model_dir, images, tmp_path):
    metric = NearIDScore(model_dir)
    with pytest.raises(ValueError, match="as many generated"):
        metric.update([images[0], images[1]], [images[1]])
    with pytest.raises(ValueError, match=r"generated\[0\]: expected a uint8"):
        metric.update(images[0], torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match=r"references\[1\]: expected a path"):
        metric.update([images[0], 7], [images[1], images[1]])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        metric.update(str(tmp_path / "nope.png"), images[1])
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        NearIDScore(str(tmp_path / "no-model"))
    assert metric.compute()["scores"] == []                # nothing half-added by the failures


def _rank(rank: int, world: int, init_file: str, model_dir: str, refs: list, gens: list, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = NearIDScore(model_dir, batch_size=2)
        mine = [i for i in range(len(refs)) if i % world == rank]     # uneven: 3 pairs on rank 0, 2 on 1
        metric.update([refs[i] for i in mine], [gens[i] for i in mine])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"mine": mine, **metric.compute()}))
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_every_pair_on_compute(model_dir, images, cli_scores, tmp_path):
    refs, gens = [images[a] for a, _ in PAIRS], [images[b] for _, b in PAIRS]
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), model_dir, refs, gens, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    order = ranks[0]["mine"] + ranks[1]["mine"]            # rank 0's pairs first
    want = [cli_scores[i] for i in order]
    for r in ranks:
        assert r["scores"] == pytest.approx(want, abs=1e-6)
        assert r["mean"] == pytest.approx(float(np.mean(cli_scores)), abs=1e-6)
