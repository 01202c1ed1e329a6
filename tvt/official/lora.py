"""Fold the LoRA adapters of an OSEDiff/TVT ``.pkl`` into plain diffusers weights.

Both releases store ``torch.save`` dicts written by their ``save_model`` (cswry/OSEDiff
``osediff.py::OSEDiff_gen.save_model``, Joyies/TVT ``TVT/modelfile/TVTModel.py::TVT.save_model``):
lists of the module names each adapter wraps, the LoRA rank, and a state dict in peft's
naming after ``add_adapter`` — ``<module>.lora_A.<adapter>.weight``,
``<module>.lora_B.<adapter>.weight`` and, for a wrapped module that was also trained in full,
``<module>.base_layer.weight``. Their ``load_ckpt`` rebuilds the adapters with
``LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=names)``, i.e. peft's default
``lora_alpha`` of 8, so each adapter adds (8 / r) · B · A to its module's weight (peft
``LoraLayer.update_layer``: ``scaling = lora_alpha / r``). For a k×k convolution A is a
(r, in, k, k) conv and B a (r → out) 1×1 conv, so B · A is ``B.flatten(1) @ A.flatten(1)``
reshaped to the weight (peft ``Conv2d.get_delta_weight``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tvt.official.checkpoint import KeyLedger, OfficialFormatError, _few

PEFT_DEFAULT_ALPHA = 8  # peft LoraConfig.lora_alpha default; the releases never set it


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, weight_shape: torch.Size, scaling: float) -> torch.Tensor:
    """scaling · B · A in the shape of the wrapped weight (linear or conv)."""
    delta = lora_b.float().flatten(1) @ lora_a.float().flatten(1)
    if delta.numel() != torch.Size(weight_shape).numel():
        raise OfficialFormatError(
            f"LoRA B·A has shape {tuple(delta.shape)}, which does not fit a weight of shape {tuple(weight_shape)}"
        )
    return scaling * delta.reshape(weight_shape)


def merge_lora_state(
    base: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    adapters: Mapping[str, Sequence[str]],
    rank: int,
    ledger: KeyLedger,
    prefix: str,
    alpha: float = PEFT_DEFAULT_ALPHA,
) -> dict[str, torch.Tensor]:
    """``base`` (plain diffusers names) with ``trained``'s full weights replaced and its LoRA folded in.

    ``adapters`` maps adapter name → wrapped module names. Every key of ``trained`` is taken
    from ``ledger`` (as ``prefix + key``); a LoRA pair for a module no adapter lists, a listed
    module without its pair, or a full weight with no counterpart in ``base`` is an error.
    """
    merged = dict(base)
    lora_keys = {k for k in trained if ".lora_A." in k or ".lora_B." in k}
    replaced = {k: k.replace(".base_layer.", ".") for k in trained if k not in lora_keys}
    strangers = [k for k, plain in replaced.items() if plain not in base]
    if strangers:
        raise OfficialFormatError(
            f"{ledger.source}: {prefix}: {len(strangers)} weights have no counterpart in the "
            f"base model: {_few(strangers)}"
        )
    for key, plain in replaced.items():
        if tuple(trained[key].shape) != tuple(base[plain].shape):
            raise OfficialFormatError(
                f"{ledger.source}: {prefix}{key} has shape {tuple(trained[key].shape)}, the "
                f"base model's {plain} {tuple(base[plain].shape)}"
            )
        merged[plain] = trained[key]
        ledger.take(prefix + key)

    scaling = alpha / rank
    missing, used = [], set()
    for adapter, modules in adapters.items():
        for module in dict.fromkeys(modules):  # the releases' lists repeat names; peft makes them a set
            pair = (f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight")
            if not all(k in trained for k in pair) or f"{module}.weight" not in merged:
                missing.append(pair[0] if f"{module}.weight" in merged else f"{module}.weight (base)")
                continue
            lora_a, lora_b = trained[pair[0]], trained[pair[1]]
            if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
                raise OfficialFormatError(
                    f"{ledger.source}: {prefix}{pair[0]} has rank {lora_a.shape[0]}, the file says {rank}"
                )
            weight = merged[f"{module}.weight"]
            merged[f"{module}.weight"] = (weight.float() + lora_delta(lora_a, lora_b, weight.shape, scaling)).to(
                weight.dtype
            )
            used.update(pair)
            ledger.take(*(prefix + k for k in pair))
    if missing:
        raise OfficialFormatError(
            f"{ledger.source}: {prefix}: {len(missing)} LoRA modules listed in the file have no "
            f"weights: {_few(missing)}"
        )
    unlisted = lora_keys - used
    if unlisted:
        raise OfficialFormatError(
            f"{ledger.source}: {prefix}: {len(unlisted)} LoRA weights belong to no listed module: {_few(unlisted)}"
        )
    return merged
