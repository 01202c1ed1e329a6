"""Configuration: load a YAML config, validate it, hand each stage only its own section.

The schema lives in ``workflow/schemas/config.schema.yaml`` (shared with Snakemake's
``validate``). Errors are reported as *one line naming the key*, because a researcher
who mistypes ``degrade.scale`` wants to know that, not read a jsonschema traceback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"

#: ``decoder_transfer.architecture`` of ablation S3's VAE: the prior's VAE-D8 with an 8-channel latent
#: (tvt.training.vae_transfer.WIDE_D8; here too, so that loading a config imports no torch)
WIDE_D8 = "d8_c8"
#: keys every stage may read besides its own section (changing them reruns everything)
GLOBAL_KEYS = ("mode", "seed")


class ConfigError(ValueError):
    """A config value is wrong; the message is one line naming the offending key."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans and floats.

    DVC rewrites params.yaml (``dvc exp run -S``) with ruamel.yaml in YAML 1.2, which writes the
    string ``'no'`` (``mixed_precision``) unquoted and small floats as ``1e-07``; YAML 1.1, PyYAML's,
    would read those as ``False`` and the string ``'1e-07'``. Only ``true``/``false`` are booleans and
    ``1e-07`` is a number here, whichever tool wrote the file.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


@lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _describe(error) -> str:
    """Turn one jsonschema error into 'key.path: what is wrong'."""
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        names = ", ".join(repr(e) for e in extra)
        prefix = "" if where == "<top level>" else f"{where}."
        return f"{prefix}{extra[0] if len(extra) == 1 else '{' + names + '}'}: unknown key{hint}"
    if error.validator == "unevaluatedProperties":
        allowed = set(error.schema.get("properties", {}))
        for sub in error.schema.get("allOf", []):
            ref = sub.get("$ref", "")
            if ref.startswith("#/$defs/"):
                allowed |= set(load_schema()["$defs"][ref.split("/")[-1]].get("properties", {}))
        extra = sorted(set(error.instance) - allowed)
        prefix = "" if where == "<top level>" else f"{where}."
        return f"{prefix}{extra[0] if extra else '?'}: unknown key (allowed: {', '.join(sorted(allowed))})"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"{where}: missing required key '{missing}'"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "type":
        return f"{where}: expected {error.validator_value}, got {type(error.instance).__name__} {error.instance!r}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"{where}: {error.instance!r} must be {word[error.validator]} {error.validator_value}"
    if error.validator == "pattern" and "description" in error.schema:
        return f"{where}: {error.instance!r} is not valid here: {error.schema['description']}"
    if error.validator == "anyOf" and error.context:
        return _describe(min(error.context, key=lambda e: len(e.message)))
    return f"{where}: {error.message}"


def _check_datasets(datasets: dict, scale: int) -> None:
    """Paired test sets: `pairs` present exactly when `pairing` is 'paired', at the pipeline's scale."""
    for name, spec in datasets.items():
        key = f"data.datasets.{name}"
        paired = spec.get("pairing", "synthetic") == "paired"
        if "val_images" in spec and spec["role"] != "train":
            raise ConfigError(f"{key}.val_images: holds out validation images of a training set (role is {spec['role']!r})")
        if paired and spec["role"] != "test":
            raise ConfigError(f"{key}.pairing: 'paired' is for test sets (role is {spec['role']!r})")
        if paired != ("pairs" in spec):
            raise ConfigError(f"{key}.pairs: required when pairing is 'paired'" if paired else
                              f"{key}.pairs: only read when pairing is 'paired' (it is {spec.get('pairing', 'synthetic')!r})")
        if not paired:
            continue
        pairs = spec["pairs"]
        if pairs["scale"] != scale:
            raise ConfigError(f"{key}.pairs.scale: {pairs['scale']} differs from degrade.scale ({scale}), "
                              "the factor every method upscales by")
        for field in ("lr", "hr", "annotations"):
            pattern = pairs.get(field)
            if pattern is not None and (pattern.startswith("/") or ".." in pattern.split("/")):
                raise ConfigError(f"{key}.pairs.{field}: {pattern!r} must be relative to the dataset's folder")
        if "annotations" in pairs and "{stem}" not in pairs["annotations"]:
            raise ConfigError(f"{key}.pairs.annotations: {pairs['annotations']!r} has no '{{stem}}' placeholder")
        if "lr_stem" in pairs:
            try:
                re.compile(pairs["lr_stem"][0])
            except re.error as exc:
                raise ConfigError(f"{key}.pairs.lr_stem: {pairs['lr_stem'][0]!r} is not a regular expression ({exc})") from None


def _semantic_checks(cfg: dict) -> None:
    """Cross-field rules a JSON schema cannot express."""
    deg = cfg["degrade"]
    if len(deg["kernel_prob"]) != len(deg["kernel_list"]):
        raise ConfigError(
            f"degrade.kernel_prob: {len(deg['kernel_prob'])} probabilities for "
            f"{len(deg['kernel_list'])} kernels in degrade.kernel_list"
        )
    if deg["hr_size"] % deg["scale"]:
        raise ConfigError(f"degrade.hr_size: {deg['hr_size']} is not a multiple of degrade.scale ({deg['scale']})")
    data = cfg["data"]
    if data["source"] == "mini":
        for key in ("photos", "text", "split"):
            if key not in data:
                raise ConfigError(f"data.{key}: required when data.source is 'mini'")
        if data["photos"]["max_side"] < data["photos"]["min_side"]:
            raise ConfigError("data.photos.max_side: must be >= data.photos.min_side")
    else:
        if "datasets" not in data:
            raise ConfigError("data.datasets: required when data.source is 'download'")
        _check_datasets(data["datasets"], deg["scale"])
        train_sets = [n for n, spec in data["datasets"].items() if spec["role"] == "train"]
        if train_sets and not any("val_images" in data["datasets"][n] for n in train_sets):
            raise ConfigError(f"data.datasets.{train_sets[0]}.val_images: the training stages validate on a `val` split; "
                              "hold out some training images for it (e.g. val_images: 32)")
    prior = cfg.get("prior")
    if prior is not None:
        need = ("vae", "unet") if prior["source"] == "train" else ("repo_id", "revision")
        for key in need:
            if key not in prior:
                raise ConfigError(f"prior.{key}: required when prior.source is {prior['source']!r}")
    for stage, upstream in (("decoder_transfer", "prior"), ("encoder_transfer", "decoder_transfer")):
        if stage in cfg and upstream not in cfg:
            raise ConfigError(f"{stage}: needs the '{upstream}' section (its input is that stage's output)")
    variants = cfg.get("vae_variants", {})
    for name, entry in variants.items():
        for base in ("decoder_transfer", "encoder_transfer"):
            if base not in cfg:
                raise ConfigError(f"vae_variants.{name}: needs the '{base}' section (a variant overrides its values)")
        decoder = variant_section(cfg, "decoder_transfer", f"vae_variants.{name}.decoder_transfer")
        if decoder["architecture"] == WIDE_D8 and (decoder["transfer"] or decoder.get("latent_l2")):
            raise ConfigError(f"vae_variants.{name}.decoder_transfer.architecture: {WIDE_D8!r} (S3) widens the "
                              "prior's VAE-D8 and fine-tunes it end to end; set transfer: false and no latent_l2")
        if decoder.get("latent_l2") and decoder["transfer"]:
            raise ConfigError(f"vae_variants.{name}.decoder_transfer.latent_l2: the latent alignment (T2) trains "
                              "the VAE end to end instead of the two-stage transfer; set transfer: false")
        if not decoder["transfer"] and entry.get("encoder_transfer"):
            raise ConfigError(f"vae_variants.{name}.encoder_transfer: never read, the variant trains end to end "
                              "(transfer: false) and has no encoder-transfer stage")
    if cfg.get("decoder_transfer", {}).get("latent_l2") and cfg["decoder_transfer"]["transfer"]:
        raise ConfigError("decoder_transfer.latent_l2: the latent alignment (T2) trains the VAE end to end; "
                          "set transfer: false")
    isr = cfg.get("isr", {})
    if isr and "prior" not in cfg:
        raise ConfigError("isr: needs the 'prior' section (the SD weights it fine-tunes)")
    for name, variant in isr.items():
        if variant["method"] == "tvt" and "encoder_transfer" not in cfg:
            raise ConfigError(f"isr.{name}: method 'tvt' needs the 'encoder_transfer' section (its VAE-D4)")
        if "vae" in variant:
            if variant["vae"] not in variants:
                raise ConfigError(f"isr.{name}.vae: unknown VAE variant {variant['vae']!r} (vae_variants: "
                                  f"{', '.join(variants) or 'none configured'})")
            wide = variant_section(cfg, "decoder_transfer", f"vae_variants.{variant['vae']}.decoder_transfer")[
                "architecture"] == WIDE_D8
            if variant["method"] != ("osediff" if wide else "tvt"):
                raise ConfigError(f"isr.{name}.vae: names a VAE-D8 variant ({WIDE_D8}), which only method "
                                  "'osediff' reads" if wide else
                                  f"isr.{name}.vae: names a VAE-D4 variant, which only method 'tvt' reads")
            if wide and variant["unet"] != "full":
                raise ConfigError(f"isr.{name}.unet: the 8-channel VAE-D8 ({WIDE_D8}) goes with the full UNet, "
                                  "widened to 8 channels; set unet: full")
        if variant.get("vae_skips") and variant["method"] != "osediff":
            raise ConfigError(f"isr.{name}.vae_skips: the skips are S2's, on SD's VAE-D8; they need method 'osediff'")
        if variant["unet"] == "ce" and variant["method"] != "tvt":
            raise ConfigError(f"isr.{name}.unet: 'ce' (CE-UNet) needs the VAE-D4 latents of method 'tvt'")
        if variant["t_vsd"][0] >= variant["t_vsd"][1]:
            raise ConfigError(f"isr.{name}.t_vsd: {variant['t_vsd']} is not an increasing range")
    for stage in ("sft", "cfw"):
        if cfg.get("stablesr", {}).get(stage, {}).get("data") == "online" and "degrade" not in cfg["stablesr"]:
            raise ConfigError(f"stablesr.{stage}.data: online degrades with StableSR's own parameters: add a "
                              "stablesr.degrade section (config/paper.yaml has StableSR's)")
    if cfg.get("stablesr", {}).get("cfw", {}).get("data") == "online" and "pairs" not in cfg["stablesr"]["cfw"]:
        raise ConfigError("stablesr.cfw.pairs: required when stablesr.cfw.data is online (how many training pairs "
                          "to draw; StableSR's scripts/generate_vqgan_data.py draws 5004)")
    if "stablesr" in cfg and "prior" not in cfg:
        raise ConfigError("stablesr: needs the 'prior' section (the SD weights it conditions)")
    if "stablesr" in isr:
        raise ConfigError("isr.stablesr: the name is taken by the StableSR baseline (the stablesr section)")
    trained = [*isr, *(["stablesr"] if "stablesr" in cfg else []), *map(official_method, cfg.get("official", {}))]
    for i, method in enumerate(cfg["evaluate"]["methods"]):
        if method != "bicubic" and method not in trained:
            raise ConfigError(f"evaluate.methods[{i}]: {method!r} is neither 'bicubic' nor a trained model "
                              f"(isr section: {', '.join(isr) or 'none configured'}; 'stablesr' with a stablesr "
                              "section; '<name>_official' with an official section)")
    _check_evaluation_taggers(cfg)
    known = set(data.get("datasets", {}))
    for i, name in enumerate(cfg["evaluate"].get("test_sets", [])):
        if name not in known:
            raise ConfigError(
                f"evaluate.test_sets[{i}]: unknown dataset {name!r} (defined in data.datasets: "
                f"{', '.join(sorted(known)) or 'none'})"
            )


#: the authors' released weights of ``<name>``, imported by stage ``official_<name>``, are evaluated as
#: method ``<name>_official``
OFFICIAL_SUFFIX = "_official"


def official_method(name: str) -> str:
    """The evaluated method of an ``official:`` entry (``tvt`` -> ``tvt_official``)."""
    return f"{name}{OFFICIAL_SUFFIX}"


def one_step_methods(cfg: Mapping) -> list[str]:
    """The methods that condition on a prompt: the one-step restorers (every ``isr`` entry and the official
    TVT and OSEDiff releases). StableSR samples with the empty prompt, as its official code."""
    return [*cfg.get("isr", {}), *(official_method(n) for n in cfg.get("official", {}) if n != "stablesr")]


def evaluation_taggers(cfg: Mapping) -> dict[str, str]:
    """The tagger each one-step method of ``evaluate.methods`` is scored with (``none``: its stored null
    prompt): ``evaluate.tagger.<method>``, else ``evaluate.tagger.default``, else ``none``."""
    taggers = cfg["evaluate"].get("tagger") or {}
    one_step = set(one_step_methods(cfg))
    return {name: taggers.get(name, taggers.get("default", "none"))
            for name in cfg["evaluate"]["methods"] if name in one_step}


def _check_evaluation_taggers(cfg: dict) -> None:
    ev = cfg["evaluate"]
    one_step = set(one_step_methods(cfg))
    for name in ev.get("tagger") or {}:
        if name == "default":
            continue
        if name not in ev["methods"]:
            raise ConfigError(f"evaluate.tagger.{name}: {name!r} is not in evaluate.methods (a tagger is chosen per "
                              "evaluated method, or for all of them as 'default')")
        if name not in one_step:
            raise ConfigError(f"evaluate.tagger.{name}: {name!r} takes no prompt; only one-step restorers do "
                              f"({', '.join(sorted(one_step)) or 'none configured'}): bicubic has no network and "
                              "StableSR samples with the empty prompt, as its official code")
    used = set(evaluation_taggers(cfg).values())
    for key, needed_by in (("ram_weights", {"ram", "dape"}), ("dape_weights", {"dape"})):
        if used & needed_by and key not in ev:
            raise ConfigError(f"evaluate.{key}: required when evaluate.tagger uses {' or '.join(sorted(used & needed_by))} "
                              "(the weights are fetched on the cluster: docs/official-weights.md, Prompts)")


def validate(cfg: Any, source: str = "config") -> dict:
    """Validate a config dict; raise :class:`ConfigError` with one readable line."""
    import jsonschema

    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(cfg).__name__}")
    validator = jsonschema.Draft202012Validator(load_schema())
    # prefer the deepest error: it names the most specific key
    error = jsonschema.exceptions.best_match(
        validator.iter_errors(cfg),
        key=lambda e: (len(e.absolute_path), *jsonschema.exceptions.relevance(e)),
    )
    if error is not None:
        raise ConfigError(f"{source}: {_describe(error)}")
    try:
        _semantic_checks(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def load(path: str | Path | None = None) -> dict:
    """Read and validate a config file (default: the mini config), its ``extends`` chain resolved."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = _resolve_extends(path, ())
    try:
        cfg = resolve_isr_like(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return validate(cfg, source=str(path))


def resolve_isr_like(cfg: Any) -> Any:
    """``isr.<name>: {like: <other>, ...}`` is the entry ``<other>`` with these values over it: an
    ablation states the one thing it changes (``{like: tvt, unet: pruned}``) and follows every later
    edit of the recipe it varies. Resolved before validation; the stage keys hash the result."""
    isr = cfg.get("isr") if isinstance(cfg, dict) else None
    if not isinstance(isr, dict) or not any(isinstance(e, dict) and "like" in e for e in isr.values()):
        return cfg

    def entry(name: str, chain: tuple[str, ...]) -> dict:
        own = isr[name]
        if not isinstance(own, dict) or "like" not in own:
            return own
        like = own["like"]
        if like not in isr:
            raise ConfigError(f"isr.{name}.like: no isr entry {like!r} (entries: {', '.join(isr)})")
        if like in chain:
            raise ConfigError(f"isr.{chain[0]}.like: {' -> '.join((*chain, like))} is a cycle")
        return {**copy.deepcopy(entry(like, (*chain, like))), **{k: v for k, v in own.items() if k != "like"}}

    return {**cfg, "isr": {name: entry(name, (name,)) for name in isr}}


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Yaml12Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def _resolve_extends(path: Path, chain: tuple[Path, ...]) -> Any:
    """A config file with ``extends: <file>`` is that file (path relative to this one) with this
    file's values merged over it (:func:`merge_config`), so a variant of a config (e.g. the
    ablation configs) states only what it adds and follows every later edit of its base."""
    cfg = _read_yaml(path)
    if not isinstance(cfg, dict) or "extends" not in cfg:
        return cfg
    base = cfg.pop("extends")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends: expected the path of a config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        raise ConfigError(f"{path}: extends: {base} extends itself ({' -> '.join(map(str, (*chain, path, base_path)))})")
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends: {base_path} not found (the path is relative to {path.parent})")
    return merge_config(_resolve_extends(base_path, (*chain, path)), cfg)


def merge_config(base: Mapping, overlay: Mapping) -> dict:
    """``base`` with ``overlay`` merged in: mappings key by key (new keys allowed), anything else
    (lists, values) replaced whole. The result is validated like any config."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_section(cfg: dict, section: str):
    """``cfg['a']['b']`` for the dotted name ``'a.b'`` (None where absent)."""
    node = cfg
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def variant_section(cfg: Mapping, base: str, overrides: str) -> dict:
    """A variant's effective section: ``cfg[base]`` with the values at the dotted ``overrides`` merged
    in key by key (an absent overrides section changes nothing). One definition, read by the
    stage registry (keys) and the stage handlers (training) alike."""
    return {**get_section(cfg, base), **(get_section(cfg, overrides) or {})}


def stage_params(cfg: dict, section: str | None) -> dict:
    """What one stage may read: the global keys plus its own (possibly dotted) section."""
    params = {k: cfg[k] for k in GLOBAL_KEYS}
    if section is not None:
        params[section] = get_section(cfg, section)
    return params


def params_hash(params: dict) -> str:
    """Stable short hash of a stage's parameters (used as Snakemake params and MLflow tag)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _typed(value: Any) -> Any:
    """A value Snakemake left as text (the leaves of ``--config 'isr={tvt: {lr: 1e-4}}'`` come as
    strings) typed the way Snakemake types a top-level one: int, float, else YAML (booleans, null,
    lists), else the text itself."""
    if not isinstance(value, str):
        return value
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def apply_overrides(cfg: dict, overrides: Mapping[str, Any], source: str = "--config") -> dict:
    """``cfg`` with ``overrides`` merged in, leaving everything else of a section as it is.

    Two spellings of one change: nested, Snakemake's own (``{'isr': {'tvt': {'lr': '1e-4'}}}`` from
    ``--config 'isr={tvt: {lr: 1e-4}}'``), and dotted (``{'isr.tvt.lr': 1e-4}``). Only existing
    sections are reached into (a typo in a section name is an error, not a new section); a
    misspelt leaf key is caught by :func:`validate`, which names it.
    """
    out = copy.deepcopy(cfg)

    def merge(node: dict, path: list[str], value: Any, nested: bool) -> None:
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"{source} {'.'.join(path)}: {where} is not a section of the config")
            node = node[part]
        leaf = path[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            for key, sub in value.items():
                merge(node, [leaf, str(key)], sub, True)
        else:
            node[leaf] = _typed(value) if nested else value

    for dotted, value in overrides.items():
        merge(out, str(dotted).split("."), value, False)
    return out


def load_with_overrides(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> dict:
    """:func:`load`, then ``overrides`` (Snakemake's ``--config key=value``), validated again."""
    cfg = load(path)
    if not overrides:
        return cfg
    return validate(apply_overrides(cfg, overrides), source=f"{path} with --config {overrides_text(overrides)}")


def overrides_text(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in overrides.items())


def snapshot(cfg: Mapping, folder: str | Path) -> str:
    """Write ``cfg`` to ``<folder>/<content hash>.yaml`` (once) and return that path.

    The stages of one run read this frozen copy: its name depends on the content only, so every
    spelling of one config (relative, absolute, a copy) names the same file.
    """
    text = yaml.safe_dump(dict(cfg), sort_keys=True)
    path = Path(folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path.as_posix()
