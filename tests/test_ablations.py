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
ABLATION_METHODS = ["v1", "v2", "t1", "t2", "s4", "s5"]


@pytest.mark.parametrize(("name", "base"), ABLATION_CONFIGS.items())
def test_an_ablation_config_is_its_base_plus_the_ablations(name, base):
    """One source of truth: the file `extends` its base and states only the ablations; resolved, everything
    but the ablation entries is the base config's, value for value, and each entry is TVT's with one change."""
    raw = yaml.safe_load((config.REPO_ROOT / "config" / name).read_text())
    assert raw["extends"] == base and set(raw) == {"extends", "vae_variants", "isr", "evaluate"}
    cfg, reference = config.load(config.REPO_ROOT / "config" / name), config.load(config.REPO_ROOT / "config" / base)
    assert cfg["evaluate"]["methods"] == reference["evaluate"]["methods"] + ABLATION_METHODS
    assert set(cfg["vae_variants"]) == {"v1", "v2", "t1", "t2"}
    for method in ABLATION_METHODS:
        entry = cfg["isr"].pop(method)
        changed = {k: v for k, v in entry.items() if reference["isr"]["tvt"].get(k) != v}
        assert len(changed) == 1 and set(changed) <= {"vae", "unet"}, (method, changed)  # TVT with one thing changed
    del cfg["vae_variants"]
    cfg["evaluate"]["methods"] = reference["evaluate"]["methods"]
    assert cfg == reference
    registry = {s.name: s for s in stages.build_stages(config.load(config.REPO_ROOT / "config" / name))}
    main = {s.name: s.key for s in stages.build_stages(reference)}
    assert all(registry[n].key == k for n, k in main.items() if n != "evaluate")  # the main outputs are shared


def test_the_paper_ablations_ask_for_gpus():
    registry = stages.build_stages(config.load(config.REPO_ROOT / "config" / "paper-ablations.yaml"))
    variants = [s for s in registry if s.name.endswith(tuple(f"_{m}" for m in ABLATION_METHODS))]
    assert len(variants) == 6 + 6  # isr_<m>, and the VAE stages of v1, v2 (two each), t1, t2
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
        "ablation_design": ["osediff", "s4", "s5", "tvt"],
    }
    for name, methods in expected.items():
        doc = json.loads((tables / f"{name}.json").read_text())
        assert [r["method"] for r in doc["rows"]] == methods, name
        assert all(isinstance(r["psnr_y"], float) for r in doc["rows"]), doc["rows"]
        assert (tables / f"{name}.md").read_text().count("\n|") >= len(methods) + 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tvt-ci").experiment_id])
    keys = {r.data.tags.get("tvt.stage"): r.data.tags.get("tvt.key") for r in runs if r.info.status == "FINISHED"}
    for method in ("v1", "v2", "t1", "t2", "s4", "s5"):
        assert keys[f"isr_{method}"] == registry[f"isr_{method}"].key


def test_s5_trains_lora_and_conv_in_of_the_pruned_unet_and_saves_a_restorer_that_reloads(tmp_path):
    from tvt import compat

    compat.apply()
    import torch
    from diffusers import UNet2DConditionModel
    from test_isr import isr_cfg

    from tvt.models.pruned_unet import PrunedUNet
    from tvt.models.restorer import OneStepRestorer, sd_noise_scheduler
    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
    from tvt.models.vae_d4 import VAED4
    from tvt.training import isr

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**MINI_UNET)
    section = {**isr_cfg("tvt")["isr"]["tvt"], "unet": "pruned", "lora_rank": 2}
    prompt = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])
    restorer = isr.build_generator("s5", section, VAED4(**MINI_VAE_D4), teacher, sd_noise_scheduler(), prompt, 4)
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
