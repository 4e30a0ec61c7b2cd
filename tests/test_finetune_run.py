"""Fine-tuning any registered task (finetune/run.py, finetune/recipe.py, `cosmofm finetune`):
photo-z end to end from its shipped recipe, every bad input refused before any mock is made,
the runner registry, a task with no code in finetune/, and exact resume through the CLI."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cosmofm.cli import main
from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.recipe import FinetuneRecipe, labelled_mocks, run_recipe
from cosmofm.finetune.release import from_pretrained
from cosmofm.finetune.run import RUNNERS, TaskFinetuneConfig, collect_outputs, finetune_task, runner_for, split_indices
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification
from cosmofm.heads.photoz import CosmoFMForPhotoz, PhotozHeadConfig, PhotozTask
from cosmofm.heads.photoz_baseline import photometry_features
from cosmofm.pretrain import CosmoFMConfig
from cosmofm.pretrain.checkpoint import save_release, write_manifest
from toy_task import TOY, CosmoFMForToyRegression, registered_toy_task  # tests/toy_task.py

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, image_patch_size=8,
            coord_frequencies=6, projection_dim=16)
PHOTOZ = ["finetune", "--task", "photoz", "--set", "backbone_recipe=tiny", "--set", "finetune.head.photometry_warm_start_steps=0", "--n-train", "40", "--batch-size", "8", "--workers", "1"]


def _photoz(out: Path, *extra: str) -> int:
    return main([*PHOTOZ, "--output", str(out), *extra])


def _weights(release: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(release / "model.safetensors")


# ---------------------------------------------------------------------------- photo-z end to end


@pytest.fixture(scope="module")
def photoz_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("photoz") / "run"
    assert _photoz(out, "--epochs", "1") == 0
    return out


def test_photoz_from_the_shipped_recipe(photoz_run):
    model = from_pretrained(str(photoz_run / "model"), expect_task="photoz")
    assert isinstance(model, CosmoFMForPhotoz) and model.config.hidden_size == 32  # the tiny backbone, not the demo's

    results = json.loads((photoz_run / "eval_results.json").read_text())
    assert results == json.loads((photoz_run / "model" / "eval_results.json").read_text())
    metrics = results["details"]
    assert (metrics["n_train"], metrics["n_calibration"], metrics["n_test"]) == (24, 8, 8)
    assert {"nmad", "outlier_fraction"} <= {m["type"] for m in results["results"][0]["metrics"]}

    # the test block (the last 20% of the labelled galaxies), scored again from the saved model
    samples = labelled_mocks(load_card("lsst-like"), 40, 0, {"spectral_class": "GALAXY*"})
    assert all(s.meta["labels"]["spectral_class"].startswith("GALAXY") for s in samples)
    test = samples[32:]
    task = PhotozTask(model.head_config)
    # the photometry branch reads the card's 6 bands, standardised on the 24 training stamps (Task.prepare, no warm start)
    assert (model.head_config.photometry_bands, model.head_config.reference_band) == (6, 2)
    train_features = photometry_features(samples[:24])
    assert torch.allclose(model.head.photometry.feature_mean.double(), torch.from_numpy(train_features.mean(0)), atol=1e-4)
    again = task.metrics(collect_outputs(model, test), task.targets(test))
    for name in ("nmad", "outlier_fraction", "bias", "pit_ks", "coverage_68", "coverage_95"):
        assert metrics[name] == pytest.approx(again[name], rel=1e-5, abs=1e-7), name

    # the temperature fitted on the calibration block is the one the release carries
    config = json.loads((photoz_run / "model" / "config.json").read_text())
    assert config["task"]["temperature"] == metrics["calibration"]["temperature"] == model.head_config.temperature
    assert metrics["calibration"]["temperature"] != PhotozHeadConfig().temperature  # fitted, not the default

    saved = json.loads((photoz_run / "finetune_config.json").read_text())
    assert (saved["strategy"], saved["epochs"], saved["batch_size"], len(saved["history"])) == ("full", 1, 8, 1)

    recipe = FinetuneRecipe.load(str(photoz_run / "finetune_recipe.yaml"))
    assert (recipe.task, recipe.card, recipe.n_labelled, recipe.backbone_recipe) == ("photoz", "lsst-like", 40, "tiny")
    assert recipe.select == {"spectral_class": "GALAXY*"} and recipe.finetune["output_dir"] == str(photoz_run)
    assert recipe.config().epochs == 1 and recipe == FinetuneRecipe.load("photoz", ["backbone_recipe=tiny", "n_labelled=40",
                                                                                    "finetune.head.photometry_warm_start_steps=0",
                                                                                    "finetune.epochs=1", "finetune.batch_size=8",
                                                                                    f"finetune.output_dir={photoz_run}"])


def test_photoz_resumes_exactly_through_the_cli(photoz_run, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _photoz(whole, "--epochs", "2") == 0
    assert _photoz(cut, "--epochs", "2", "--checkpoint-every", "2", "--set", "finetune.max_steps=2") == 0
    assert [int(p.name.split("_")[1]) for p in (cut / "checkpoints").glob("step_*")] == [2]
    assert _photoz(cut, "--epochs", "2", "--checkpoint-every", "2", "--resume") == 0
    reference, resumed = _weights(whole / "model"), _weights(cut / "model")
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    history = json.loads((cut / "finetune_config.json").read_text())["history"]
    assert history == json.loads((whole / "finetune_config.json").read_text())["history"] and len(history) == 2
    # the one-epoch run above trained less: the resumed weights are not simply any photo-z model's
    assert not all(torch.equal(_weights(photoz_run / "model")[k], v) for k, v in reference.items())


# ---------------------------------------------------------------------------- bad input, before any mock


@pytest.fixture
def no_mocks(monkeypatch):
    """Fail the test if a mock is generated: every refusal below comes first."""
    import cosmofm.data_cards.mocks.generators as generators
    import cosmofm.finetune.recipe as recipe

    def generate(*args, **kwargs):
        raise AssertionError("mocks were generated before the input was checked")

    monkeypatch.setattr(recipe, "labelled_mocks", generate)
    monkeypatch.setattr(generators, "generate", generate)


def _refused(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def classifier_release(tmp_path_factory):
    card = load_card("sdss-like")
    torch.manual_seed(0)
    model = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY),
                                                                  ClassificationHeadConfig.from_card(card))
    return save_release(model, tmp_path_factory.mktemp("cls") / "model")


@pytest.fixture(scope="module")
def newer_photoz_release(tmp_path_factory):
    torch.manual_seed(0)
    model = CosmoFMForPhotoz.from_backbone_config(CosmoFMConfig(survey_names=["lsst-like"], **TINY), PhotozHeadConfig(n_bins=20))
    folder = save_release(model, tmp_path_factory.mktemp("pz") / "model")
    config = json.loads((folder / "config.json").read_text())
    config["task"]["schema_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(folder)
    return folder


def test_bad_input_is_refused_before_any_mock(no_mocks, classifier_release, newer_photoz_release, tmp_path, capsys):
    out = ["--output", str(tmp_path / "run"), "--workers", "1"]
    _refused(capsys, ["finetune", "--task", "no-such-task", *out], "task.type", "no-such-task", "photoz")
    _refused(capsys, ["finetune", "--task", "photoz", "--config", "spectral-classification", *out], "--task", "spectral-classification")
    _refused(capsys, ["finetune", "--task", "photoz", "--backbone", str(classifier_release), *out], "backbone", "spectral-classification")
    _refused(capsys, ["finetune", "--task", "photoz", "--set", "finetune.no_such_knob=1", *out], "recipe.finetune", "no_such_knob")
    _refused(capsys, ["finetune", "--task", "photoz", "--set", "finetune.head.foo=1", *out], "head", "foo", "n_bins")
    _refused(capsys, ["finetune", "--task", "photoz", "--card", "sdss-like", *out], "recipe.card", "sdss-like", "image")
    _refused(capsys, ["finetune", "--task", "photoz", "--backbone", str(newer_photoz_release), *out], "task.schema_version", "upgrade")
    assert not (tmp_path / "run").exists()

    # the library says the same
    with pytest.raises(InputError, match="unknown knobs"):
        FinetuneRecipe.load("photoz", ["finetune.epochs=1", "finetune.lr_typo=1"])
    with pytest.raises(InputError, match="finetune.epochs"):
        FinetuneRecipe.load("photoz", ["finetune.epochs=many"])
    with pytest.raises(InputError, match="backbone"):
        run_recipe(FinetuneRecipe.load("photoz", [f"backbone={classifier_release}", "backbone_recipe=null"]))


# ---------------------------------------------------------------------------- the runner registry


def test_runners_by_task_name():
    from cosmofm.finetune.classification import FinetuneConfig, finetune_classification

    assert runner_for("spectral-classification") == (FinetuneConfig, finetune_classification)
    assert issubclass(FinetuneConfig, TaskFinetuneConfig)
    config_class, run = runner_for("photoz")
    assert config_class is TaskFinetuneConfig and "photoz" not in RUNNERS and run is not finetune_classification
    with pytest.raises(InputError, match="not a registered task"):
        runner_for("classification")  # the registry name is spectral-classification


def test_split_indices_are_contiguous_blocks():
    splits = split_indices(40, TaskFinetuneConfig(label_fraction=0.5))
    assert splits["train"].tolist() == list(range(12))  # half of the first 24
    assert splits["calibration"].tolist() == list(range(24, 32)) and splits["test"].tolist() == list(range(32, 40))
    with pytest.raises(InputError, match="no training labels"):
        split_indices(10, TaskFinetuneConfig(label_fraction=0.1))  # 10% of 6


@pytest.fixture
def toy_task():
    yield from registered_toy_task()


def test_a_task_with_no_finetune_code_trains_and_saves(toy_task, tmp_path):
    assert TOY not in RUNNERS and runner_for(TOY)[0] is TaskFinetuneConfig
    card = load_card("sdss-like")
    samples = mock_samples(card, 20, seed=5)
    cfg = TaskFinetuneConfig(strategy="full", epochs=2, batch_size=4, lr=1e-2, output_dir=str(tmp_path / "toy"), head={"n_outputs": 2})
    result = runner_for(TOY)[1](samples, card, cfg, backbone_config={**TINY, "survey_names": ["sdss-like"]})
    assert result["splits"]["test"] == [16, 17, 18, 19] and len(result["history"]) == 2

    model = from_pretrained(result["model_dir"], expect_task=TOY)
    assert isinstance(model, CosmoFMForToyRegression) and model.head_config.n_outputs == 2
    for name, value in result["model"].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    test = samples[16:]
    z = torch.tensor([s.meta["labels"]["redshift"] for s in test], dtype=torch.float32)
    mse = float(torch.mean((collect_outputs(model, test)["prediction"][:, 0] - z) ** 2))
    details = json.loads(Path(result["eval_results"]).read_text())["details"]
    assert details["mse"] == pytest.approx(mse, rel=1e-5) == result["metrics"]["mse"]
    assert details["calibration"] == {}  # the Task's no-op calibrate

    with pytest.raises(InputError, match="unknown settings"):
        finetune_task(TOY, samples, card, TaskFinetuneConfig(head={"n_output": 2}))
