"""Exact tiled VAE (tvt/models/tiled_vae.py): tiles with pooled GroupNorm statistics equal untiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from diffusers import AutoencoderKL

from tvt.models.sd_configs import MINI_VAE_D4, MINI_VAE_D8, VAE_D4_V1
from tvt.models.tiled_vae import (
    FeatureMap,
    decoder_program,
    encoder_program,
    exact_tiled_decode,
    exact_tiled_encode,
    rrdb_op,
    run_tiled,
    run_untiled,
    split_tiled,
)
from tvt.models.tiling import tiled_decode, tiled_encode
from tvt.models.vae_d4 import VAED4


def _photo(size: int) -> torch.Tensor:
    """skimage's astronaut, resized to size x (size * 3 // 4), in [-1, 1] (a non-square image)."""
    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(size, size * 3 // 4), mode="bilinear", antialias=True, align_corners=False)
    return image * 2 - 1


def _vaes() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    v1_mini = {
        **MINI_VAE_D4,
        "encoder_channels": (16, 32, 32),
        "decoder_channels": (32, 32, 16),
        "mid_block": True,
        "mid_block_attention": True,
    }
    return {
        "d4": VAED4(**MINI_VAE_D4).eval(),
        "d4-mid-attention": VAED4(**{**VAE_D4_V1, **v1_mini}).eval(),
        "d8": AutoencoderKL(**MINI_VAE_D8).eval(),
    }


VAES = _vaes()


@pytest.mark.parametrize("name", list(VAES))
def test_programs_reproduce_the_modules(name):
    """The flattened task lists are the VAE: untiled, they give encode/decode's outputs."""
    vae = VAES[name]
    image = _photo(64)
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mode()
        torch.testing.assert_close(run_untiled(encoder_program(vae), image), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(run_untiled(decoder_program(vae), mean), vae.decode(mean).sample, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VAES))
def test_exact_tiles_match_untiled_and_beat_per_tile_statistics(name):
    vae = VAES[name]
    factor = vae.downsample_factor if isinstance(vae, VAED4) else 8
    image = _photo(96)
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mode()
        full = vae.decode(mean).sample
        tiled_mean = exact_tiled_encode(vae, image, 48)  # 2 x 2 pixel tiles, uneven
        tiled = exact_tiled_decode(vae, mean, 48 // factor)
        blended = tiled_decode(vae, mean, 48 // factor, 16 // factor)  # per-tile GroupNorm statistics
    scale = full.abs().max()
    assert (tiled_mean - mean).abs().max() <= 1e-4 * mean.abs().max()
    assert (tiled - full).abs().max() <= 1e-4 * scale
    assert (blended - full).abs().max() > 100 * (tiled - full).abs().max()  # the statistics are what differs


def test_spilled_tile_states_give_the_same_result():
    vae = VAES["d4"]
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    in_ram = exact_tiled_decode(vae, latents, 12)
    spilled = exact_tiled_decode(vae, latents, 12, resident_bytes=0)  # every state to disk and back
    assert torch.equal(in_ram, spilled)
    with torch.no_grad():  # batch items keep their own statistics
        torch.testing.assert_close(in_ram[1:], vae.decode(latents[1:]).sample, rtol=0, atol=1e-4)


def test_the_default_budget_follows_the_device_and_reaches_the_store(monkeypatch):
    """128 MiB of resident states on CPU (flat memory at SD size, docs/inference.md), the earlier 1 GiB
    on an accelerator; a run without ``resident_bytes`` hands the CPU figure to its tile store."""
    from tvt.models import tiled_vae

    assert tiled_vae.default_resident_bytes(torch.device("cpu")) == tiled_vae.CPU_RESIDENT_BYTES == 128 << 20
    assert tiled_vae.default_resident_bytes("cuda") == tiled_vae.ACCELERATOR_RESIDENT_BYTES == 1 << 30
    budgets = []
    store = tiled_vae._TileStore
    monkeypatch.setattr(tiled_vae, "_TileStore", lambda budget: budgets.append(budget) or store(budget))
    exact_tiled_decode(VAES["d4"], torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1)), 12)
    assert budgets == [128 << 20]


def test_attention_runs_untiled_on_its_low_resolution_side():
    vae = VAES["d8"]
    head, tiled, tail = split_tiled(encoder_program(vae))
    assert not head and tail[0].name.startswith("encoder.mid_block") and all(op.kind != "global" for op in tiled)
    head, tiled, tail = split_tiled(decoder_program(vae))
    assert head[-1].kind == "global" and not tail and any(op.scale == 2 for op in tiled)
    with pytest.raises(ValueError, match="global tasks"):
        run_tiled(decoder_program(vae), torch.zeros(1, 4, 16, 16), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_map_on_disk_reads_back_what_was_written(dtype):
    """Cores written on one grid, windows read on another, neither aligned to the 8-px blocks."""
    source = torch.randn(2, 5, 37, 53, generator=torch.Generator().manual_seed(2)).to(dtype)
    maps = [FeatureMap(), FeatureMap(on_disk=True, block=8)]
    for feature_map in maps:
        for r0, r1 in ((0, 13), (13, 30), (30, 37)):
            for c0, c1 in ((0, 20), (20, 21), (21, 53)):
                feature_map.write(source[..., r0:r1, c0:c1], slice(r0, r1), slice(c0, c1), (37, 53))
    for rows, cols in ((slice(0, 37), slice(0, 53)), (slice(5, 29), slice(7, 50)), (slice(36, 37), slice(0, 1))):
        assert all(torch.equal(m.read(rows, cols), source[..., rows, cols]) for m in maps)
    assert torch.equal(maps[1].tensor(), source)
    with pytest.raises(ValueError, match="fall outside"):
        maps[1].read(slice(30, 40), slice(0, 8))
    with pytest.raises(ValueError, match="written as"):
        maps[1].write(source, slice(0, 37), slice(0, 53), (40, 53))
    for feature_map in maps:
        feature_map.close()


def test_rrdb_radius_is_its_chain_of_fifteen_convs():
    from basicsr.archs.rrdbnet_arch import RRDB

    assert rrdb_op(RRDB(8, 4), "body.0").radius == 15  # 3 dense blocks x 5 convs x 1 px
    with pytest.raises(TypeError, match=r"body\.0 \(Conv2d\), expected an RRDB"):
        rrdb_op(torch.nn.Conv2d(8, 8, 3, padding=1), "body.0")


def test_unsupported_module_is_named():
    vae = VAED4(**MINI_VAE_D4)
    vae.decoder.up_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(32, 32, 3, padding=0)
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.0\.resnets\.0\.conv1"):
        decoder_program(vae)


def test_tiling_entry_points_dispatch_to_the_exact_path():
    vae = VAES["d4"]
    image = _photo(64)
    with torch.no_grad():
        reference = exact_tiled_encode(vae, image, 32)
    assert torch.equal(tiled_encode(vae, image, 32, 0, norm_stats="exact"), reference)
