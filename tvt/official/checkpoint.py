"""Reading released checkpoints safely and accounting for every key they hold.

A converter that silently drops a tensor changes the model it claims to import, so each
converter tracks its source in a :class:`KeyLedger`: every key ends up *consumed* (written
into our model, or checked against a tensor we already have) or *ignored* with a stated
reason (a training-only module, a derived buffer). :meth:`KeyLedger.close` raises on anything
else, and :func:`require_keys` turns a damaged or foreign file into one error naming the keys
that are missing or unexpected.

Checkpoints are pickles: :func:`load_checkpoint` reads them with
``torch.load(weights_only=True)`` only. PyTorch-Lightning checkpoints (TVT's ``vae.ckpt``,
StableSR's ``*.ckpt``) may pickle Lightning's ``AttributeDict`` (a plain ``dict`` subclass for
hyper-parameters); that one name is allowed and read as an ``OrderedDict``
(``torch.serialization.safe_globals`` with a (class, name) pair), so neither Lightning nor
arbitrary code is needed to read them. Any other class is refused with its name.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

_SHOWN = 8  # keys named in an error before "and N more"


class OfficialFormatError(ValueError):
    """A file is not the released format a converter expects (damaged, foreign, another version)."""


#: the only non-standard globals a released checkpoint may name: Lightning's ``AttributeDict``
#: (a ``dict`` subclass holding hyper-parameters), read as an ``OrderedDict``
SAFE_GLOBALS = [
    (OrderedDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (OrderedDict, "lightning_fabric.utilities.data.AttributeDict"),
    (OrderedDict, "lightning.fabric.utilities.data.AttributeDict"),
]


def _unpickling_detail(exc: Exception) -> str:
    """The informative line of torch's long weights-only error (which global, which opcode)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keys = ("GLOBAL", "Unsupported", "Can only", "not an allowed", "invalid load key", "zip")
    return next((line for line in lines if any(k in line for k in keys)), lines[0] if lines else repr(exc))


def load_checkpoint(path: str | Path) -> dict:
    """A ``torch.save`` file read with ``weights_only=True`` onto the CPU (never arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle file)...
        raise OfficialFormatError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: "
            f"{_unpickling_detail(exc)}). It is damaged, not a torch.save file, or "
            f"pickles a class this importer does not allow."
        ) from exc
    if not isinstance(data, dict):
        raise OfficialFormatError(f"{path}: expected a dict at the top level, found {type(data).__name__}")
    return data


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def require_keys(what: str, found: Iterable[str], expected: Iterable[str]) -> None:
    """Raise one :class:`OfficialFormatError` naming the missing and the unexpected keys of ``what``."""
    found, expected = set(found), set(expected)
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_few(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_few(unexpected)})"] if unexpected else []
        raise OfficialFormatError(f"{what}: " + "; ".join(parts))


def require_shapes(what: str, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Same keys (see :func:`require_keys`) and the same shape for each."""
    require_keys(what, state, reference)
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
        for k in sorted(state)
        if tuple(state[k].shape) != tuple(reference[k].shape)
    ]
    if wrong:
        raise OfficialFormatError(f"{what}: {len(wrong)} tensors have another shape than expected: {_few(wrong)}")


class KeyLedger:
    """Every key of one source ends consumed or ignored-with-a-reason; :meth:`close` enforces it."""

    def __init__(self, source: str, keys: Iterable[str]):
        self.source = source
        self.keys = list(keys)
        self._known = set(self.keys)
        self.consumed: set[str] = set()
        self.ignored: dict[str, str] = {}

    def take(self, *keys: str) -> None:
        unknown = [k for k in keys if k not in self._known]
        if unknown:
            raise OfficialFormatError(f"{self.source}: missing {_few(unknown)}")
        self.consumed.update(keys)

    def ignore(self, keys: Iterable[str], reason: str) -> None:
        for key in keys:
            self.ignored[key] = reason

    def pending(self, prefix: str = "") -> list[str]:
        return [k for k in self.keys if k.startswith(prefix) and k not in self.consumed and k not in self.ignored]

    def close(self) -> dict:
        """Raise if a key was neither consumed nor ignored; return the accounting for the import report."""
        left = self.pending()
        if left:
            raise OfficialFormatError(
                f"{self.source}: {len(left)} keys this importer does not know what to do "
                f"with (a newer or foreign release?): {_few(left)}"
            )
        reasons = Counter(self.ignored.values())
        return {
            "source": self.source,
            "keys": len(self.keys),
            "consumed": len(self.consumed),
            "ignored": [{"reason": r, "keys": n} for r, n in reasons.items()],
        }


def _digest(tensor: torch.Tensor) -> tuple[str, int]:
    """(dtype, bytes-hash): equal for the same values in the same order, whatever the shape (1x1 conv vs linear)."""
    data = tensor.detach().contiguous().cpu()
    return str(data.dtype), hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def require_same_tensors(what: str, source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``source`` holds exactly ``reference``'s tensors, byte for byte, under any names.

    Used for the parts a release stores but never trained (StableSR's copy of SD's frozen
    UNet and VAE): they are taken from the SD snapshot, and this proves they are the same.
    """
    have = Counter(_digest(t) for t in source.values())
    want = Counter(_digest(t) for t in reference.values())
    if have != want:
        extra = have - want
        strangers = [k for k, t in source.items() if _digest(t) in extra]
        raise OfficialFormatError(
            f"{what}: {sum(extra.values())} of {len(source)} tensors are not in the reference "
            f"({sum((want - have).values())} of its {len(reference)} are unmatched), e.g. {_few(strangers)}. "
            f"The frozen weights differ from the SD snapshot given (another SD version, or fp16 copies)."
        )


def write_report(out_dir: Path, report: dict) -> Path:
    path = Path(out_dir) / "import_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
