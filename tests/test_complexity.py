"""Complexity table: SD 2.1-base reference numbers, MAC categories, consistency between rows."""

from __future__ import annotations

import json

from tvt import compat

compat.apply()

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt.complexity import compute_complexity, count_macs, to_json, to_markdown
from tvt.models.sd_configs import SD21_BASE_UNET, SD21_BASE_VAE


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    """The paper-size table: tens of seconds of FlopCounterMode dispatch, so its tests are in the slow tier."""
    return {row["name"]: row for row in compute_complexity(output_size=512, scale=4)}


def _total_tflops(row: dict) -> float:
    return 2 * (row["gmacs"] + row["attn_gmacs"]) / 1e3


def test_sd21_base_configs_have_the_published_parameter_counts():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        vae = AutoencoderKL(**SD21_BASE_VAE)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 865.9
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == 83.65


def test_count_macs_separates_conv_linear_from_attention_scores():
    with torch.device("meta"):
        conv, linear = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(16, 4)
        image, tokens = torch.empty(1, 3, 10, 10), torch.empty(5, 16)
        q = k = v = torch.empty(1, 2, 10, 8)  # batch, heads, tokens, head dim
        macs, attention = count_macs(lambda: (conv(image), linear(tokens), F.scaled_dot_product_attention(q, k, v)))
    assert macs == 8 * 3 * 9 * 100 + 5 * 16 * 4
    assert attention == 2 * (2 * 10 * 10 * 8)  # QKᵀ and softmax·V


@pytest.mark.slow
def test_sd_reference_numbers_of_design_md(rows):
    """docs/method.md §2 (2-FLOP MACs): VAE enc+dec 3.631 TFLOP; UNet@64² 0.804 TFLOP, 0.678 without attention."""
    assert _total_tflops(rows["VAE-D8 encoder + decoder"]) == pytest.approx(3.631, rel=0.01)
    unet = rows["SD UNet @ 64²"]
    assert _total_tflops(unet) == pytest.approx(0.804, rel=0.01)
    assert 2 * unet["gmacs"] / 1e3 == pytest.approx(0.678, rel=0.01)
    assert unet["params_M"] == pytest.approx(865.9, abs=0.05)
    assert rows["VAE-D8 encoder + decoder"]["params_M"] == pytest.approx(83.65, abs=0.005)


@pytest.mark.slow
def test_composite_rows_are_sums_of_their_parts(rows):
    def summed(*names, key):
        return sum(rows[n][key] for n in names)

    for key in ("gmacs", "attn_gmacs", "params_M"):
        for vae in ("VAE-D8", "VAE-D4"):
            assert rows[f"{vae} encoder + decoder"][key] == pytest.approx(
                summed(f"{vae} encoder", f"{vae} decoder", key=key), abs=0.02
            )
    for key in ("gmacs", "attn_gmacs"):
        tvt = summed("VAE-D4 encoder", "CE-UNet @ 128²", "VAE-D4 decoder", key=key)
        osediff = summed("VAE-D8 encoder", "SD UNet @ 64²", "VAE-D8 decoder", key=key)
        assert rows["TVT restorer (E4 + CE-UNet + D4)"][key] == pytest.approx(tvt, abs=0.05)
        assert rows["OSEDiff restorer (E8 + UNet + D8)"][key] == pytest.approx(osediff, abs=0.05)


@pytest.mark.slow
def test_the_paper_claims_hold_in_the_table(rows):
    unet64, unet128, ce = rows["SD UNet @ 64²"], rows["SD UNet @ 128² (S4)"], rows["CE-UNet @ 128²"]
    assert rows["VAE-D4 encoder + decoder"]["attn_gmacs"] == 0  # no attention anywhere in VAE-D4
    assert unet128["gmacs"] == pytest.approx(1350, rel=0.01)  # "~1.35 T MACs" at 128²
    assert unet128["gmacs"] / unet64["gmacs"] == pytest.approx(4, rel=0.02)  # convs scale with pixels
    assert unet64["gmacs"] < ce["gmacs"] < 0.6 * unet128["gmacs"]
    # ... but the replicas attend over 128² tokens: attention costs nearly as much as the full UNet at 128²
    assert ce["attn_gmacs"] > 0.9 * unet128["attn_gmacs"]
    assert rows["VAE-D4 encoder + decoder"]["params_M"] < 0.2 * rows["VAE-D8 encoder + decoder"]["params_M"]


@pytest.mark.slow
def test_output_size_scales_convolution_macs_quadratically():
    small = {row["name"]: row for row in compute_complexity(output_size=256)}
    assert small["VAE-D4 decoder"]["input_shape"] == "1×4×64×64"
    assert small["VAE-D4 encoder + decoder"]["gmacs"] == pytest.approx(1114.7 / 4, rel=0.01)
    with pytest.raises(ValueError, match="multiple of 16"):
        compute_complexity(output_size=520)


@pytest.mark.slow
def test_markdown_and_json_renderings(rows):
    table = list(rows.values())
    markdown = to_markdown(table)
    assert markdown.splitlines()[0].startswith("| Network | Input | Params (M) | MACs (G) | Attention MACs (G)")
    assert all(name in markdown for name in rows) and "text encoder" in markdown
    assert "| SD UNet @ 64² | 1×4×64×64 | 865.91 | 339.1 | 63.0 | 0.804 |" in markdown
    assert json.loads(to_json(table)) == table
    assert set(table[0]) == {"name", "params_M", "gmacs", "attn_gmacs", "input_shape"}


@pytest.mark.slow
def test_stablesr_rows(rows):
    from tvt.reports import ARCHITECTURES

    step = rows["StableSR step (encoder + SFT + UNet) @ 64²"]
    unet = rows["SD UNet @ 64²"]
    # the conditioning adds compute to every step, never removes any: SFT heads and a
    # time-aware encoder that is ~1/8 of the UNet (105 M trainable parameters on top of 866 M)
    assert unet["gmacs"] < step["gmacs"] < 1.5 * unet["gmacs"]
    assert step["params_M"] - unet["params_M"] == pytest.approx(105.47, abs=0.1)
    restorer = rows["StableSR restorer (E8 + 200 steps + CFW-D8)"]
    expected = rows["VAE-D8 encoder"]["gmacs"] + 200 * step["gmacs"] + \
        rows["StableSR CFW decoder (E8 features + D8 + CFW)"]["gmacs"]
    assert restorer["gmacs"] == pytest.approx(expected, abs=0.05)
    # what the paper's Table 4 says in words: 200 steps cost ~40x a one-step restorer
    assert restorer["gmacs"] > 35 * rows["OSEDiff restorer (E8 + UNet + D8)"]["gmacs"]
    # every method the reports look up has its row
    assert set(ARCHITECTURES.values()) <= set(rows)


@pytest.mark.slow
def test_the_ablation_rows_order_as_the_papers_flops_and_every_report_row_exists(rows):
    """Tables 5 and 7's FLOPs order V1 > V2 > TVT and S4 > S5 > TVT, S2 ≈ S1 (docs/ablations.md); so must our MACs.
    Every architecture the reports name is a row here (a renamed row would leave a blank cell)."""
    from tvt.reports import ARCHITECTURES

    def macs(name):
        return rows[name]["gmacs"]

    tvt, v1, v2 = (f"{v} restorer (E4{s} + CE-UNet + D4{s})" for v, s in (("TVT", ""), ("V1", "-V1"), ("V2", "-V2")))
    s4, s5 = "S4 restorer (E4 + UNet @ 128² + D4)", "S5 restorer (E4 + 25%-pruned UNet @ 128² + D4)"
    assert macs(v1) > macs(v2) > macs(tvt)
    assert macs(s4) > macs(s5) > macs(tvt)
    assert rows[s5]["params_M"] < 0.85 * rows[s4]["params_M"]
    assert rows[s4]["gmacs"] == pytest.approx(sum(rows[n]["gmacs"] for n in (
        "VAE-D4 encoder", "SD UNet @ 128² (S4)", "VAE-D4 decoder")), abs=0.05)
    # S2 = S1 + one 1x1 conv (C -> C) per VAE level: the paper's 2.27 T for both; ours exactly those convs more
    s1, s2 = rows["OSEDiff restorer (E8 + UNet + D8)"], rows["S2 restorer (E8 + UNet + D8 with E8 skips)"]
    skips = sum((512 // 2**level) ** 2 * width * width for level, width in enumerate((128, 256, 512, 512))) / 1e9
    assert s2["gmacs"] - s1["gmacs"] == pytest.approx(skips, abs=0.02)  # 13.96 G, +0.7 %
    assert s2["attn_gmacs"] == s1["attn_gmacs"]
    # S3 = S1 with 8 latent channels: only the layers that read or write the latent grow (0.3 G of 2120 G)
    s3 = rows["S3 restorer (E8 + UNet + D8, 8 latent channels)"]
    assert 0 < s3["gmacs"] - s1["gmacs"] < 1 and s3["attn_gmacs"] == s1["attn_gmacs"]
    assert set(ARCHITECTURES.values()) <= set(rows)
