"""One toy task for the tests of the task seam (heads/base.py), as a head module would write it
(README: "Adding a task"): a head config with TYPE, an output with loss and prediction, a
`CosmoFMForTask` model (dropout + linear on the pooled token, mean squared error on its first
output when a target is given) and its Task (targets from a label, metrics, catalogue columns).

Not registered here: a test that needs the registry registers it in a fixture and pops it after
(`registered_toy_task`), so the registry is as shipped for every other test. Imported as
`from toy_task import ...` (tests/ is on sys.path, as for tests/launch.py)."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.heads.base import TASK_MODELS, TASKS, CatalogueColumn, CosmoFMForTask, Task, TaskHeadConfig, TaskOutput, register_task

TOY = "toy-regression"


@dataclass
class ToyHeadConfig(TaskHeadConfig):
    TYPE: ClassVar[str] = TOY
    n_outputs: int = 1
    target_label: str = "redshift"


@dataclass
class ToyOutput(TaskOutput):
    prediction: torch.Tensor | None = None  # (N, n_outputs)


class CosmoFMForToyRegression(CosmoFMForTask):
    """`target_label` from the pooled token; the loss is the mean squared error of the first output."""

    head_config_class = ToyHeadConfig

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Sequential(nn.Dropout(config.hidden_dropout_prob), nn.Linear(config.hidden_size, self.head_config.n_outputs))
        self.post_init()

    def forward(self, batch, target: torch.Tensor | None = None) -> ToyOutput:
        prediction = self.head(self.cosmofm(batch).pooled)  # (N, n_outputs)
        loss = None if target is None else F.mse_loss(prediction[:, 0], target)
        return ToyOutput(loss=loss, prediction=prediction)


class ToyTask(Task):
    """Targets from the samples' `target_label`; the catalogue has a column with a unit
    (SCORE, the first output), one without (SIGN) and one the model cannot fill (SPREAD).
    It reads image stamps (any modality would do: the pooled token is all it uses)."""

    modality = "image"
    catalogue_columns = [CatalogueColumn("SCORE", "mag", "the first output"), CatalogueColumn("SIGN", None, "its sign"),
                         CatalogueColumn("SPREAD", "", "a column this model cannot fill")]

    def __init__(self, head: ToyHeadConfig):
        self.head = head

    def targets(self, samples) -> dict[str, torch.Tensor]:
        return {"target": torch.tensor([s.meta["labels"][self.head.target_label] for s in samples], dtype=torch.float32)}

    def metrics(self, outputs, targets) -> dict[str, float]:
        return {"mse": float(F.mse_loss(outputs["prediction"][:, 0].detach(), targets["target"]))}

    def catalogue_rows(self, outputs) -> dict:
        score = outputs["prediction"][:, 0].double().numpy()
        return {"SCORE": score, "SIGN": np.where(score > 0, "+", "-")}


def registered_toy_task():
    """Generator for a pytest fixture: the toy task registered while the test runs, popped after."""
    model_cls, task_cls = register_task(TOY)(CosmoFMForToyRegression), register_task(TOY)(ToyTask)
    try:
        yield model_cls, task_cls
    finally:
        TASK_MODELS.pop(TOY)
        TASKS.pop(TOY)
