"""Config schema: both shipped configs validate; bad values give one line naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tvt import config
from tvt.config import ConfigError

MINI = config.load(config.REPO_ROOT / "config" / "config.yaml")


def test_shipped_configs_validate():
    paper = config.load(config.REPO_ROOT / "config" / "paper.yaml")
    assert MINI["mode"] == "mini" and paper["mode"] == "paper"
    assert paper["degrade"]["hr_size"] == 512 and paper["degrade"]["scale"] == 4


def _error(mutate) -> str:
    cfg = copy.deepcopy(MINI)
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        config.validate(cfg, "cfg.yaml")
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["degrade"].__setitem__("scale", -4), "cfg.yaml: degrade.scale: -4 must be >= 1"),
        (lambda c: c["degrade"].__setitem__("scale", "four"), "degrade.scale: expected integer, got str 'four'"),
        (lambda c: c["degrade"].__setitem__("hr_size", 130), "degrade.hr_size: 130 is not a multiple of degrade.scale"),
        (lambda c: c["data"].__setitem__("colour", 1), "data.colour: unknown key (allowed: datasets, photos"),
        (lambda c: c.__setitem__("trainig", {}), "trainig: unknown key"),
        (lambda c: c["degrade"]["first"].pop("noise_range"), "degrade.first: missing required key 'noise_range'"),
        (lambda c: c["degrade"]["second"].__setitem__("noise_range", [1, -2]), "degrade.second.noise_range[1]: -2 must be >= 0"),
        (lambda c: c["evaluate"].__setitem__("test_sets", ["realsr"]), "evaluate.test_sets[0]: unknown dataset 'realsr'"),
        (lambda c: c["evaluate"].__setitem__("methods", ["esrgan"]),
         "evaluate.methods[0]: 'esrgan' is neither 'bicubic' nor a trained model (isr section: tvt, osediff;"),
        (lambda c: c.pop("prior"), "needs the 'prior' section"),
        (lambda c: c["stablesr"]["sample"].__setitem__("w", 1.5), "stablesr.sample.w: 1.5 must be <= 1"),
        (lambda c: c["stablesr"]["sft"].__setitem__("encoder", "big"), "stablesr.sft.encoder: 'big' is not one of"),
        (lambda c: c["stablesr"]["cfw"].__setitem__("data", "online"),
         "stablesr.cfw.data: online degrades with StableSR's own parameters: add a stablesr.degrade section"),
        (lambda c: c["stablesr"].update(degrade=c["degrade"], cfw={**c["stablesr"]["cfw"], "data": "online"}),
         "stablesr.cfw.pairs: required when stablesr.cfw.data is online"),
        (lambda c: c["stablesr"]["cfw"].__setitem__("pairs", 0), "stablesr.cfw.pairs: 0 must be >= 1"),
        (lambda c: c["isr"]["osediff"].__setitem__("unet", "ce"), "isr.osediff.unet: 'ce' (CE-UNet) needs"),
        (lambda c: c["isr"]["tvt"].__setitem__("t_vsd", [750, 250]), "isr.tvt.t_vsd: [750, 250] is not an increasing"),
        (lambda c: c["isr"]["tvt"].__setitem__("lambda_vsd", -1), "isr.tvt.lambda_vsd: -1 must be >= 0"),
        (lambda c: c["isr"]["tvt"].__setitem__("lamda_vsd", 1), "isr.tvt.lamda_vsd: unknown key (allowed:"),
        (lambda c: c["isr"]["tvt"].__setitem__("prompt", "blip"), "isr.tvt.prompt: 'blip' is not one of [None, 'colour'"),
        (lambda c: c["isr"]["tvt"].__setitem__("prompt", "ram"), "isr.tvt: missing required key 'ram_weights'"),
        (lambda c: c["decoder_transfer"].__setitem__("stepz", 1), "decoder_transfer.stepz: unknown key"),
        (lambda c: c.pop("encoder_transfer"), "isr.tvt: method 'tvt' needs the 'encoder_transfer' section"),
        (lambda c: c["prior"].pop("vae"), "prior.vae: required when prior.source is 'train'"),
        (lambda c: c["data"].pop("photos"), "data.photos: required when data.source is 'mini'"),
        (lambda c: c["degrade"].__setitem__("kernel_prob", [1.0]), "degrade.kernel_prob: 1 probabilities for 6 kernels"),
        (lambda c: c["degrade"]["first"].__setitem__("gray_noise_prob", 1.5), "degrade.first.gray_noise_prob: 1.5 must be <= 1"),
        (lambda c: c["prior"]["vae"].__setitem__("lr_decay", "exp"), "prior.vae.lr_decay: 'exp' is not one of"),
        (lambda c: c["isr"]["tvt"].__setitem__("lr_warmup", -1), "isr.tvt.lr_warmup: -1 must be >= 0"),
        (lambda c: c["prior"]["vae"].__setitem__("adam_betas", [0.9, 1.0]), "prior.vae.adam_betas[1]: 1.0 must be < 1"),
        (lambda c: c["decoder_transfer"].__setitem__("adam_betas", [0.9]), "decoder_transfer.adam_betas: [0.9] is too short"),
        (lambda c: c["prior"]["vae"].__setitem__("posterior_logvar_init", 2), "prior.vae.posterior_logvar_init: 2 must be <= 0"),
        (lambda c: c["data"]["text"].__setitem__("page_size", 100), "data.text.page_size: 100 is not a multiple of 16"),
        (lambda c: c["evaluate"].__setitem__("tagger", {"tvt": "blip"}), "evaluate.tagger.tvt: 'blip' is not one of"),
        (lambda c: c["evaluate"].__setitem__("tagger", {"esrgan": "colour"}),
         "evaluate.tagger.esrgan: 'esrgan' is not in evaluate.methods"),
        (lambda c: c["evaluate"].__setitem__("tagger", {"stablesr": "colour"}),
         "evaluate.tagger.stablesr: 'stablesr' takes no prompt; only one-step restorers do (osediff, tvt)"),
        (lambda c: c["evaluate"].__setitem__("tagger", {"bicubic": "colour"}), "evaluate.tagger.bicubic: 'bicubic' takes no"),
        (lambda c: c["evaluate"].__setitem__("tagger", {"default": "dape"}),
         "evaluate.ram_weights: required when evaluate.tagger uses dape"),
        (lambda c: c["evaluate"].update(tagger={"tvt": "dape"}, ram_weights="ram.pth"),
         "evaluate.dape_weights: required when evaluate.tagger uses dape"),
    ],
)
def test_bad_values_name_the_key(mutate, expected):
    assert expected in _error(mutate)


def test_evaluation_taggers_default_to_the_null_prompt_and_skip_methods_without_one():
    assert config.evaluation_taggers(MINI) == {"osediff": "none", "tvt": "none"}  # bicubic, stablesr: no prompt
    tagged = copy.deepcopy(MINI)
    tagged["evaluate"].update(tagger={"default": "ram", "osediff": "colour"}, ram_weights="ram.pth")
    assert config.evaluation_taggers(config.validate(tagged)) == {"osediff": "colour", "tvt": "ram"}
    paper = config.load(config.REPO_ROOT / "config" / "paper.yaml")  # the official test scripts' DAPE prompts
    assert config.evaluation_taggers(paper) == dict.fromkeys(["osediff", "tvt", "tvt_official", "osediff_official"],
                                                             "dape")


def test_missing_dataset_in_paper_mode_is_named():
    paper = config.load(config.REPO_ROOT / "config" / "paper.yaml")
    del paper["data"]["datasets"]["realsr"]
    with pytest.raises(ConfigError, match=r"evaluate.test_sets\[1\]: unknown dataset 'realsr'"):
        config.validate(paper)


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: mini\nseed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


@pytest.mark.slow
def test_cli_reports_one_line_not_a_traceback(tmp_path):
    cfg = copy.deepcopy(MINI)
    cfg["degrade"]["scale"] = 0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "tvt", "config", "validate", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"config error: {path}: degrade.scale: 0 must be >= 1"


def test_stage_params_are_isolated():
    p = config.stage_params(MINI, "evaluate")
    assert set(p) == {"mode", "seed", "evaluate"}
    changed = copy.deepcopy(MINI)
    changed["evaluate"]["crop_border"] = 0
    assert config.params_hash(config.stage_params(changed, "degrade")) == config.params_hash(
        config.stage_params(MINI, "degrade"))
    assert config.params_hash(config.stage_params(changed, "evaluate")) != config.params_hash(p)


def test_extends_merges_sections_and_replaces_values(tmp_path):
    """A config that ``extends`` another is the base with its own values merged over it: sections key by
    key (new entries allowed), lists and values replaced whole; the chain follows relative paths."""
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config.load()))
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\nseed: 99\nisr:\n  tvt:\n    lr: 1.0e-4\n"
                     "evaluate:\n  methods: [bicubic, tvt]\n")
    merged, plain = config.load(child), config.load(base)
    assert merged["seed"] == 99 and merged["isr"]["tvt"]["lr"] == 1e-4
    # everything else of the section is the base's, and other sections are untouched
    assert {k: v for k, v in merged["isr"]["tvt"].items() if k != "lr"} == \
        {k: v for k, v in plain["isr"]["tvt"].items() if k != "lr"}
    assert merged["isr"]["osediff"] == plain["isr"]["osediff"] and merged["prior"] == plain["prior"]
    assert merged["evaluate"]["methods"] == ["bicubic", "tvt"]  # a list is replaced, not appended to
    assert "extends" not in merged


@pytest.mark.parametrize("text, expected", [
    ("extends: nowhere.yaml\n", "nowhere.yaml not found"),
    ("extends: me.yaml\n", "extends itself"),
    ("extends: [a.yaml]\n", "expected the path of a config file"),
])
def test_extends_errors_name_the_problem(tmp_path, text, expected):
    path = tmp_path / "me.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        config.load(path)


def test_extends_result_is_validated(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config.load()))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nisr:\n  tvt:\n    lr: fast\n")
    with pytest.raises(ConfigError, match=r"child.yaml: isr.tvt.lr"):
        config.load(child)


def test_isr_like_is_the_named_entry_with_its_own_values_over_it(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config.load()))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nisr:\n  s4: {like: tvt, unet: full}\n  s4b: {like: s4, lr: 1.0e-4}\n")
    cfg = config.load(child)
    assert cfg["isr"]["s4"] == {**cfg["isr"]["tvt"], "unet": "full"}
    assert cfg["isr"]["s4b"] == {**cfg["isr"]["tvt"], "unet": "full", "lr": 1e-4}  # a chain resolves in order


@pytest.mark.parametrize("entries, expected", [
    ("  s4: {like: tvtt, unet: full}\n", r"isr.s4.like: no isr entry 'tvtt' \(entries: "),
    ("  a: {like: b}\n  b: {like: a}\n", r"isr.a.like: a -> b -> a is a cycle"),
])
def test_isr_like_errors_name_the_entry(tmp_path, entries, expected):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config.load()))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nisr:\n" + entries)
    with pytest.raises(ConfigError, match=expected):
        config.load(child)
