"""``tvt sr --steps/--w/--seed``: a StableSR restorer's sampling settings from the command line."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_sr import save_tiny_restorer
from test_stablesr_restorer import restorer  # noqa: F401  (the mini StableSR restorer fixture)

from tvt import sr


def _run(tmp_path, name, *options) -> tuple[int, np.ndarray | None]:
    parser = argparse.ArgumentParser(prog="tvt sr")
    sr.add_arguments(parser)
    out = tmp_path / name
    args = parser.parse_args(
        [
            str(tmp_path / "a.png"),
            "-o",
            str(out),
            "--weights",
            str(tmp_path / "weights"),
            "--device",
            "cpu",
            *map(str, options),
        ]
    )
    code = sr.main(args)
    return code, (np.asarray(Image.open(out / "a.png")) if code == 0 else None)


@pytest.fixture
def stablesr_folder(restorer, tmp_path):  # noqa: F811
    restorer.save_pretrained_dir(tmp_path / "weights")
    Image.fromarray(data.astronaut()[::32, ::32][:12, :16]).save(tmp_path / "a.png")
    return tmp_path


def test_threads_option_sets_torch_threads(stablesr_folder):
    before = torch.get_num_threads()
    try:
        sr.load_restorer(stablesr_folder / "weights", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sampling_options_reach_the_restorer(stablesr_folder):
    loaded = sr.load_restorer(stablesr_folder / "weights", device="cpu", steps=2, w=0.0, seed=3)
    assert (loaded.steps, loaded.w, loaded.seed) == (2, 0.0, 3)
    stored = sr.load_restorer(stablesr_folder / "weights", device="cpu", steps=None, w=None, seed=None)
    assert (stored.steps, stored.w, stored.seed) == (3, 0.5, 7)  # None keeps restorer.json's values


@pytest.mark.slow
def test_w_and_seed_change_the_output_and_the_seed_reproduces_it(stablesr_folder):
    outputs = {}
    for name, options in {
        "w0": ("--w", 0),
        "w1": ("--w", 1),
        "w1-seed5": ("--w", 1, "--seed", 5),
        "w1-again": ("--w", 1),
    }.items():
        code, outputs[name] = _run(stablesr_folder, name, "--steps", 2, *options)
        assert code == 0
    assert outputs["w0"].shape == (48, 64, 3)
    assert np.abs(outputs["w0"].astype(int) - outputs["w1"]).mean() > 0.5
    assert np.abs(outputs["w1-seed5"].astype(int) - outputs["w1"]).mean() > 0.5
    assert np.array_equal(outputs["w1"], outputs["w1-again"])


def test_sampling_options_are_refused_for_one_step_restorers(tmp_path, capsys):
    save_tiny_restorer(tmp_path / "weights")
    Image.fromarray(data.astronaut()[::32, ::32][:12, :16]).save(tmp_path / "a.png")
    code, _ = _run(tmp_path, "out", "--steps", 4)
    assert code == 2
    assert "--steps: only multi-step (StableSR) restorers sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path, "out", "--w", 1.5)
    assert "expected a number from 0 to 1, got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # sampling runs from t=999 to t=0: at least two steps
        _run(tmp_path, "out", "--steps", 1)
    assert "expected an integer from 2 to 1000, got '1'" in capsys.readouterr().err
