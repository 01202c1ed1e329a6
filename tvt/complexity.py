"""Parameters and compute of every network, counted from the real module definitions (docs/method.md §1.6).

The field reports "FLOPs" that are really multiply-accumulates (MACs) of convolutions and
linear layers, and usually leaves attention-score matmuls (QKᵀ and softmax·V) out. Both
are reported here, separately, because they tell different stories: CE-UNet saves conv
MACs, yet its 2x-resolution replicas attend over 4x more tokens (16x more score MACs).

Models are built on the meta device (no memory, no weights) and run once under
``torch.utils.flop_counter.FlopCounterMode`` with SDPA forced to its math backend, so
attention appears as ``bmm`` ops whatever the hardware; FLOPs are halved into MACs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tvt.models.ce_unet import CEUNet
from tvt.models.cfw import CFWAutoencoder, CFWModule
from tvt.models.pruned_unet import PAPER_KEEP, PrunedUNet
from tvt.models.sd_configs import (
    SD21_BASE_UNET,
    SD21_BASE_VAE,
    STABLESR_CONDITIONER_PAPER,
    VAE_D4_PAPER,
    VAE_D4_V1,
    VAE_D4_V2,
)
from tvt.models.skip_vae import SkipAutoencoderKL
from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner
from tvt.models.stablesr_sampler import PAPER_SAMPLING_STEPS
from tvt.models.vae_d4 import VAED4
from tvt.models.wide_latent import S3_LATENT_CHANNELS

_aten = torch.ops.aten
_CONV_LINEAR_OPS = {_aten.convolution, _aten.mm, _aten.addmm}
_ATTENTION_OPS = {_aten.bmm, _aten.baddbmm}
_PROMPT_TOKENS = 77  # CLIP's context length

NOTES = (
    "VAE-D8 and SD UNet: Stable Diffusion 2.1-base; VAE-D4: the paper's compact VAE. "
    "MACs: multiply-accumulates of convolutions and linear layers (what SR papers call FLOPs). "
    "Attention MACs: QKᵀ and softmax·V matmuls, self- and cross-attention. "
    "Total TFLOPs = 2 × (MACs + attention MACs), torch FlopCounterMode's convention. "
    "Batch 1, one denoising step, 77-token prompt; the text encoder and prompt extractor are excluded; "
    "the restorers' input is the LR image bicubic-upsampled to the output size (not counted). "
    f"StableSR: {PAPER_SAMPLING_STEPS} sampling steps (each: time-aware encoder + SFT + UNet), "
    "E8 on the upsampled LR, then the CFW decoder (D8 + CFW fusing a second E8 feature pass), w > 0."
)


def count_macs(run: Callable[[], object]) -> tuple[float, float]:
    """(conv + linear MACs, attention-score MACs) of ``run()``; any other counted op is an error."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        run()
    flops = counter.get_flop_counts()["Global"]
    unknown = set(flops) - _CONV_LINEAR_OPS - _ATTENTION_OPS
    if unknown:
        raise RuntimeError(f"count_macs: no MAC category for {sorted(map(str, unknown))}")
    conv_linear = sum(flops.get(op, 0) for op in _CONV_LINEAR_OPS)
    attention = sum(flops.get(op, 0) for op in _ATTENTION_OPS)
    return conv_linear / 2, attention / 2


def _millions(*modules: torch.nn.Module) -> float:
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


def _shape(*dims: int) -> str:
    return "×".join(map(str, dims))


def compute_complexity(output_size: int = 512, scale: int = 4) -> list[dict]:
    """One row per network at an ``output_size``² output: name, params_M, gmacs, attn_gmacs, input_shape."""
    if output_size % 16:
        raise ValueError(
            f"compute_complexity: output_size must be a multiple of 16 (VAE-D8 × CE stem); got {output_size}"
        )
    size, d8, d4 = output_size, output_size // 8, output_size // 4
    with torch.device("meta"):
        vae8 = AutoencoderKL(**SD21_BASE_VAE)
        vae4 = VAED4(**VAE_D4_PAPER)
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        ce_unet = CEUNet(unet_config=SD21_BASE_UNET)
        vae_v1, vae_v2 = VAED4(**VAE_D4_V1), VAED4(**VAE_D4_V2)
        pruned = PrunedUNet(unet_config=SD21_BASE_UNET, keep=PAPER_KEEP)
        skip_vae8 = SkipAutoencoderKL(**SD21_BASE_VAE)
        wide = {"latent_channels": S3_LATENT_CHANNELS}
        wide_vae8 = AutoencoderKL(**{**SD21_BASE_VAE, **wide})
        wide_unet = UNet2DConditionModel(**{**SD21_BASE_UNET, "in_channels": S3_LATENT_CHANNELS,
                                            "out_channels": S3_LATENT_CHANNELS})
        image = torch.empty(1, 3, size, size)
        latent8, latent4 = torch.empty(1, 4, d8, d8), torch.empty(1, 4, d4, d4)
        prompt = torch.empty(1, _PROMPT_TOKENS, SD21_BASE_UNET["cross_attention_dim"])

        def restore(encoder, denoiser, decoder):
            z = encoder.encode(image).latent_dist.mode()
            return decoder.decode(denoiser(z, 1, prompt).sample).sample

        def restore_with_skips(vae, denoiser):
            posterior, skips = vae.encode_with_skips(image)
            return vae.decode(denoiser(posterior.latent_dist.mode(), 1, prompt).sample, skips=skips).sample

        lr = f"{_shape(1, 3, size, size)} (LR {size // scale}² ×{scale})"
        rows = [
            (
                "VAE-D8 encoder",
                (vae8.encoder, vae8.quant_conv),
                _shape(1, 3, size, size),
                lambda: vae8.encode(image),
            ),
            (
                "VAE-D8 decoder",
                (vae8.decoder, vae8.post_quant_conv),
                _shape(1, 4, d8, d8),
                lambda: vae8.decode(latent8),
            ),
            (
                "VAE-D8 encoder + decoder",
                (vae8,),
                _shape(1, 3, size, size),
                lambda: vae8.decode(vae8.encode(image).latent_dist.mode()),
            ),
            ("VAE-D4 encoder", (vae4.encoder, vae4.quant_conv), _shape(1, 3, size, size), lambda: vae4.encode(image)),
            (
                "VAE-D4 decoder",
                (vae4.decoder, vae4.post_quant_conv),
                _shape(1, 4, d4, d4),
                lambda: vae4.decode(latent4),
            ),
            (
                "VAE-D4 encoder + decoder",
                (vae4,),
                _shape(1, 3, size, size),
                lambda: vae4.decode(vae4.encode(image).latent_dist.mode()),
            ),
            (f"SD UNet @ {d8}²", (unet,), _shape(1, 4, d8, d8), lambda: unet(latent8, 1, prompt)),
            (f"SD UNet @ {d4}² (S4)", (unet,), _shape(1, 4, d4, d4), lambda: unet(latent4, 1, prompt)),
            (f"CE-UNet @ {d4}²", (ce_unet,), _shape(1, 4, d4, d4), lambda: ce_unet(latent4, 1, prompt)),
            ("TVT restorer (E4 + CE-UNet + D4)", (vae4, ce_unet), lr, lambda: restore(vae4, ce_unet, vae4)),
            ("OSEDiff restorer (E8 + UNet + D8)", (vae8, unet), lr, lambda: restore(vae8, unet, vae8)),
            # the paper's ablations (Tables 5 and 7; docs/ablations.md): T1/T2 share TVT's architecture
            ("V1 restorer (E4-V1 + CE-UNet + D4-V1)", (vae_v1, ce_unet), lr, lambda: restore(vae_v1, ce_unet, vae_v1)),
            ("V2 restorer (E4-V2 + CE-UNet + D4-V2)", (vae_v2, ce_unet), lr, lambda: restore(vae_v2, ce_unet, vae_v2)),
            ("S2 restorer (E8 + UNet + D8 with E8 skips)", (skip_vae8, unet), lr,
             lambda: restore_with_skips(skip_vae8, unet)),
            (f"S3 restorer (E8 + UNet + D8, {S3_LATENT_CHANNELS} latent channels)", (wide_vae8, wide_unet), lr,
             lambda: restore(wide_vae8, wide_unet, wide_vae8)),
            (f"S4 restorer (E4 + UNet @ {d4}² + D4)", (vae4, unet), lr, lambda: restore(vae4, unet, vae4)),
            (f"S5 restorer (E4 + {1 - PAPER_KEEP:.0%}-pruned UNet @ {d4}² + D4)", (vae4, pruned), lr,
             lambda: restore(vae4, pruned, vae4)),
        ]
        conditioner = StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_PAPER)
        stablesr_step = SFTConditionedUNet(unet, conditioner)
        cfw = CFWAutoencoder(vae8, CFWModule.for_vae(vae8))
        image8 = torch.empty(1, 3, size, size)
        rows += [
            (f"StableSR step (encoder + SFT + UNet) @ {d8}²", (conditioner, unet), _shape(1, 4, d8, d8),
             lambda: stablesr_step(latent8, 1, prompt, latent8)),
            ("StableSR CFW decoder (E8 features + D8 + CFW)", (cfw.cfw, vae8.decoder, vae8.post_quant_conv),
             _shape(1, 4, d8, d8), lambda: cfw(latent8, image8, 1.0)),
        ]
        table = []
        for name, modules, input_shape, run in rows:
            macs, attention_macs = count_macs(run)
            table.append(
                {
                    "name": name,
                    "params_M": round(_millions(*modules), 3),
                    "gmacs": round(macs / 1e9, 2),
                    "attn_gmacs": round(attention_macs / 1e9, 2),
                    "input_shape": input_shape,
                }
            )
    by_name = {row["name"]: row for row in table}
    encoder, step, decoder = (by_name[n] for n in (
        "VAE-D8 encoder", f"StableSR step (encoder + SFT + UNet) @ {d8}²",
        "StableSR CFW decoder (E8 features + D8 + CFW)"))
    steps = PAPER_SAMPLING_STEPS
    table.append({  # one forward of each part, so composed rather than counted 200 times over
        "name": f"StableSR restorer (E8 + {steps} steps + CFW-D8)",
        "params_M": round(_millions(vae8, unet, conditioner, cfw.cfw), 3),
        "gmacs": round(encoder["gmacs"] + steps * step["gmacs"] + decoder["gmacs"], 2),
        "attn_gmacs": round(encoder["attn_gmacs"] + steps * step["attn_gmacs"] + decoder["attn_gmacs"], 2),
        "input_shape": lr,
    })
    return table


#: Measured latency (s per 512² output) of the paper-size restorers, by architecture row and
#: device: ``bench/bench_latency.py --sd-scale --sd-size 512`` (random weights: latency does not
#: depend on them), median of interleaved runs. Add a device when it is measured.
SD_SIZE_LATENCY_S: dict[str, dict[str, float]] = {
    "CPU, 2 threads": {  # issue 16's measurement, torch 2.x on this project's 2-core CI machine
        "TVT restorer (E4 + CE-UNet + D4)": 29.0,
        "OSEDiff restorer (E8 + UNet + D8)": 21.4,
    },
}

#: why conv+linear MACs and latency rank TVT and OSEDiff differently (Table 4's note)
RANKING_NOTE = (
    "Rankings differ because conv + linear MACs leave attention out: TVT's CE-UNet replicates the UNet's "
    "first and last blocks at 2× latent resolution, where self-attention runs over 4× more tokens, so TVT "
    "needs fewer conv MACs than OSEDiff but far more attention MACs — and time."
)


def table4(
    complexity: Mapping[str, Mapping],
    paper_rows: Mapping[str, Mapping],
    *,
    test_set: str,
    device: str,
    sd_latency: Mapping[str, Mapping[str, float]] = SD_SIZE_LATENCY_S,
) -> tuple[list[tuple[str, str, bool | None]], list[dict], list[str]]:
    """Table 4 as users need it: both MAC accountings and both latencies, each labelled.

    Args:
        complexity: per method, what evaluation measured (``steps``, ``params_M``, ``latency_ms``).
        paper_rows: per method, its paper-size row of :func:`compute_complexity` (absent: unknown).
        test_set, device: where ``latency_ms`` was measured.
        sd_latency: measured paper-size latency per device (:data:`SD_SIZE_LATENCY_S`).

    Returns (columns as (key, label, higher_is_better), rows, notes).
    """
    devices = list(sd_latency)
    columns = [  # (key, label, higher_is_better: None = not ranked); lower is better for costs
        ("steps", "Steps", False),
        ("params_M", "Params (M)", False),
        ("paper_params_M", "Paper-size params (M)", None),
        ("paper_gmacs", "Paper-size conv+linear MACs (G)", False),
        ("paper_attn_gmacs", "Paper-size attention MACs (G)", False),
        ("paper_all_gmacs", "Paper-size all MACs (G)", False),
        ("latency_ms", f"Latency, evaluated model, {device} (ms/img)", False),
        *((f"sd_latency_s:{name}", f"Paper-size latency, {name} (s/img)", False) for name in devices),
    ]
    rows = []
    for method, info in complexity.items():
        paper = paper_rows.get(method) or {}
        macs, attention = paper.get("gmacs"), paper.get("attn_gmacs")
        row = {
            "method": method,
            "steps": info.get("steps"),
            "params_M": info.get("params_M"),
            "paper_params_M": paper.get("params_M"),
            "paper_gmacs": macs,
            "paper_attn_gmacs": attention,
            "paper_all_gmacs": None if macs is None or attention is None else round(macs + attention, 2),
            "latency_ms": info.get("latency_ms"),
        }
        for name in devices:
            row[f"sd_latency_s:{name}"] = sd_latency[name].get(paper.get("name", ""))
        rows.append(row)
    notes = [
        (
            "Steps: denoising steps (bicubic 0; unknown for external results). Params: the evaluated model. "
        "Paper-size: the method's SD 2.1-base-scale architecture at 512² output (tvt.complexity, counted on the "
        "meta device): conv+linear MACs (what SR papers call FLOPs), attention MACs (QKᵀ and softmax·V) and "
        f"their sum. Latency, evaluated model: median per image over the {test_set} test images on {device}; "
        "not measured for external results. Paper-size latency: bench/bench_latency.py --sd-scale --sd-size 512 "
            "(random weights), per device measured."
        ),
        RANKING_NOTE,
    ]
    return columns, rows, notes


def to_markdown(rows: list[dict]) -> str:
    """GitHub table of :func:`compute_complexity` rows, followed by the counting conventions."""
    lines = [
        "| Network | Input | Params (M) | MACs (G) | Attention MACs (G) | Total (TFLOPs) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        total_tflops = 2 * (r["gmacs"] + r["attn_gmacs"]) / 1e3
        lines.append(
            f"| {r['name']} | {r['input_shape']} | {r['params_M']:.2f} | {r['gmacs']:.1f} "
            f"| {r['attn_gmacs']:.1f} | {total_tflops:.3f} |"
        )
    return "\n".join(lines) + "\n\n" + NOTES + "\n"


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    print(to_markdown(compute_complexity()))
