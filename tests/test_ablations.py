"""The paper's ablations as named variants: declaration, keys, isolation of their outputs (docs/ablations.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from training_support import make_pairs_dir, one_thread, save_tiny_prior  # noqa: F401

from tvt import config, stages
from tvt.runner import run_stage

CI = config.REPO_ROOT / "config" / "ci.yaml"


def with_variants(cfg: dict, variants: dict, **isr_vae) -> dict:
    """``cfg`` plus ``vae_variants`` and, per name in ``isr_vae``, an ISR entry copied from TVT's reading that VAE."""
    out = copy.deepcopy(cfg)
    out["vae_variants"] = variants
    for name, vae in isr_vae.items():
        out["isr"][name] = {**out["isr"]["tvt"], "vae": vae}
    return config.validate(out)


def keys(cfg: dict) -> dict[str, str]:
    return {s.name: s.key for s in stages.build_stages(cfg)}


def test_variants_get_stages_of_their_own_and_leave_the_main_keys_alone():
    base = config.load(CI)
    cfg = with_variants(
        base,
        {"v1": {"decoder_transfer": {"architecture": "v1"}}, "t1": {"decoder_transfer": {"transfer": False}}},
        v1="v1",
        t1="t1",
    )
    before, after = keys(base), keys(cfg)
    assert {n: after[n] for n in before if n != "evaluate"} == {n: k for n, k in before.items() if n != "evaluate"}
    registry = {s.name: s for s in stages.build_stages(cfg)}
    # two-stage transfer: both stages; end to end (T1): the decoder stage is the finished VAE
    assert {"decoder_transfer_v1", "encoder_transfer_v1", "decoder_transfer_t1"} <= set(registry)
    assert "encoder_transfer_t1" not in registry
    assert registry["encoder_transfer_v1"].needs == ("degrade", "decoder_transfer_v1")
    assert registry["isr_v1"].needs[-1] == "encoder_transfer_v1"
    assert registry["isr_t1"].needs[-1] == "decoder_transfer_t1"
    assert registry["isr_tvt"].needs[-1] == "encoder_transfer"
    folders = [registry[n].folder for n in ("decoder_transfer", "decoder_transfer_v1", "decoder_transfer_t1")]
    assert len(set(folders)) == 3
    # a variant's parameters are its base section with its own values merged in ...
    params = registry["decoder_transfer_v1"].params(cfg)["vae_variants.v1.decoder_transfer"]
    assert params == {**base["decoder_transfer"], "architecture": "v1"}
    # ... so editing the base reruns the variants that inherit the value, not one that overrides it
    edited = copy.deepcopy(cfg)
    edited["decoder_transfer"]["lr"] = 1e-3
    edited["vae_variants"]["t1"]["decoder_transfer"]["lr"] = cfg["decoder_transfer"]["lr"]
    changed = {n for n, k in keys(edited).items() if k != after[n]}
    assert {"decoder_transfer", "decoder_transfer_v1", "encoder_transfer_v1", "isr_v1"} <= changed
    assert not changed & {"decoder_transfer_t1", "isr_t1"}
    # dvc.yaml tracks both sections a variant reads
    dvc = stages.dvc_yaml(cfg)["stages"]["decoder_transfer_v1"]
    assert dvc["params"] == ["mode", "seed", "decoder_transfer", "vae_variants.v1.decoder_transfer"]


S3_VAE = {"decoder_transfer": {"architecture": "d8_c8", "transfer": False}}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["vae_variants"].update(x={"decoder_transfer": {"architecture": "v9"}}),
            "vae_variants.x.decoder_transfer.architecture: 'v9' is not one of",
        ),
        (
            lambda c: c["vae_variants"].update(x={"decoder_transfer": {"lr_schedule": 1}}),
            "vae_variants.x.decoder_transfer.lr_schedule: unknown key",
        ),
        (lambda c: c["vae_variants"].update(x={"decoder": {}}), "vae_variants.x.decoder: unknown key"),
        (lambda c: c["isr"]["tvt"].update(vae="v3"), "isr.tvt.vae: unknown VAE variant 'v3' (vae_variants: t2)"),
        (lambda c: c["isr"]["osediff"].update(vae="t2"), "isr.osediff.vae: names a VAE-D4 variant"),
        (
            lambda c: c["vae_variants"]["t2"]["decoder_transfer"].update(transfer=True),
            "vae_variants.t2.decoder_transfer.latent_l2: the latent alignment",
        ),
        (
            lambda c: c["vae_variants"]["t2"].update(encoder_transfer={"lr": 1e-4}),
            "vae_variants.t2.encoder_transfer: never read",
        ),
        (lambda c: c["isr"]["tvt"].update(vae_skips=True), "isr.tvt.vae_skips: the skips are S2's, on SD's VAE-D8"),
        (lambda c: c["isr"]["osediff"].update(vae_skips="yes"), "isr.osediff.vae_skips: expected boolean"),
        (
            lambda c: c["vae_variants"].update(s3={"decoder_transfer": {"architecture": "d8_c8"}}),
            "vae_variants.s3.decoder_transfer.architecture: 'd8_c8' (S3) widens the prior's VAE-D8",
        ),
        (
            lambda c: (c["vae_variants"].update(s3=S3_VAE), c["isr"]["tvt"].update(vae="s3")),
            "isr.tvt.vae: names a VAE-D8 variant (d8_c8), which only method 'osediff' reads",
        ),
        (
            lambda c: (c["vae_variants"].update(s3=S3_VAE), c["isr"]["osediff"].update(vae="s3", unet="pruned")),
            "isr.osediff.unet: the 8-channel VAE-D8 (d8_c8) goes with the full UNet",
        ),
    ],
)
def test_variant_errors_name_the_key(edit, message):
    cfg = copy.deepcopy(config.load(CI))
    cfg["vae_variants"] = {"t2": {"decoder_transfer": {"transfer": False, "latent_l2": 1.0}}}
    config.validate(copy.deepcopy(cfg))
    edit(cfg)
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate(cfg)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_no_variant_touches_another_variants_outputs(tmp_path, monkeypatch, perceptual_weights, random_lpips):
    """Two VAE variants of one config train into distinct folders; rerunning one (unchanged: a no-op;
    with more steps: a new key) leaves every file of the other byte-identical, its mtime unchanged."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TVT_WEIGHTS_DIR", str(perceptual_weights))
    cfg = copy.deepcopy(config.load(CI))
    tiny = {"steps": 2, "batch_size": 2, "disc_start": 1, "sample_every": 0}
    cfg["vae_variants"] = {
        "v2": {"decoder_transfer": {**tiny, "architecture": "mini"}},
        "t2": {"decoder_transfer": {**tiny, "transfer": False, "latent_l2": 1.0}},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    registry = {s.name: s for s in stages.build_stages(config.load(path))}
    make_pairs_dir(Path(registry["degrade"].folder), 32, {"train": 4, "val": 2})  # upstream outputs, in place
    save_tiny_prior(Path(registry["prior"].folder))
    a, b = (registry[f"decoder_transfer_{n}"] for n in ("v2", "t2"))
    for stage in (a, b):
        run_stage(stage.name, path)
    assert a.folder != b.folder and a.is_built() and b.is_built()
    other = _files(Path(b.folder))
    assert "diffusion_pytorch_model.safetensors" in other
    first = _files(Path(a.folder))
    run_stage(a.name, path)  # unchanged: nothing rebuilt
    assert _files(Path(a.folder)) == first
    cfg["vae_variants"]["v2"]["decoder_transfer"]["steps"] = 3
    path.write_text(yaml.safe_dump(cfg))
    rerun = stages.stage_by_name(config.load(path), a.name)
    run_stage(a.name, path)
    assert rerun.folder != a.folder and rerun.is_built()
    assert _files(Path(a.folder)) == first  # the old key's output is kept ...
    assert _files(Path(b.folder)) == other  # ... and the other variant's is untouched
    assert stages.stage_by_name(config.load(path), b.name).key == b.key


# ---- S5: the pruned UNet ------------------------------------------------------------------


@pytest.mark.slow
def test_the_pruned_unet_keeps_the_units_that_matter_and_computes_what_the_prior_did_with_them(tmp_path):
    """Zero what reads a quarter of every ResNet's hidden groups and every feed-forward's inner units in
    the prior: those are the units the L1 rule must drop, and the pruned UNet must then compute exactly
    what the prior computes; the pruned network is smaller and round-trips through save/from_pretrained."""
    from tvt import compat

    compat.apply()
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    from tvt.models.pruned_unet import PrunedUNet
    from tvt.models.sd_configs import MINI_UNET

    torch.manual_seed(0)
    prior = UNet2DConditionModel(**MINI_UNET).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in prior.modules():
            if isinstance(module, ResnetBlock2D):
                groups, per_group = module.norm2.num_groups, module.norm2.num_channels // module.norm2.num_groups
                for g in torch.randperm(groups, generator=generator)[: groups // 4].tolist():
                    module.conv2.weight[:, g * per_group : (g + 1) * per_group] = 0
            elif isinstance(module, FeedForward):
                inner = module.net[2].in_features
                module.net[2].weight[:, torch.randperm(inner, generator=generator)[: inner // 4]] = 0
    pruned = PrunedUNet.from_unet(prior).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(pruned) < 0.9 * count(prior)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, MINI_UNET["cross_attention_dim"])
    with torch.no_grad():
        expected, got = prior(x, 10, context).sample, pruned(x, 10, context).sample
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        pruned.save_pretrained(tmp_path / "s5")
        again = PrunedUNet.from_pretrained(tmp_path / "s5").eval()
        assert torch.allclose(again(x, 10, context).sample, got, atol=1e-5)
    # a prior whose dropped units do matter is not reproduced: the test above can fail
    unzeroed = UNet2DConditionModel(**MINI_UNET).eval()
    with torch.no_grad():
        assert not torch.allclose(
            PrunedUNet.from_unet(unzeroed)(x, 10, context).sample, unzeroed(x, 10, context).sample, atol=1e-3
        )


# ---- the ablation configs ----------------------------------------------------------------

ABLATION_CONFIGS = {
    "ablations-ci.yaml": "ci.yaml",
    "ablations.yaml": "config.yaml",
    "paper-ablations.yaml": "paper.yaml",
}
ABLATION_METHODS = ["v1", "v2", "t1", "t2", "s2", "s3", "s4", "s5"]
#: what an ablation entry may change of the entry it is ``like``
ABLATION_KEYS = {"vae", "unet", "vae_skips"}


@pytest.mark.parametrize(("name", "base"), ABLATION_CONFIGS.items())
def test_an_ablation_config_is_its_base_plus_the_ablations(name, base):
    """One source of truth: the file `extends` its base and states only the ablations; resolved, everything
    but the ablation entries is the base config's, value for value, and each entry is TVT's or OSEDiff's (S1)
    with one change."""
    raw = yaml.safe_load((config.REPO_ROOT / "config" / name).read_text())
    assert raw["extends"] == base and set(raw) == {"extends", "vae_variants", "isr", "evaluate"}
    cfg, reference = config.load(config.REPO_ROOT / "config" / name), config.load(config.REPO_ROOT / "config" / base)
    assert cfg["evaluate"]["methods"] == reference["evaluate"]["methods"] + ABLATION_METHODS
    assert set(cfg["vae_variants"]) == {"v1", "v2", "t1", "t2", "s3"}
    for method in ABLATION_METHODS:
        entry, like = cfg["isr"].pop(method), raw["isr"][method]["like"]
        changed = {k: v for k, v in entry.items() if reference["isr"][like].get(k) != v}
        assert len(changed) == 1 and set(changed) <= ABLATION_KEYS, (method, changed)  # one thing changed
    del cfg["vae_variants"]
    cfg["evaluate"]["methods"] = reference["evaluate"]["methods"]
    assert cfg == reference
    registry = {s.name: s for s in stages.build_stages(config.load(config.REPO_ROOT / "config" / name))}
    main = {s.name: s.key for s in stages.build_stages(reference)}
    assert all(registry[n].key == k for n, k in main.items() if n != "evaluate")  # the main outputs are shared


#: what config/ablations-quick.yaml may change: the training budget of a trained row, nothing of its recipe
BUDGET_KEYS = {"steps", "disc_start", "checkpoint_every", "sample_every"}


def _budget_changes(quick, full, path=()):
    """The (dotted key, full, quick) of every value that differs between two resolved configs."""
    if isinstance(quick, dict) and isinstance(full, dict):
        assert set(quick) == set(full), path
        return [c for k in quick for c in _budget_changes(quick[k], full[k], (*path, k))]
    return [] if quick == full else [(".".join(path), full, quick)]


def test_the_quick_ablation_config_cuts_every_trained_row_alike_and_shares_the_demo_stages():
    """The 30-minute ablation run is config/ablations.yaml with each trained row on a quarter of its steps:
    no recipe value changes, every ISR row (variants included, through `like:`) gets the same cut, and the
    stages it shares with `make demo` (data, degrade, the mini SD) keep config.yaml's keys."""
    root = config.REPO_ROOT / "config"
    raw = yaml.safe_load((root / "ablations-quick.yaml").read_text())
    assert raw["extends"] == "ablations.yaml"
    quick, full = config.load(root / "ablations-quick.yaml"), config.load(root / "ablations.yaml")
    changes = [c for c in _budget_changes(quick, full) if c != ("evaluate.claims", True, False)]  # the demo's table
    assert changes and {key.rsplit(".", 1)[1] for key, _, _ in changes} <= BUDGET_KEYS, changes
    steps = {key: (a, b) for key, a, b in changes if key.endswith(".steps") or key == "steps"}
    trained = ["decoder_transfer", "encoder_transfer", "stablesr.sft", "stablesr.cfw"]
    assert set(steps) == {f"{s}.steps" for s in trained} | {f"isr.{m}.steps" for m in full["isr"]}
    assert all(b * 4 == a for a, b in steps.values()), steps  # a quarter, everywhere alike
    registry = stages.build_stages(quick)
    for stage in (s for s in registry if s.name.startswith(("decoder_transfer_", "encoder_transfer_"))):
        (section,) = (v for k, v in stage.params(quick).items() if k.startswith("vae_variants."))
        assert section["steps"] == quick[stage.name.rsplit("_", 1)[0]]["steps"], stage.name  # variants too
    shared = {"data", "degrade", "prior", "complexity"}
    demo = keys(config.load(root / "config.yaml"))
    assert {n: k for n, k in keys(quick).items() if n in shared} == {n: demo[n] for n in shared}


def test_the_paper_ablations_ask_for_gpus():
    registry = stages.build_stages(config.load(config.REPO_ROOT / "config" / "paper-ablations.yaml"))
    variants = [s for s in registry if s.name.endswith(tuple(f"_{m}" for m in ABLATION_METHODS))]
    assert len(variants) == 8 + 7  # isr_<m>, and the VAE stages of v1, v2 (two each), t1, t2, s3
    assert all(s.resources.gpus == 8 and s.trains for s in variants)


def _mtimes(root: Path, folders: list[str]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in (root / f).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_one_run_of_the_ci_ablation_config_fills_tables_5_6_7(ci_pipeline):
    """`snakemake all` with config/ablations-ci.yaml where config/ci.yaml's pipeline has run: exactly the
    variants train (ci.yaml's outputs are reused), one evaluation writes the three ablation tables with a
    number in every row, and each row's model is an MLflow run tagged with its key."""
    import json
    import shutil

    import mlflow
    from workflow_support import SNAKEMAKE, _run

    project = ci_pipeline.fresh()
    shutil.copy2(CI.with_name("ablations-ci.yaml"), project / "config" / "config.yaml")
    cfg = config.load(project / "config" / "config.yaml")
    registry = {s.name: s for s in stages.build_stages(cfg)}
    base = {s.name: s for s in stages.build_stages(config.load(CI))}
    built = {name for name, stage in registry.items() if stage.is_built(project)}
    assert built == set(base) - {"evaluate"}, built ^ (set(base) - {"evaluate"})
    before = _mtimes(project, [registry[name].folder for name in built])
    _run([*SNAKEMAKE, "--cores", "2", "all"], project)
    assert all(registry[name].is_built(project) for name in registry)
    assert _mtimes(project, [registry[name].folder for name in built]) == before  # nothing of ci.yaml reran
    tables = project / registry["evaluate"].folder / "tables"
    expected = {
        "ablation_vae": ["v1", "v2", "tvt"],
        "ablation_transfer": ["t1", "t2", "tvt"],
        "ablation_design": ["osediff", "s2", "s3", "s4", "s5", "tvt"],
    }
    for name, methods in expected.items():
        doc = json.loads((tables / f"{name}.json").read_text())
        assert [r["method"] for r in doc["rows"]] == methods, name
        assert all(isinstance(r["psnr_y"], float) for r in doc["rows"]), doc["rows"]
        assert (tables / f"{name}.md").read_text().count("\n|") >= len(methods) + 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tvt-ci").experiment_id])
    keys = {r.data.tags.get("tvt.stage"): r.data.tags.get("tvt.key") for r in runs if r.info.status == "FINISHED"}
    for method in ABLATION_METHODS:
        assert keys[f"isr_{method}"] == registry[f"isr_{method}"].key


def _generator(variant: str, method: str, vae, /, **changes):
    """A mini ISR generator of ``method``'s recipe with ``changes`` (rank-2 LoRA) on ``vae`` and a fresh mini
    teacher: what the ablation's isr stage builds. Returns (restorer, teacher, section)."""
    import torch
    from diffusers import UNet2DConditionModel
    from test_isr import isr_cfg

    from tvt.models.restorer import sd_noise_scheduler
    from tvt.models.sd_configs import MINI_UNET
    from tvt.training import isr

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**MINI_UNET)
    section = {**isr_cfg(method)["isr"][method], **changes, "lora_rank": 2}
    prompt = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])
    return isr.build_generator(variant, section, vae, teacher, sd_noise_scheduler(), prompt, 4), teacher, section


@pytest.mark.slow
def test_s5_trains_lora_and_conv_in_of_the_pruned_unet_and_saves_a_restorer_that_reloads(tmp_path):
    from tvt import compat

    compat.apply()
    import torch

    from tvt.models.pruned_unet import PrunedUNet
    from tvt.models.restorer import OneStepRestorer
    from tvt.models.sd_configs import MINI_VAE_D4
    from tvt.models.vae_d4 import VAED4

    restorer, _, _ = _generator("s5", "tvt", VAED4(**MINI_VAE_D4), unet="pruned")
    assert isinstance(restorer.unet, PrunedUNet)
    trainable = {n for n, p in restorer.named_parameters() if p.requires_grad}
    conv_in = {n for n in trainable if n.startswith("unet.unet.conv_in.") and ".lora_" not in n}
    assert {n.rsplit(".", 1)[1] for n in conv_in} == {"weight", "bias"}  # conv_in in full, as S4
    assert trainable - conv_in and all(".lora_" in n for n in trainable - conv_in)
    assert not any(n.startswith("vae.") for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero: nudge it so the merged save must carry it
        for name, param in restorer.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.05)
    restorer.eval()
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = restorer(lr)
        restorer.save_pretrained_dir(tmp_path / "s5")
        again = OneStepRestorer.from_pretrained_dir(tmp_path / "s5").eval()
        assert isinstance(again.unet, PrunedUNet)
        reloaded = again(lr)
        # LoRA merged into its base weights: the same function up to float rounding of the merge
        assert (reloaded - expected).abs().max() < 1e-4, (reloaded - expected).abs().max()


# ---- S2: VAE-D8 with skip connections -------------------------------------------------------


def _mini_s1_s2(seed: int = 0):
    """A mini OSEDiff (S1) restorer and the S2 restorer built from the very same weights."""
    from tvt import compat

    compat.apply()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tvt.models.restorer import build_osediff_restorer
    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8
    from tvt.models.skip_vae import SkipAutoencoderKL

    torch.manual_seed(seed)
    vae, unet = AutoencoderKL(**MINI_VAE_D8).eval(), UNet2DConditionModel(**MINI_UNET).eval()
    s1 = build_osediff_restorer(vae, unet).eval()
    s2 = build_osediff_restorer(SkipAutoencoderKL.from_vae(vae), unet).eval()
    return s1, s2


def test_s2_with_zero_skips_is_s1_and_a_nonzero_skip_changes_it(tmp_path):
    """Untrained (zero) skips leave SD's VAE exactly as it was, so S2 starts as S1, bit for bit; a skip with
    weights changes the output, and the skip weights save and reload with the restorer."""
    import torch

    from tvt.models.restorer import OneStepRestorer
    from tvt.models.skip_vae import SkipAutoencoderKL

    s1, s2 = _mini_s1_s2()
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = s1(lr)
        assert torch.equal(s2(lr), expected)
        with pytest.raises(ValueError, match="2 skip features for 4 levels"):
            s2.vae.decode(torch.zeros(1, 4, 8, 8), skips=[torch.zeros(1)] * 2)
        for level, conv in enumerate(s2.vae.skips):
            conv.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(level))
        changed = s2(lr)
        assert (changed - expected).abs().mean() > 1e-3
        s2.save_pretrained_dir(tmp_path / "s2")
        again = OneStepRestorer.from_pretrained_dir(tmp_path / "s2").eval()
        assert isinstance(again.vae, SkipAutoencoderKL)
        assert torch.allclose(again(lr), changed, atol=1e-6)
        s2.tile = 32  # the UNet tiled, the VAE whole: what `tvt sr` does to a large image
        assert s2(lr).shape == changed.shape


@pytest.mark.slow
def test_s2_trains_its_skips_with_the_restorer_and_a_trained_skip_changes_the_output():
    """build_generator with ``vae_skips``: OSEDiff's trainable set plus the skips; one optimiser step on the
    training loss moves the skips off zero and the restorer's output with them."""
    from tvt import compat

    compat.apply()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from test_isr import isr_cfg

    from tvt.models.restorer import sd_noise_scheduler
    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8
    from tvt.models.skip_vae import SkipAutoencoderKL
    from tvt.training import isr

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**MINI_UNET)
    section = {**isr_cfg("osediff")["isr"]["osediff"], "vae_skips": True, "lora_rank": 2}
    prompt = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])
    vae = SkipAutoencoderKL.from_vae(AutoencoderKL(**MINI_VAE_D8))
    restorer = isr.build_generator("s2", section, vae, teacher, sd_noise_scheduler(), prompt, 4)
    trainable = {n for n, p in restorer.named_parameters() if p.requires_grad}
    skips = {n for n in trainable if n.startswith("vae.skips.")}
    assert len(skips) == 2 * len(vae.skips)  # weight and bias of every level
    assert {n for n in trainable - skips if n.startswith("vae.")} and all(
        ".lora_" in n for n in trainable - skips if n.startswith("vae.")
    )  # OSEDiff's encoder LoRA, as S1
    lr, hr = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    restorer.eval()
    with torch.no_grad():
        before = restorer((lr + 1) / 2)
    sr, _ = isr.generate(restorer, lr, sample_posterior=False)
    torch.nn.functional.mse_loss(sr, hr).backward()
    assert all(vae.skips[i].weight.grad.abs().sum() > 0 for i in range(len(vae.skips)))
    torch.optim.SGD([p for p in restorer.parameters() if p.requires_grad], lr=1e-2).step()
    with torch.no_grad():
        assert (restorer((lr + 1) / 2) - before).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="isr.s2.vae_skips: the skips are S2's"):
        isr.check_section("s2", {**section, "method": "tvt", "unet": "ce"}, Path("d4"))


# ---- S3: VAE-D8 with 8 latent channels ------------------------------------------------------


def test_s3_widened_by_channel_interpolation_reproduces_s1():
    """The 8-channel VAE-D8 and the UNet with 8-channel ends, both widened by channel interpolation, give the
    S1 restorer's output; each piece maps P z to what the 4-channel one maps z to. A latent widened otherwise
    (zero-padded) is not read as z: the alignment is what makes the prior reusable."""
    import copy

    import torch

    from tvt.models.restorer import build_osediff_restorer
    from tvt.models.sd_configs import MINI_UNET
    from tvt.models.wide_latent import channel_interpolation, narrow_latent, widen_latent, widen_unet, widen_vae

    s1, _ = _mini_s1_s2()
    s3 = build_osediff_restorer(widen_vae(s1.vae), widen_unet(copy.deepcopy(s1.unet))).eval()
    p = channel_interpolation(4, 8)
    assert torch.equal(p[[0, -1]], torch.eye(4, dtype=p.dtype)[[0, -1]]) and torch.allclose(p.sum(1), p.new_ones(8))
    assert s3.vae.config.latent_channels == s3.unet.config.in_channels == s3.unet.config.out_channels == 8
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 7, MINI_UNET["cross_attention_dim"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lr_up = s1.upsample_lr(lr)
        z4, z8 = s1.encode_lr(lr_up), s3.encode_lr(lr_up)
        torch.testing.assert_close(z8, widen_latent(z4, 8), atol=1e-5, rtol=1e-4)
        eps4, eps8 = s1.unet(z4, 999, context).sample, s3.unet(z8, 999, context).sample
        torch.testing.assert_close(eps8, widen_latent(eps4, 8), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(narrow_latent(eps8, 4), eps4, atol=1e-5, rtol=1e-4)  # what the teacher sees
        expected = s1(lr)
        torch.testing.assert_close(s3(lr), expected, atol=1e-4, rtol=1e-4)
        padded = torch.cat([z4, torch.zeros_like(z4)], dim=1)
        assert (s3.unet(padded, 999, context).sample[:, :4] - eps4).abs().max() > 1e-2


@pytest.mark.slow
def test_s3_trains_both_widened_unet_ends_leaves_the_teacher_alone_and_reloads(tmp_path):
    from tvt import compat

    compat.apply()
    import torch
    from diffusers import AutoencoderKL

    from tvt.models.restorer import OneStepRestorer
    from tvt.models.sd_configs import MINI_VAE_D8
    from tvt.models.wide_latent import widen_vae
    from tvt.training import isr

    torch.manual_seed(0)  # the VAE is built before _generator seeds the teacher, as before
    restorer, teacher, section = _generator("s3", "osediff", widen_vae(AutoencoderKL(**MINI_VAE_D8)), vae="s3")
    trainable = {n for n, p in restorer.named_parameters() if p.requires_grad}
    ends = {n.replace(".base_layer", "") for n in trainable if ".lora_" not in n}  # LoRA wraps conv_out
    assert ends == {f"unet.{layer}.{p}" for layer in ("conv_in", "conv_out") for p in ("weight", "bias")}
    assert teacher.conv_in.in_channels == teacher.conv_out.out_channels == 4  # the VSD teacher keeps SD's ends
    with torch.no_grad():
        restorer.unet.conv_out.weight.normal_(std=0.05)  # as if trained: the save must carry it
    restorer.eval()
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = restorer(lr)
        restorer.save_pretrained_dir(tmp_path / "s3")
        again = OneStepRestorer.from_pretrained_dir(tmp_path / "s3").eval()
        assert again.unet.config.in_channels == again.vae.config.latent_channels == 8
        assert (again(lr) - expected).abs().max() < 1e-4
    with pytest.raises(ValueError, match="isr.s3.vae: needs the output of the VAE variant's stage"):
        isr.check_section("s3", section, None)
