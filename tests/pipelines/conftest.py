"""What the pipeline tests share: a run with a logged model, for registry versions that need no training."""

import mlflow
import numpy as np
import pytest
import torch

from infra.settings import Settings


@pytest.fixture(scope="session")
def model_run(settings: Settings) -> str:
    """A run with a logged (tiny) PyTorch model: what every version registered from it points at."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment("registry-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", pip_requirements=["torch"],
                                 input_example=np.zeros((2, 2), dtype=np.float32))
    return run.info.run_id
