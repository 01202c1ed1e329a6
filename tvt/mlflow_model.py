"""A restorer folder as an MLflow model: a pyfunc whose one artifact is the folder, registered by name.

The evaluation stage logs every restorer it scores (:func:`log_restorer_model`) inside that
method's comparison run, with its metrics attached to the model, and registers it as
``tvt-<mode>-<method>``: the MLflow UI then lists each restorer under *Models*, one version per
evaluated training output, and compares versions by their metrics.

The model is MLflow's "models from code" (``mlflow_model_code.py`` is its code, no pickle): loading
it runs :class:`RestorerModel.load_context`, which loads the folder with
:func:`tvt.models.saved.load_restorer`, so ``mlflow.pyfunc.load_model(uri).predict(lr)`` restores
exactly like ``tvt sr``'s network. It needs this package installed where it is loaded.

``predict`` takes LR images (N, h, w, 3) float32 in [0, 1] (the signature, which MLflow enforces)
and returns SR (N, scale·h, scale·w, 3) float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np

#: the model's code file: MLflow copies it into the model and runs it on load
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
ARTIFACT = "restorer"
#: what the model code imports besides this package (pinned to what logged it)
REQUIREMENTS = ("torch", "diffusers", "peft", "transformers", "safetensors", "numpy", "mlflow")


def registered_name(mode: str, method: str) -> str:
    return f"tvt-{mode}-{method}"


class RestorerModel(mlflow.pyfunc.PythonModel):
    """LR images -> SR images through the restorer folder in the model's artifacts."""

    def load_context(self, context) -> None:
        import torch

        from tvt.models.saved import load_restorer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.restorer = load_restorer(context.artifacts[ARTIFACT]).to(self.device).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected LR images (N, h, w, 3), got shape {images.shape}")
        lr = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            sr = self.restorer(lr.to(self.device))
        return sr.float().permute(0, 2, 3, 1).cpu().numpy()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = (-1, -1, -1, 3)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
    )


def log_restorer_model(folder: Path, mode: str, method: str, metrics: Mapping[str, float] | None = None):
    """Log ``folder`` as a pyfunc model in the active run, register it as ``tvt-<mode>-<method>`` and
    attach ``metrics`` to it; return MLflow's ModelInfo. The folder is stored once, in the model."""
    info = mlflow.pyfunc.log_model(
        name=f"restorer-{method}",
        python_model=str(MODEL_CODE),
        artifacts={ARTIFACT: str(folder)},
        signature=signature(),
        registered_model_name=registered_name(mode, method),
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        tags={"tvt.method": method, "tvt.restorer": str(folder)},
    )
    if metrics:
        mlflow.log_metrics(dict(metrics), model_id=info.model_id)
    return info
