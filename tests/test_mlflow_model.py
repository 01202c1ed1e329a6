"""A restorer folder logged and registered as an MLflow pyfunc model restores exactly like the folder."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from test_sr import photo, save_tiny_restorer

from tvt.mlflow_model import log_restorer_model
from tvt.models.saved import load_restorer


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    yield mlflow.MlflowClient(uri), experiment
    mlflow.set_tracking_uri(None)


def test_logged_model_predicts_what_the_folder_restores(tmp_path, tracking):
    client, experiment = tracking
    folder = save_tiny_restorer(tmp_path / "tvt")
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_restorer_model(folder, "mini", "tvt", metrics={"psnr_y": 21.5})

    versions = client.search_model_versions("name = 'tvt-mini-tvt'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]
    assert {m.key: m.value for m in client.get_logged_model(info.model_id).metrics} == {"psnr_y": 21.5}

    model = mlflow.pyfunc.load_model("models:/tvt-mini-tvt/1")
    lr = photo(16, 12).astype(np.float32) / 255
    sr = model.predict(lr[None])
    with torch.no_grad():
        expected = load_restorer(folder)(torch.from_numpy(lr).permute(2, 0, 1)[None])
    assert sr.shape == (1, 48, 64, 3) and sr.dtype == np.float32
    assert np.array_equal(sr[0], expected[0].permute(1, 2, 0).numpy())
    bicubic = (
        torch.nn.functional.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None], scale_factor=4, mode="bicubic")
        .clamp(0, 1)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.abs(sr[0] - bicubic).mean() > 1e-3  # the network ran, not an upsampler
    two = model.predict(np.stack([lr, lr[::-1]]))  # a batch restores each image as on its own
    assert np.abs(two[0] - sr[0]).max() < 1e-5 and np.abs(two[1] - sr[0]).max() > 0.1
    with pytest.raises(Exception, match="shape"):
        model.predict(lr[None, ..., :2])


def test_the_evaluation_registers_each_restorer_in_its_comparison_run(tmp_path, tracking):
    from tvt.evaluate import log_comparison_runs

    client, experiment = tracking
    folder = save_tiny_restorer(tmp_path / "tvt")
    summary = {
        "test_set": "mini-test",
        "complexity": {"tvt": {"steps": 1}},
        "subsets": {
            "all": {"bicubic": {"psnr_y": 20.0}, "tvt": {"psnr_y": 21.0}},
            "photo": {"bicubic": {"psnr_y": 19.0}, "tvt": {"psnr_y": 20.5}},
        },
    }
    with mlflow.start_run(experiment_id=experiment) as run:
        assert log_comparison_runs(run.info, summary, "mini", {"tvt": folder}) == 4
    (version,) = client.search_model_versions("name = 'tvt-mini-tvt'")
    source = client.get_run(version.run_id)
    assert source.info.run_name == "tvt · all" and source.data.metrics == {"psnr_y": 21.0, "steps": 1.0}
    assert source.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert client.search_registered_models() and [m.name for m in client.search_registered_models()] == ["tvt-mini-tvt"]
