"""Online degradation: draws keyed on (seed, epoch, index), recorded recipes that replay, the
official crops (random / sliding window / resize), resize_bak, and bit-identical resumption of a
training run that degrades in loader workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sample_photos import photo
from torch import nn
from training_support import make_manifest, one_thread  # noqa: F401

from tvt.degradation import INTERPOLATIONS, online_seed, resize_back, usm_sharpen
from tvt.training.data import OnlinePairDataset, degrade_batch
from tvt.training.engine import TrainConfig, Trainer, latest_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
HR = 32  # small crops keep every draw cheap; the code path is the one 512² crops take
SEED = 11


@pytest.fixture(scope="module")
def cfg() -> dict:
    return {**yaml.safe_load(CONFIG.read_text())["degrade"], "hr_size": HR}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Three training photos (one cut in windows, one resized, one cropped at random) and one
    validation photo that training must ignore."""
    return make_manifest(
        tmp_path_factory.mktemp("online"),
        [
            ("astronaut", (80, 48), "lsdir", "train"),
            ("chelsea", (60, 40), "ffhq", "train"),
            ("coffee", (50, 45), "mini", "train"),
            ("rocket", (64, 64), "mini", "val"),
        ],
    )


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


CROPS = {"lsdir": {"mode": "window", "stride": 16}, "ffhq": {"mode": "resize"}}


def dataset(manifest, cfg, **kwargs) -> OnlinePairDataset:
    return OnlinePairDataset(manifest, cfg, SEED, crops=CROPS, **kwargs)


def test_items_follow_the_official_crops(manifest, cfg):
    """80x48 at stride 16 gives 4x2 windows of 32² (TVT's LSDIR), the face is one resized item, the
    mini photo one randomly cropped item; the validation photo is not drawn."""
    data = dataset(manifest, cfg)
    assert len(data) == 4 * 2 + 1 + 1
    sources = [data.recipe(i)["source_id"] for i in range(len(data))]
    assert sources == ["p0-astronaut"] * 8 + ["p1-chelsea", "p2-coffee"]
    window = np.asarray(photo("astronaut").resize((80, 48)))[16:48, 48:80]  # window 7: row 1, column 3
    hr = to_uint8(data[7]["hr"])
    flip = data.recipe(7)["flip"]
    assert np.array_equal(hr, window[:, ::-1] if flip else window)
    assert data.recipe(8)["crop"] == [0, 0]  # a resized image leaves nothing to crop
    for i in range(len(data)):
        assert data[i]["hr"].shape == (3, HR, HR) and data[i]["lr"].shape == (3, HR // 4, HR // 4)


def test_draws_are_a_function_of_seed_epoch_and_index(manifest, cfg):
    """Two datasets built apart give the same item for the same (epoch, index); another epoch or
    index gives another crop/degradation; the seed changes everything."""
    a, b = dataset(manifest, cfg), dataset(manifest, cfg)
    b.set_epoch(3)
    b.set_epoch(0)  # no state carried by having visited epoch 3
    for index in (0, 9):
        x, y = a[index], b[index]
        assert x["recipe"] == y["recipe"] and torch.equal(x["lr"], y["lr"]) and torch.equal(x["hr"], y["hr"])
    b.set_epoch(1)
    assert not torch.equal(a[9]["lr"], b[9]["lr"])  # the random crop of the mini photo: a fresh draw
    assert a[9]["recipe"] != b[9]["recipe"]
    assert a[0]["recipe"] != a[1]["recipe"]
    assert online_seed(SEED, 0, 0) != online_seed(SEED + 1, 0, 0)
    draws = {json.dumps(json.loads(dataset(manifest, cfg)[9]["recipe"])["crop"])}
    for epoch in range(1, 12):
        b.set_epoch(epoch)
        draws.add(json.dumps(json.loads(b[9]["recipe"])["crop"]))
    assert len(draws) > 4  # 19x14 possible crops: twelve epochs do not keep one


def test_recorded_recipe_replays_to_the_same_pair(manifest, cfg):
    data = dataset(manifest, cfg)
    data.set_epoch(5)
    for index in (2, 9):
        item = data[index]
        again = dataset(manifest, cfg).replay(json.loads(item["recipe"]))
        for key in ("hr", "lr", "lr_up"):
            assert torch.equal(item[key], again[key]), key


def test_lr_is_brought_back_to_hr_size_in_8_bits(manifest, cfg):
    """resize_bak: the model's input has the HR size, 8-bit values, and a randomly chosen interpolation."""
    data = dataset(manifest, cfg)
    modes = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        item = data[9]
        lr_up = (item["lr_up"] + 1) * 127.5
        assert item["lr_up"].shape == item["hr"].shape
        assert torch.allclose(lr_up, lr_up.round(), atol=1e-3)
        modes.add(json.loads(item["recipe"])["resize_back"])
    assert len(modes) > 1 and modes <= set(INTERPOLATIONS)
    lr = torch.rand(1, 3, 8, 8)
    ups = [resize_back(lr, (32, 32), mode) for mode in INTERPOLATIONS]
    assert not torch.equal(ups[0], ups[2]) and not torch.equal(ups[1], ups[2])
    with pytest.raises(ValueError, match="nearest"):
        resize_back(lr, (32, 32), "nearest")


@pytest.mark.parametrize("usm_gt", [False, True])
def test_degrading_in_the_training_process_equals_the_loader(manifest, cfg, usm_gt):
    """degrade=False defers USM/blur/noise/JPEG to degrade_batch (the GPU path); on one device the result is
    the same. With usm_gt (StableSR) the ground truth is the sharpened crop, as the fixed pairs' usm_sharpen."""
    cfg = {**cfg, "usm_gt": usm_gt}
    loader_side = dataset(manifest, cfg)
    deferred = dataset(manifest, cfg, degrade=False)
    batch = torch.utils.data.default_collate([deferred[i] for i in (1, 9)])
    assert "lr" not in batch and "hr" not in batch
    done = degrade_batch(batch, "cpu")
    for key in ("hr", "lr", "lr_up"):
        assert torch.equal(done[key], torch.stack([loader_side[i][key] for i in (1, 9)])), key
    crop = batch["hr_u8"][0].permute(1, 2, 0).numpy()
    expected = usm_sharpen(crop) if usm_gt else crop
    assert np.array_equal(to_uint8(done["hr"][0]), expected)
    if usm_gt:
        assert not np.array_equal(expected, crop)


def test_bad_crop_mode_is_named(manifest, cfg):
    with pytest.raises(ValueError, match="'lsdir'.*'tiles'"):
        OnlinePairDataset(manifest, cfg, SEED, crops={"lsdir": {"mode": "tiles"}})


# ---------------------------------------------------------------- resumption with workers ---


def make_trainer(root: Path, workers: int, steps: int = 8) -> Trainer:
    config = TrainConfig.from_section(
        {
            "steps": steps,
            "batch_size": 2,
            "checkpoint_every": 3,
            "keep_checkpoints": 2,
            "log_every": 4,
            "num_workers": workers,
        }
    )
    trainer = Trainer(config, name="online", seed=SEED, ckpt_dir=root / "ckpt", fingerprint={})
    model = nn.Conv2d(3, 3, 3, padding=1)
    trainer.register({"model": model}, {"model": torch.optim.Adam(model.parameters(), lr=1e-2)})
    return trainer


def fit(trainer: Trainer, data: OnlinePairDataset, seen: list, fail_at: int | None = None) -> None:
    def step(batch):
        if trainer.step == fail_at:
            raise KeyboardInterrupt("simulated kill")
        seen.append((trainer.step, tuple(batch["pair_id"])))
        loss = nn.functional.mse_loss(trainer.models["model"](batch["lr_up"]), batch["hr"])
        trainer.optimise("model", loss)
        return {"loss": loss}

    trainer.fit(data, step)


@pytest.mark.slow
def test_resume_with_online_degradation_and_workers_is_bit_identical(manifest, cfg, tmp_path):
    """10 items in batches of 2: 8 steps cross an epoch boundary. A run with 2 loader workers killed
    in step 5 and resumed from checkpoint-3 ends with the weights of an uninterrupted run without
    workers, having seen the same draws (a fresh crop/degradation per epoch)."""
    reference, ref_seen = make_trainer(tmp_path / "ref", workers=0), []
    fit(reference, dataset(manifest, cfg), ref_seen)

    victim, seen = make_trainer(tmp_path / "victim", workers=2), []
    with pytest.raises(KeyboardInterrupt):
        fit(victim, dataset(manifest, cfg), seen, fail_at=5)
    assert latest_checkpoint(tmp_path / "victim" / "ckpt").name == "checkpoint-3"
    torch.randn(10)  # the dead process's RNG moved on
    resumed, resumed_seen = make_trainer(tmp_path / "victim", workers=2), []
    fit(resumed, dataset(manifest, cfg), resumed_seen)

    assert seen == ref_seen[:4] and resumed_seen == ref_seen[3:]
    epochs = {pid.split("@")[1].split("i")[0] for _, ids in ref_seen for pid in ids}
    assert epochs == {"e0", "e1"}
    ref, res = reference.unwrap("model").state_dict(), resumed.unwrap("model").state_dict()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key
