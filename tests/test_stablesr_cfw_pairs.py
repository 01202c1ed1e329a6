"""StableSR stage B's own training pairs (``stablesr.cfw.data: online``): a bounded set drawn once with
``stablesr.degrade``, as StableSR's ``scripts/generate_vqgan_data.py`` ``main`` draws them; seeded, recorded,
in the stage's key; and paper mode's degrade stage no longer writes train LR for it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from training_support import make_manifest, one_thread  # noqa: F401

from tvt import config as config_mod
from tvt import stages
from tvt.degradation import crop_flip
from tvt.training.data import OnlineDraws
from tvt.training.stablesr_cfw import cfw_training_pairs

ROOT = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
MINI = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
HR = 32  # small crops keep every draw cheap; the code path is the one 512² crops take


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two training photos (one item each: random crops) and a validation photo the draws must skip."""
    return make_manifest(
        tmp_path_factory.mktemp("cfw_pairs"),
        [
            ("astronaut", (64, 48), "mini", "train"),
            ("coffee", (50, 45), "mini", "train"),
            ("rocket", (64, 64), "mini", "val"),
        ],
    ).parent


def cfg(seed: int = 7, pairs: int = 5, **stablesr_degrade) -> dict:
    """Stage B drawing online; the shared `degrade` is mini mode's (OSEDiff-like), `stablesr.degrade` paper's."""
    return {
        "seed": seed,
        "data": {"source": "mini"},
        "degrade": {**MINI["degrade"], "hr_size": HR},
        "stablesr": {
            "degrade": {**PAPER["stablesr"]["degrade"], "hr_size": HR, **stablesr_degrade},
            "cfw": {"data": "online", "pairs": pairs},
        },
    }


def draws(config: dict, data_dir: Path) -> OnlineDraws:
    pairs, sources = cfw_training_pairs(config, data_dir / "no-pairs", data_dir)
    assert isinstance(pairs, OnlineDraws) and sources[-1] == data_dir / "manifest.csv"
    return pairs


def test_draws_are_bounded_shuffled_and_fresh_after_one_pass(data_dir):
    """5 draws of 2 training items: every pass is a permutation of both, later passes are new epochs
    (fresh crops and degradations), and the set stops at the configured count."""
    drawn = draws(cfg(pairs=5), data_dir)
    assert len(drawn) == 5 and [epoch for epoch, _ in drawn.draws] == [0, 0, 1, 1, 2]
    assert sorted(index for _, index in drawn.draws[:2]) == [0, 1] == sorted(i for _, i in drawn.draws[2:4])
    assert len(set(drawn.pair_ids)) == 5 and all("-rocket" not in p for p in drawn.pair_ids)
    item = drawn[4]
    assert item["pair_id"] == drawn.pair_ids[4]
    assert item["hr"].shape == (3, HR, HR) and item["lr"].shape == (3, HR // 4, HR // 4)
    assert len(draws(cfg(pairs=3), data_dir)) == 3
    with pytest.raises(IndexError):
        drawn[5]
    with pytest.raises(ValueError, match="count must be at least 1"):
        OnlineDraws(drawn.online, 0, 7)


def test_same_seed_same_pairs_other_seed_other_pairs(data_dir):
    a, b, other = draws(cfg(), data_dir), draws(cfg(), data_dir), draws(cfg(seed=8), data_dir)
    assert a.recipes() == b.recipes() and a.recipes() != other.recipes()
    for k in (0, 3):
        assert torch.equal(a[k]["hr"], b[k]["hr"]) and torch.equal(a[k]["lr"], b[k]["lr"])
    assert not any(torch.equal(a[k]["lr"], other[k]["lr"]) for k in range(len(a)))  # new crops and degradations


def test_recorded_recipes_replay_to_the_same_pairs(data_dir):
    drawn = draws(cfg(), data_dir)
    for k, recipe in enumerate(drawn.recipes()):
        item, replayed = drawn[k], drawn.online.replay(recipe)
        assert replayed["pair_id"] == item["pair_id"]
        assert torch.equal(replayed["hr"], item["hr"]) and torch.equal(replayed["lr"], item["lr"])


def test_the_draws_degrade_with_stablesr_degrade_not_the_shared_block(data_dir):
    """A value that only `stablesr.degrade` holds changes the drawn LR; the shared `degrade` block does not."""
    base = draws(cfg(), data_dir)
    noisier = draws(
        cfg(first={**PAPER["stablesr"]["degrade"]["first"], "noise_range": [40.0, 50.0], "gaussian_noise_prob": 1.0}),
        data_dir,
    )
    shared_edit = cfg()
    shared_edit["degrade"]["first"] = {**shared_edit["degrade"]["first"], "noise_range": [40.0, 50.0]}
    assert base.recipes()[0]["usm_gt"] and "usm_gt" not in MINI["degrade"]  # StableSR's USM ground truth
    assert not torch.equal(base[0]["lr"], noisier[0]["lr"])
    assert draws(shared_edit, data_dir).recipes() == base.recipes()
    assert torch.equal(draws(shared_edit, data_dir)[0]["lr"], base[0]["lr"])


def test_usm_and_no_degradation_options_take_effect(data_dir):
    """usm_gt sharpens the ground truth (off: the HR is the plain crop); no_degradation_prob 1 draws
    only undegraded pairs (a bicubic ÷4 of the ground truth), 0 none."""
    plain = draws(cfg(usm_gt=False, no_degradation_prob=0.0), data_dir)
    sharpened = draws(cfg(usm_gt=True, no_degradation_prob=0.0), data_dir)
    recipe = plain.recipes()[0]
    with Image.open(data_dir / "images" / f"{recipe['source_id'].split('-', 1)[1]}.png") as image:
        crop = crop_flip(np.asarray(image.convert("RGB")), recipe, HR)
    expected = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(plain[0]["hr"], expected, atol=1e-6)
    assert not torch.allclose(sharpened[0]["hr"], expected, atol=1 / 127.5)
    assert not any(r["degradation"].get("none") for r in plain.recipes())
    clean = draws(cfg(no_degradation_prob=1.0), data_dir)
    assert all(r["degradation"] == {"scale": 4, "none": True} for r in clean.recipes())
    assert not torch.equal(clean[0]["lr"], sharpened[0]["lr"])


def test_online_pairs_need_stablesr_degrade_a_count_and_the_data_stage(data_dir):
    no_block = cfg()
    del no_block["stablesr"]["degrade"]
    with pytest.raises(ValueError, match="add a stablesr.degrade section"):
        cfw_training_pairs(no_block, data_dir, data_dir)
    no_count = cfg()
    del no_count["stablesr"]["cfw"]["pairs"]
    with pytest.raises(ValueError, match="needs stablesr.cfw.pairs"):
        cfw_training_pairs(no_count, data_dir, data_dir)
    with pytest.raises(ValueError, match="stablesr.cfw.data: online needs the data stage"):
        cfw_training_pairs(cfg(), data_dir, None)


# ---- the stage registry ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper() -> dict:
    return config_mod.load(ROOT / "config" / "paper.yaml")


def registry(cfg: dict) -> dict[str, stages.Stage]:
    return {st.name: st for st in stages.build_stages(cfg)}


def test_paper_stage_b_draws_its_own_pairs_so_the_degrade_stage_writes_no_train_lr(paper):
    assert paper["stablesr"]["cfw"]["data"] == "online" and paper["stablesr"]["cfw"]["pairs"] == 5004
    built = registry(paper)
    assert built["stablesr_cfw"].train_split is None and "data" in built["stablesr_cfw"].needs
    assert stages.fixed_train_pairs(paper) == "hr"  # the VAE stages still read HR crops
    assert built["degrade"].params(paper)["train_pairs"] == "hr"
    fixed = copy.deepcopy(paper)
    fixed["stablesr"]["cfw"]["data"] = "fixed"  # stage B on the shared fixed pairs: train LR needed again
    assert stages.fixed_train_pairs(fixed) == "pairs" and "data" not in registry(fixed)["stablesr_cfw"].needs
    mini = config_mod.load(ROOT / "config" / "config.yaml")
    assert stages.fixed_train_pairs(mini) == "pairs" and registry(mini)["stablesr_cfw"].train_split == "pairs"


def test_the_count_is_in_stage_bs_keys_and_nowhere_else(paper):
    more = copy.deepcopy(paper)
    more["stablesr"]["cfw"]["pairs"] += 1
    a, b = registry(paper), registry(more)
    assert a["stablesr_cfw"].key != b["stablesr_cfw"].key and a["stablesr_cfw"].ckpt_key != b["stablesr_cfw"].ckpt_key
    assert all(a[name].key == b[name].key for name in ("degrade", "data", "stablesr_sft"))
