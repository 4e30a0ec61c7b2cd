"""The task seam (heads/base.py): head configs with type and schema, registration by
decorator, a new task loading through `cosmofm.from_pretrained` with no loader edits, and
the bad-input errors before any weights are read."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import cosmofm
from cosmofm.cli import main
from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.classify import load_classifier
from cosmofm.finetune.release import from_pretrained
from cosmofm.heads.base import (
    CatalogueColumn,
    CosmoFMForTask,
    Task,
    TaskHeadConfig,
    register_task,
    task_class,
    task_model_class,
)
from cosmofm.heads.classification import TASK_TYPE, ClassificationHeadConfig, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest
from toy_task import TOY, CosmoFMForToyRegression, ToyHeadConfig, registered_toy_task  # tests/toy_task.py

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6,
            projection_dim=16, survey_names=["sdss-like"])


# ---------------------------------------------------------------------------------
# A whole new task, as a head module would write it (tests/toy_task.py; README: "Adding a task")
# ---------------------------------------------------------------------------------


@pytest.fixture
def toy_task():
    """Registered for one test only, so the registry is as shipped for every other test."""
    yield from registered_toy_task()


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    write_manifest(folder)
    return folder


def _edit_config(release: Path, edit) -> Path:
    config = json.loads((release / "config.json").read_text())
    edit(config)
    (release / "config.json").write_text(json.dumps(config))
    write_manifest(release)
    return release


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    head = ClassificationHeadConfig.from_card(load_card("sdss-like"), hidden_size=16)
    torch.manual_seed(0)
    model = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(**TINY), head).eval()
    return model, _save(model, tmp_path_factory.mktemp("classifier") / "model")


@pytest.fixture(scope="module")
def samples():
    return mock_samples(load_card("sdss-like"), 3, seed=2)


# ---------------------------------------------------------------------------------
# Head configs
# ---------------------------------------------------------------------------------


def test_head_config_reads_its_type_and_schema_and_refuses_others():
    head = ClassificationHeadConfig(class_names=["STAR", "QSO"])
    saved = head.to_dict()
    assert (saved["type"], saved["schema_version"]) == (TASK_TYPE, 1)
    assert TaskHeadConfig.from_dict(saved) == head  # the base reads any registered task's config
    old = {k: v for k, v in saved.items() if k != "schema_version"}  # written before the field existed
    assert ClassificationHeadConfig.from_dict(old) == head
    with pytest.raises(InputError, match=r"task\.schema_version: is 2, newer than this cosmofm understands .*upgrade cosmofm"):
        ClassificationHeadConfig.from_dict({**saved, "schema_version": 2})
    with pytest.raises(InputError, match=r"task\.schema_version: is 'x', not a whole number"):
        TaskHeadConfig.from_dict({**saved, "schema_version": "x"})
    with pytest.raises(InputError, match=r"task\.type: 'no-such-task' is not a registered task -- known tasks: .*spectral-classification"):
        TaskHeadConfig.from_dict({**saved, "type": "no-such-task"})
    with pytest.raises(InputError, match=r"task\.type: is 'other', not 'spectral-classification'"):
        ClassificationHeadConfig.from_dict({**saved, "type": "other"})
    with pytest.raises(InputError, match=r"config\.task: is missing"):
        ClassificationHeadConfig.from_dict(None)


def test_classification_is_registered_with_unchanged_tensor_names(classifier):
    model, _ = classifier
    assert task_model_class(TASK_TYPE) is CosmoFMForSpectralClassification and model.task_type == TASK_TYPE
    keys = list(model.state_dict())
    backbone = [f"cosmofm.{k}" for k in CosmoFMModel(CosmoFMConfig(**TINY)).state_dict()]
    assert keys[: len(backbone)] == backbone  # the names releases were written with
    assert keys[len(backbone):] == [f"head.{k}" for k in (
        "pool.norm.weight", "pool.norm.bias", "pool.key.weight", "pool.key.bias", "norm.weight", "norm.bias",
        "hidden.1.weight", "hidden.1.bias", "classifier.weight", "classifier.bias", "redshift.weight", "redshift.bias")] + [
        "ood.means", "ood.precision"]  # the out-of-set detector's buffers (issue 17)


def test_release_written_before_the_seam_loads_with_identical_logits(classifier, samples, tmp_path):
    """config.task as the code before heads/base.py wrote it: no schema_version, type last."""
    model, release = classifier
    old = _edit_config(Path(shutil.copytree(release, tmp_path / "old")), lambda c: c.update(
        task={**{k: v for k, v in c["task"].items() if k not in ("type", "schema_version")}, "type": TASK_TYPE}))
    batch = collate_samples(samples, ["sdss-like"])
    loaded = cosmofm.from_pretrained(old).eval()
    assert type(loaded) is CosmoFMForSpectralClassification and loaded.head_config == model.head_config
    assert torch.equal(loaded(batch).logits, model(batch).logits)
    auto = AutoModelForSequenceClassification.from_pretrained(old).eval()  # the Auto class, from the decorator
    assert type(auto) is CosmoFMForSpectralClassification and torch.equal(auto(batch).logits, model(batch).logits)


def test_classification_pieces_fit_the_task_protocol(classifier, samples):
    """targets from labels_from_samples, feeding the forward; the catalogue columns classify writes."""
    model, _ = classifier

    class ClassificationTask(Task):
        def __init__(self, head):
            self.head = head
            self.catalogue_columns = [CatalogueColumn("CLASS"), *(CatalogueColumn(f"P_{c}", "") for c in head.class_names),
                                      CatalogueColumn("CONFORMAL_SET"), CatalogueColumn("Z", ""), CatalogueColumn("Z_ERR", "")]

        def targets(self, samples):
            class_labels, redshift = labels_from_samples(samples, self.head)
            return {"class_labels": class_labels, "redshift": redshift}

        def metrics(self, outputs, targets):
            return {"accuracy": float(np.mean(outputs["logits"].argmax(1).numpy() == targets["class_labels"].numpy()))}

    task = ClassificationTask(model.head_config)
    assert isinstance(task, Task) and task.calibrate(model, {}, {}) == {}
    targets = task.targets(samples)
    out = model(collate_samples(samples, ["sdss-like"]), **targets)
    assert out.loss.ndim == 0
    expected = (out.logits.argmax(-1) == targets["class_labels"]).float().mean().item()  # temperature keeps the argmax
    assert task.metrics(out, targets)["accuracy"] == pytest.approx(expected)
    assert [c.name for c in task.catalogue_columns][-3:] == ["CONFORMAL_SET", "Z", "Z_ERR"]


# ---------------------------------------------------------------------------------
# A new task: registered by decorator, found by the loader
# ---------------------------------------------------------------------------------


def test_new_task_loads_through_the_registry_without_loader_edits(toy_task, samples, tmp_path):
    torch.manual_seed(0)
    model = CosmoFMForToyRegression.from_backbone_config(CosmoFMConfig(**TINY), ToyHeadConfig(n_outputs=3)).eval()
    release = _save(model, tmp_path / "toy")
    assert json.loads((release / "config.json").read_text())["task"] == {"type": TOY, "schema_version": 1, "n_outputs": 3,
                                                                          "target_label": "redshift"}
    loaded = cosmofm.from_pretrained(release).eval()
    assert type(loaded) is CosmoFMForToyRegression and loaded.head_config == model.head_config
    batch = collate_samples(samples, ["sdss-like"])
    assert torch.equal(loaded(batch).prediction, model(batch).prediction) and loaded(batch).loss is None

    task = task_class(TOY)(loaded.head_config)
    targets = task.targets(samples)
    out = loaded(batch, **targets)
    assert out.loss.ndim == 0 and task.metrics(out, targets)["mse"] == pytest.approx(float(out.loss.detach()))

    # a classification caller is refused before the weights are read
    with pytest.raises(InputError, match=r"is a CosmoFMForToyRegression \(a 'toy-regression' model\), not a spectral classification model"):
        load_classifier(release)
    assert from_pretrained(release, expect_task=TOY).head_config == model.head_config


def test_backbone_is_not_a_task_model(tmp_path):
    backbone = _save(CosmoFMModel(CosmoFMConfig(**TINY)), tmp_path / "backbone")
    with pytest.raises(InputError, match=r"is a CosmoFMModel \(a backbone without a task head\), not a spectral classification model"):
        from_pretrained(backbone, expect_task=TASK_TYPE)


BAD_TASKS = {
    "unregistered": (lambda c: c["task"].update(type="no-such-task"),
                     r"config\.json: task\.type: 'no-such-task' is not a registered task -- known tasks: .*spectral-classification"),
    "newer-schema": (lambda c: c["task"].update(schema_version=99),
                     r"config\.json: task\.schema_version: is 99, newer than this cosmofm understands for 'spectral-classification' \(1\)"),
    "no-task": (lambda c: c.pop("task"), r"config\.json: architectures: 'CosmoFMForSpectralClassification' is not a cosmofm backbone, and config\.json names no task"),
    "architectures-differ": (lambda c: c.update(architectures=["CosmoFMForSomethingElse"]),
                             r"architectures: names 'CosmoFMForSomethingElse', but task 'spectral-classification' is loaded by CosmoFMForSpectralClassification"),
    "bad-head": (lambda c: c["task"].update(class_names=["ONLY"]), r"config\.json: task\.class_names: needs at least 2 classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_config_is_one_error_before_the_weights_are_read(case, classifier, tmp_path, capsys):
    edit, expected = BAD_TASKS[case]
    release = Path(shutil.copytree(classifier[1], tmp_path / "release"))
    (release / "model.safetensors").write_bytes(b"not safetensors")  # reading the weights would fail differently
    _edit_config(release, edit)
    with pytest.raises(InputError, match=expected):
        cosmofm.from_pretrained(release)
    assert main(["inspect", str(release)]) == 2
    captured = capsys.readouterr()
    assert "NOT VERIFIED" in captured.out and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_registration_refuses_clashes(toy_task):
    class Impostor(CosmoFMForTask):
        head_config_class = ClassificationHeadConfig

    with pytest.raises(TypeError, match="already registered by cosmofm.heads.classification.CosmoFMForSpectralClassification"):
        register_task(TASK_TYPE)(Impostor)
    with pytest.raises(TypeError, match="has TYPE 'spectral-classification'"):
        register_task("other-name")(Impostor)
    with pytest.raises(TypeError, match="AutoModelForSequenceClassification already loads task 'spectral-classification'"):
        register_task(TOY, auto_class=AutoModelForSequenceClassification)(CosmoFMForToyRegression)
    with pytest.raises(TypeError, match="lacks"):
        register_task("not-a-task")(object)
    assert task_model_class(TASK_TYPE) is CosmoFMForSpectralClassification  # untouched by the refusals
