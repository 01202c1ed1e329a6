"""Which weights train: peft LoRA adapters and exact trainable-parameter selection (docs/method.md §1.3, §1.5).

* TVT: LoRA (rank 4, Gaussian init, PEFT's default alpha 8) on every targeted layer of
  CE-UNet, in the official code's three adapters (:func:`add_official_unet_lora`); the 2x ends
  and ``conv_in`` / ``conv_out`` also train in full, ``conv_norm_out`` stays frozen
  (:data:`TVT_UNET_TRAINABLE`).
* OSEDiff: the same three adapters on the SD UNet plus a fully trainable ``conv_in``
  (:data:`OSEDIFF_UNET_TRAINABLE`), and LoRA on the VAE-D8 encoder only.

**The official grouping** (Joyies/TVT ``TVT/modelfile/TVTModel.py``: ``initialize_unet`` and
``initialize_unet_TVT``; cswry/OSEDiff ``osediff.py``: ``initialize_unet``): every *weight*
(names with ``bias`` or ``norm`` skipped) whose name contains one of
:data:`OFFICIAL_LORA_SUBSTRINGS` gets LoRA, in adapter ``default_encoder`` when the name
contains ``down_blocks`` or ``conv_in``, ``default_decoder`` when it contains ``up_blocks``, and
``default_others`` otherwise (the mid-block). The two code bases differ in one place:
``conv_out`` is in ``default_others`` in TVT's and in ``default_decoder`` in OSEDiff's
(:data:`CONV_OUT_GROUP`) — which matters for the VSD fake score, where only
``default_others`` is active. Because the match is by substring, ``"conv"`` alone selects
every convolution, ``conv_in`` and ``conv_out`` included, while ``conv_norm_out`` (a GroupNorm)
is skipped. :func:`official_lora_groups` reproduces this rule on
the official module names (:func:`official_unet_name` maps CE-UNet's names to the 5-level
TVT UNet's), so an official ``state_dict_unet`` maps 1:1 onto ours.

Adapters are added with diffusers' ``add_adapter`` (peft), which freezes every base weight
and activates *only the adapter just added*; :func:`add_official_unet_lora` therefore states
the active adapters explicitly. :func:`set_trainable` then states which parameters train, by
regular expression on parameter names, and refuses patterns that select nothing (a typo must
not silently freeze a module).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from tvt import compat

compat.apply()  # peft imports transformers -> torchvision

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

# Module-name suffixes that receive LoRA in the official OSEDiff/TVT code: attention
# projections, ResNet and resampling convolutions, transformer in/out projections, MLPs.
UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)

# Encoder convolutions and attention projections, plus quant_conv (as OSEDiff's VAE LoRA);
# a full-match regex, so nothing in the decoder or post_quant_conv is touched.
VAE_ENCODER_LORA_TARGETS = (
    r"^(encoder\..*\.(conv|conv1|conv2|conv_shortcut|to_q|to_k|to_v|to_out\.0)"
    r"|encoder\.(conv_in|conv_out)|quant_conv)$"
)

LORA_PATTERN = r"\.lora_"  # peft's lora_A / lora_B (and lora_magnitude_vector) parameters
# OSEDiff trains its UNet's LoRA and conv_in (osediff.py OSEDiff_gen.set_train).
OSEDIFF_UNET_TRAINABLE = (LORA_PATTERN, r"^conv_in\.")
# TVT trains LoRA, the replicas, conv_in and conv_out; conv_norm_out stays frozen
# (TVTModel.py TVT.set_train: "down_blocks.0", "up_blocks.3.upsamplers.0", "up_blocks.4",
# "conv_in", "conv_out" — in CE-UNet's names down_block, upsample, up_block, conv_in, conv_out).
TVT_UNET_TRAINABLE = (LORA_PATTERN, r"^(conv_in|down_block|upsample|up_block|conv_out)\.")

#: The official adapters in the order the official code adds them; the last one added is the
#: only one diffusers' ``add_adapter`` leaves active.
LORA_GROUPS = ("encoder", "decoder", "others")
#: The adapter that holds ``conv_out``'s LoRA in each official code base (``initialize_unet``).
CONV_OUT_GROUP = {"tvt": "others", "osediff": "decoder"}
#: Substrings that select a weight for LoRA in the official grouping (its ``l_grep``; ``conv``
#: already covers conv1, conv2, conv_in, conv_out and conv_shortcut, which it lists too).
OFFICIAL_LORA_SUBSTRINGS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "proj_out", "proj_in", "ff.net.2",
                            "ff.net.0.proj")


def adapter_name(group: str) -> str:
    """The official peft adapter name of a LoRA group (``default_encoder`` ...)."""
    if group not in LORA_GROUPS:
        raise ValueError(f"unknown LoRA group {group!r}; expected one of {LORA_GROUPS}")
    return f"default_{group}"


def official_unet_name(model: torch.nn.Module, name: str) -> str:
    """The name a CE-UNet parameter or module has in the official 5-level TVT UNet (identity for a plain UNet).

    ``down_block`` is the official ``down_blocks.0`` and the inner ``unet.down_blocks.i`` are
    ``down_blocks.{i+1}``; ``upsample`` is ``up_blocks.{n-1}.upsamplers.0`` and ``up_block``
    is ``up_blocks.{n}`` for an inner UNet of n up blocks (docs/official-weights.md: the TVTUNet rename, reversed).
    """
    from tvt.models.ce_unet import CEUNet  # ce_unet imports this module

    if not isinstance(model, CEUNet):
        return name
    n_up = len(model.unet.up_blocks)
    if name.startswith("unet.down_blocks."):
        index, rest = name.removeprefix("unet.down_blocks.").split(".", 1)
        return f"down_blocks.{int(index) + 1}.{rest}"
    for ours, official in (("down_block.", "down_blocks.0."), ("upsample.", f"up_blocks.{n_up - 1}.upsamplers.0."),
                           ("up_block.", f"up_blocks.{n_up}."), ("unet.", "")):
        if name.startswith(ours):
            return official + name.removeprefix(ours)
    return name


def official_lora_groups(model: torch.nn.Module, codebase: str = "tvt") -> dict[str, list[str]]:
    """Module names (ours) that receive LoRA, per official group, as ``codebase`` (tvt | osediff)
    groups them (module docstring's rule).

    ``model`` must be free of adapters: a peft-wrapped model has other parameter names.
    """
    if codebase not in CONV_OUT_GROUP:
        raise ValueError(f"unknown LoRA grouping {codebase!r}; expected one of {sorted(CONV_OUT_GROUP)}")
    groups: dict[str, list[str]] = {group: [] for group in LORA_GROUPS}
    for name, _ in model.named_parameters():
        if re.search(LORA_PATTERN, name) or ".base_layer." in name:
            raise ValueError("official_lora_groups expects a model without LoRA adapters")
        official = official_unet_name(model, name)
        if "bias" in official or "norm" in official or not any(s in official for s in OFFICIAL_LORA_SUBSTRINGS):
            continue
        if "down_blocks" in official or "conv_in" in official:
            group = "encoder"
        elif "up_blocks" in official:
            group = "decoder"
        elif "conv_out" in official:
            group = CONV_OUT_GROUP[codebase]
        else:
            group = "others"
        groups[group].append(name.removesuffix(".weight"))
    return groups


def add_official_unet_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    active: Iterable[str] = LORA_GROUPS,
    codebase: str = "tvt",
) -> dict[str, list[str]]:
    """Add the official three LoRA adapters (:func:`official_lora_groups` of ``codebase``) to a
    UNet or CE-UNet, in place.

    ``active``: the groups whose adapters take part in the forward pass (and so train); the
    official generators activate all three (``set_adapter`` in TVT's ``train.py``), the
    official VSD fake score is left with ``default_others`` only. Every parameter is left frozen:
    say what trains with :func:`set_trainable`. Returns the groups' module names.
    """
    active = list(active)
    if not active or any(group not in LORA_GROUPS for group in active):
        raise ValueError(f"active LoRA groups must be a non-empty subset of {LORA_GROUPS}, got {active}")
    groups = official_lora_groups(unet, codebase)
    for group in LORA_GROUPS:
        if groups[group]:
            # exact names (a full match): peft's list matching would also accept suffixes
            targets = "^(" + "|".join(re.escape(module) for module in groups[group]) + ")$"
            # peft directly: CE-UNet is no diffusers PeftAdapterMixin, and the same call serves both
            with warnings.catch_warnings():  # "multiple adapters in the model": three are what we want
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(_lora_config(rank, alpha, init, targets), unet, adapter_name=adapter_name(group))
    present = [group for group in active if groups[group]]
    if not present:
        raise ValueError(f"no layer of {type(unet).__name__} belongs to the LoRA groups {active}")
    names = [adapter_name(group) for group in present]
    for module in unet.modules():
        if isinstance(module, LoraLayer):  # a layer ignores the names it does not hold
            module.set_adapter([name for name in names if name in module.lora_A])
    unet.requires_grad_(False)
    return groups


def active_lora_pattern(unet: torch.nn.Module) -> str:
    """A :func:`set_trainable` pattern for the LoRA weights of the *active* adapters only.

    Inactive adapters take no part in the forward pass; leaving them trainable would only
    carry dead parameters through the optimiser and the checkpoints.
    """
    names = sorted({name for module in unet.modules() if isinstance(module, LoraLayer)
                    for name in module.active_adapters})
    if not names:
        raise ValueError(f"{type(unet).__name__} has no active LoRA adapter")
    return r"\.lora_\w+\.(" + "|".join(re.escape(name) for name in names) + r")\."


def _lora_config(rank: int, alpha: float | None, init: str | bool, target_modules) -> LoraConfig:
    alpha_kwargs = {} if alpha is None else {"lora_alpha": alpha}
    return LoraConfig(r=rank, init_lora_weights=init, target_modules=target_modules, **alpha_kwargs)


def add_unet_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Add a LoRA adapter on :data:`UNET_LORA_TARGETS` of a diffusers UNet, in place; return it.

    ``alpha=None`` keeps PEFT's default (8, so the LoRA scale is 8 / rank). After this call
    only the adapter's weights require gradients.
    """
    unet.add_adapter(_lora_config(rank, alpha, init, list(UNET_LORA_TARGETS)), adapter_name=adapter_name)
    return unet


def add_vae_encoder_lora(
    vae: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Add a LoRA adapter to the encoder side (encoder + quant_conv) of an AutoencoderKL or VAED4; return it."""
    vae.add_adapter(_lora_config(rank, alpha, init, VAE_ENCODER_LORA_TARGETS), adapter_name=adapter_name)
    return vae


def set_trainable(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Train exactly the parameters whose name matches one of ``patterns`` (``re.search``); freeze the rest.

    Returns the trainable names. Raises ``ValueError`` naming any pattern that matches nothing.
    """
    compiled = [re.compile(pattern) for pattern in patterns]
    used = set()
    for name, parameter in model.named_parameters():
        hits = {c.pattern for c in compiled if c.search(name)}
        used |= hits
        parameter.requires_grad_(bool(hits))
    unused = [c.pattern for c in compiled if c.pattern not in used]
    if unused:
        raise ValueError(f"set_trainable: no parameter of {type(model).__name__} matches {unused}")
    return trainable_parameter_names(model)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients, in module order."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
