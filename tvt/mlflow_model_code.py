"""The code of a logged restorer model (MLflow "models from code"): MLflow runs this file on load."""

from mlflow.models import set_model

from tvt.mlflow_model import RestorerModel

set_model(RestorerModel())
