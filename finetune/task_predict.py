"""Inference with any fine-tuned task: `cosmofm predict` for photo-z, the toy tasks of the tests, ...

    predict_task(["lsst-like-12.fits"], "runs/photoz/model", "photoz.fits")

The shared predict path (`finetune/predict.py`) reads the files and writes the catalogue;
this module holds its one task-agnostic `Predictor`, `TaskPredictor`, which needs nothing
from a task but what the registry gives (`heads.base.Task`: `modality`,
`catalogue_columns`, `catalogue_rows`), so a new head gets a predict verb without new
code here. Samples with no usable pixel are flagged and skipped as `classify` does
(`finetune.classify.classifiable`: the same codes, all_masked and unreadable, in every
catalogue). Classification keeps its own predictor (`ClassificationPredictor`): its
redshift scan and conformal sets are more than a head's outputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads.base import CosmoFMForTask, task_class, task_model_class


class TaskPredictor:
    """Any registered task's part of the predict path (`finetune.predict.Predictor`): the
    columns its `Task.catalogue_rows` gives for each batch of a piece; columns a model
    cannot fill (not in its rows) are written null. `verb` is the task type."""

    def __init__(self, model: CosmoFMForTask, batch_size: int = 256):
        if batch_size < 1:
            raise InputError("batch_size", f"must be >= 1, got {batch_size}", "e.g. 256 samples per batch")
        self.model, self.batch_size = model.eval(), batch_size
        self.task = task_class(model.task_type)(model.head_config)
        self.verb, self.modality = model.task_type, self.task.modality
        self.columns = list(self.task.catalogue_columns)
        self.device = next(model.parameters()).device
        self.workers = None

    def predict(self, samples: Sequence[Sample]):
        """The piece's predictions; samples without a usable pixel skipped with a Flag (`classifiable`)."""
        from cosmofm.finetune.classify import classifiable
        from cosmofm.finetune.predict import PiecePrediction
        from cosmofm.pretrain.data import collate_samples

        skipped: list = []
        ids, parts = [], []
        for batch in classifiable(samples, self.batch_size, 1, skipped):  # 1: one unmasked pixel is usable
            collated = collate_samples(batch, self.model.config.survey_names)
            inputs = {k: v.to(self.device) for k, v in self.task.inputs(batch).items()}  # how they were observed (`Task.inputs`)
            with torch.no_grad():  # grad mode is per thread
                outputs = self.model(collated.to(self.device), **inputs)
            parts.append(self.task.catalogue_rows(outputs))
            ids += [s.id for s in batch]
        return PiecePrediction(ids, {c.name: _joined(parts, c.name) for c in self.columns}, skipped)


def _joined(parts: list[dict], name: str) -> np.ndarray | None:
    """One column over the batches of a piece; None when no batch filled it."""
    values = [np.asarray(p[name]) for p in parts if p.get(name) is not None]
    return np.concatenate(values) if values else None


def load_task_model(model, expect_task: str | None = None) -> CosmoFMForTask:
    """A task model from a release folder / repo id (verified; another task's model refused
    before its weights are read when `expect_task` is given) or as given; a backbone is
    refused, since it has nothing to predict."""
    expect = task_model_class(expect_task).task_type if expect_task is not None else None  # an unknown name: the known ones
    where = type(model).__name__ if isinstance(model, torch.nn.Module) else str(model)
    if not isinstance(model, torch.nn.Module):
        from cosmofm.finetune.release import from_pretrained

        model = from_pretrained(model, expect_task=expect)
    if not isinstance(model, CosmoFMForTask):
        raise InputError(where, "holds no task head (a pretrained backbone)",
                         "fine-tune one with cosmofm finetune --task NAME, and predict with its model folder")
    if expect is not None and model.task_type != expect:
        raise InputError(where, f"is a {model.task_type!r} model, not a {expect!r} one", f"give a model fine-tuned for {expect!r}")
    return model


def predict_task(inputs, model, output, batch_size: int = 256, card=None, chunk_rows: int = 1024, overwrite: bool = False,
                 progress: bool = True, expect_task: str | None = None) -> dict:
    """Run a fine-tuned task model on every object of `inputs` (files, folders of them,
    datasets folders); write one catalogue row per object to `output` (.fits / .parquet).

    `model`: a `CosmoFMForTask`, or its release folder / repo id. `expect_task`: refuse a
    model of another task (a registered task name). Each row: the identifiers, the task's
    `catalogue_columns` (with their units) and FLAGS; objects skipped by the reader or as
    unusable (all_masked, unreadable) get their flags and null columns. Streaming, workers,
    the atomic write and `overwrite`: as `finetune.predict.predict_files`, whose summary
    ({"output", "n_rows", "n_predicted", "n_files", "flags"}) this returns.
    """
    from cosmofm.finetune.predict import predict_files

    predictor = TaskPredictor(load_task_model(model, expect_task), batch_size)
    return predict_files(inputs, predictor, output, card=card, progress=progress, chunk_rows=chunk_rows, overwrite=overwrite)


__all__ = ["TaskPredictor", "load_task_model", "predict_task"]
