"""`tvt import stablesr`: StableSR's two Lightning files (LDM naming) convert into our conditioner
and CFW; the frozen SD parts are proven identical to the snapshot; every key is accounted for."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tvt import compat

compat.apply()

from official_support import save_lightning_checkpoint
from training_support import one_thread, save_tiny_prior  # noqa: F401

from tvt.models.cfw import CFWModule
from tvt.models.restorer import sd_noise_scheduler
from tvt.models.saved import load_restorer
from tvt.models.sd_configs import STABLESR_ENCODER_MINI
from tvt.models.stablesr import StableSRConditioner
from tvt.official.checkpoint import OfficialFormatError
from tvt.official.stablesr import import_stablesr

HEADS = STABLESR_ENCODER_MINI["num_attention_heads"]
# EncoderUNetModelWT with the mini config (1 ResBlock per level, attention at the three finest levels),
# written out by hand: official prefix -> ours
ENCODER_LAYOUT = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "input_blocks.1.0.": "down_blocks.0.resnets.0.",
    "input_blocks.1.1.": "down_blocks.0.attentions.0.",
    "input_blocks.2.0.op.": "down_blocks.0.downsamplers.0.conv.",
    "input_blocks.3.0.": "down_blocks.1.resnets.0.",
    "input_blocks.3.1.": "down_blocks.1.attentions.0.",
    "input_blocks.4.0.op.": "down_blocks.1.downsamplers.0.conv.",
    "input_blocks.5.0.": "down_blocks.2.resnets.0.",
    "input_blocks.5.1.": "down_blocks.2.attentions.0.",
    "input_blocks.6.0.op.": "down_blocks.2.downsamplers.0.conv.",
    "input_blocks.7.0.": "down_blocks.3.resnets.0.",
    "middle_block.0.": "mid_block.resnets.0.",
    "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "mid_block.resnets.1.",
    **{f"fea_tran.{i}.": f"feature_heads.{i}." for i in range(4)},
}
RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# SD's UNet (2 ResNets per level) in LDM numbering: input blocks 1,2,4,5,7,8,10,11; output blocks 0-11
SPADE_BLOCKS = {
    **{f"down_blocks_{i // 2}_resnets_{i % 2}": f"input_blocks.{1 + 3 * (i // 2) + i % 2}.0" for i in range(8)},
    "mid_block_resnets_0": "middle_block.0",
    "mid_block_resnets_1": "middle_block.2",
    **{f"up_blocks_{m // 3}_resnets_{m % 3}": f"output_blocks.{m}.0" for m in range(12)},
}
SPADE = {"norm": "param_free_norm", "shared.0": "mlp_shared.0", "scale": "mlp_gamma", "shift": "mlp_beta"}


def randomised(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def legacy_qkv(q, k, v):
    """(3C, C, 1) conv1d weight (or (3C,) bias) in QKVAttentionLegacy's per-head [q, k, v] order."""
    per_head = [t.reshape(HEADS, t.shape[0] // HEADS, *t.shape[1:]) for t in (q, k, v)]
    fused = torch.cat(per_head, dim=1).reshape(3 * q.shape[0], *q.shape[1:])
    return fused.unsqueeze(-1) if fused.dim() == 2 else fused


def official_encoder_state(encoder_state):
    out = {}
    for official, ours in ENCODER_LAYOUT.items():
        keys = {k.removeprefix(ours): v for k, v in encoder_state.items() if k.startswith(ours)}
        if "to_q.weight" in keys:  # AttentionBlock: norm, qkv (conv1d), proj_out (conv1d)
            for t in ("weight", "bias"):
                out[f"{official}norm.{t}"] = keys[f"group_norm.{t}"]
                out[f"{official}qkv.{t}"] = legacy_qkv(keys[f"to_q.{t}"], keys[f"to_k.{t}"], keys[f"to_v.{t}"])
                value = keys[f"to_out.0.{t}"]
                out[f"{official}proj_out.{t}"] = value.unsqueeze(-1) if t == "weight" else value
        elif any(k.startswith("conv1.") for k in keys):
            for leaf, value in keys.items():
                module, _, t = leaf.rpartition(".")
                out[f"{official}{RESBLOCK[module]}.{t}"] = value
        else:
            out.update({official + leaf: value for leaf, value in keys.items()})
    assert len(out) == len(encoder_state) - 4 * 4  # 4 attentions: 10 tensors each become 6
    return out


def official_cfw_state(cfw, vae):
    out = {
        f"encoder.{k}" if not k.startswith(("encoder.", "decoder.")) else k: v for k, v in vae.state_dict().items()
    }  # SD's frozen VAE (its names are not interpreted)
    shortcut = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "conv_out"}
    for index, level in enumerate(cfw.levels):
        for key, value in cfw.fusions[index].state_dict().items():
            part, _, rest = key.partition(".")
            if part == "body":
                out[f"decoder.fusion_layer_{level}.encode_enc_2.{rest}"] = value
            else:
                module, _, t = rest.rpartition(".")
                enc = "encode_enc_1" if part == "merge" else "encode_enc_3"
                out[f"decoder.fusion_layer_{level}.{enc}.{shortcut[module]}.{t}"] = value
    out["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("stablesr_release")
    vae, unet = save_tiny_prior(root / "sd")
    conditioner = randomised(
        StableSRConditioner.for_unet(unet, STABLESR_ENCODER_MINI, sft_hidden_channels=16, sft_norm_groups=32), seed=1
    )
    cfw = randomised(CFWModule.for_vae(vae, num_rrdb_blocks=1, growth_channels=8), seed=2)
    scheduler = sd_noise_scheduler()
    state = {
        f"structcond_stage_model.{k}": v
        for k, v in official_encoder_state(
            {k.removeprefix("encoder."): v for k, v in conditioner.state_dict().items() if k.startswith("encoder.")}
        ).items()
    }
    for ours, block in SPADE_BLOCKS.items():
        for module, official in SPADE.items():
            for t in ("weight", "bias"):
                state[f"model.diffusion_model.{block}.spade.{official}.{t}"] = (
                    conditioner.sft[ours].get_submodule(module).state_dict()[t]
                )
    state.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    state.update(
        {
            f"first_stage_model.{k}": v.reshape(*v.shape, 1, 1) if ".to_" in k and v.dim() == 2 else v
            for k, v in vae.state_dict().items()
        }
    )  # LDM's attention q/k/v are 1x1 convs
    state["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 8)
    state.update(
        betas=scheduler.betas,
        alphas_cumprod=scheduler.alphas_cumprod,
        sqrt_alphas_cumprod=scheduler.alphas_cumprod.sqrt(),
        scale_factor=torch.tensor(0.18215),
    )
    save_lightning_checkpoint(root / "stablesr_000117.ckpt", state)
    save_lightning_checkpoint(root / "vqgan_cfw_00011.ckpt", official_cfw_state(cfw, vae))
    return root, conditioner, cfw, state


def convert(root, out, **files):
    paths = {"ckpt": root / "stablesr_000117.ckpt", "cfw_ckpt": root / "vqgan_cfw_00011.ckpt", **files}
    return import_stablesr(**paths, sd_dir=root / "sd", out_dir=out, encoder_config=STABLESR_ENCODER_MINI, steps=4)


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    root, *_ = release
    return convert(root, tmp_path_factory.mktemp("stablesr_official") / "restorer")


def test_every_key_is_converted_verified_or_ignored_with_a_reason(release, imported):
    _, _, _, state = release
    diffusion, cfw = imported[1]["sources"]
    ignored = {entry["reason"].split(" ")[0]: entry["keys"] for entry in diffusion["ignored"]}
    assert diffusion["keys"] == len(state) == diffusion["consumed"] + 2
    assert ignored == {"schedule": 1, "SD": 1}  # sqrt_alphas_cumprod; the text encoder
    assert cfw["keys"] == cfw["consumed"] + 1 and "discriminator" in cfw["ignored"][0]["reason"]


def test_the_restorer_holds_the_released_conditioner_and_cfw(release, imported):
    _, conditioner, cfw, _ = release
    restorer = load_restorer(imported[0])
    assert restorer.method == "stablesr_official" and restorer.conditioner.config.sft_norm_groups == 32
    for ours, theirs in ((restorer.conditioner, conditioner), (restorer.cfw, cfw)):
        expected = theirs.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, expected[key]), key
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(restorer(lr, w=0.0), restorer(lr, w=1.0))  # the CFW fusion is live


def test_attention_and_spade_compute_what_the_official_modules_compute(release, imported):
    _, _, _, state = release
    restorer = load_restorer(imported[0]).eval()
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    # AttentionBlock + QKVAttentionLegacy (openaimodel.py), re-stated from the file's tensors
    prefix = "structcond_stage_model.input_blocks.1.1."
    h = F.group_norm(
        x,
        STABLESR_ENCODER_MINI["norm_num_groups"],
        state[prefix + "norm.weight"],
        state[prefix + "norm.bias"],
        eps=1e-5,
    ).reshape(2, 16, -1)
    qkv = F.conv1d(h, state[prefix + "qkv.weight"], state[prefix + "qkv.bias"])
    q, k, v = qkv.reshape(2 * HEADS, 3 * 16 // HEADS, -1).split(16 // HEADS, dim=1)
    scale = 1 / math.sqrt(math.sqrt(16 // HEADS))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(2, 16, -1)
    official = x + F.conv1d(a, state[prefix + "proj_out.weight"], state[prefix + "proj_out.bias"]).reshape(x.shape)
    with torch.no_grad():
        ours = restorer.conditioner.encoder.down_blocks[0].attentions[0](x)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)
    # SPADE (ldm/modules/spade.py): GroupNorm32 of the feature, then * (1 + gamma) + beta
    prefix = "model.diffusion_model.output_blocks.4.0.spade."
    feature = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(2))
    condition = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    actv = F.relu(
        F.conv2d(condition, state[prefix + "mlp_shared.0.weight"], state[prefix + "mlp_shared.0.bias"], padding=1)
    )
    gamma = F.conv2d(actv, state[prefix + "mlp_gamma.weight"], state[prefix + "mlp_gamma.bias"], padding=1)
    beta = F.conv2d(actv, state[prefix + "mlp_beta.weight"], state[prefix + "mlp_beta.bias"], padding=1)
    normalized = F.group_norm(
        feature, 32, state[prefix + "param_free_norm.weight"], state[prefix + "param_free_norm.bias"], eps=1e-5
    )
    with torch.no_grad():
        ours = restorer.conditioner.sft["up_blocks_1_resnets_1"](feature, condition)
    torch.testing.assert_close(ours, normalized * (1 + gamma) + beta, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_damaged_or_foreign_files_are_refused_by_name(release, tmp_path):
    root, _, _, state = release
    damaged = dict(state)
    damaged.pop("model.diffusion_model.input_blocks.4.0.spade.mlp_gamma.bias")
    save_lightning_checkpoint(tmp_path / "damaged.ckpt", damaged)
    with pytest.raises(OfficialFormatError, match=r"1 missing \(sft\.down_blocks_1_resnets_0\.scale\.bias\)"):
        convert(root, tmp_path / "out", ckpt=tmp_path / "damaged.ckpt")
    other_sd = dict(state)
    key = "model.diffusion_model.mid_block.resnets.0.conv1.weight"
    other_sd[key] = other_sd[key] + 1e-3
    save_lightning_checkpoint(tmp_path / "other_sd.ckpt", other_sd)
    with pytest.raises(OfficialFormatError, match=r"1 of \d+ tensors are not in the reference") as error:
        convert(root, tmp_path / "out", ckpt=tmp_path / "other_sd.ckpt")
    assert key in str(error.value)
    with pytest.raises(OfficialFormatError, match="structcond_stage_model"):
        convert(root, tmp_path / "out", ckpt=root / "vqgan_cfw_00011.ckpt")
