"""`cosmofm finetune --strategy student`: a fine-tuned deblending release is the frozen teacher,
only its student trains (finetune/strategies.py), the run checkpoints and resumes exactly,
the test metrics come from the student's path, and bad starts are refused before any mock."""
import json

import pytest
import safetensors.torch
import torch
from test_deblending_head import CARD, TINY, one_thread  # noqa: F401 (one_thread: the module's autouse fixture)
from test_finetune_run import no_mocks, _refused  # noqa: F401 (no_mocks: a fixture)

from cosmofm.cli import main
from cosmofm.data_cards import InputError
from cosmofm.finetune.recipe import FinetuneRecipe
from cosmofm.finetune.release import from_pretrained
from cosmofm.finetune.run import build_student_model, collect_outputs
from cosmofm.finetune.strategies import Strategy, apply_strategy
from cosmofm.heads import deblending_net as net
from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig, DeblendingTask
from cosmofm.heads.deblending_student import PixelStudent, distillation_loss
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from cosmofm.pretrain.checkpoint import save_release

SMALL = ["finetune", "--task", "deblending", "--strategy", "student", "--set", "mocks.stamp_size=32", "--n-train", "20",
         "--batch-size", "4", "--lr", "1e-2", "--workers", "1"]
STUDENT = [*SMALL, "--set", "finetune.head.student_widths=[8,16]", "--set", "finetune.head.distill_weight=50"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A deblending release without a student (the head as `cosmofm finetune` saves it), whose
    heatmap is raised from its prior (p = 0.01) so that its structure makes peaks to copy."""
    torch.manual_seed(0)
    model = CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**TINY), DeblendingHeadConfig.from_card(CARD, hidden_size=32))
    with torch.no_grad():
        model.decoder.out.bias[0] = 1.0
    return save_release(model, tmp_path_factory.mktemp("teacher") / "model")


def _student(teacher, out, *extra: str) -> int:
    return main([*STUDENT, "--backbone", str(teacher), "--output", str(out), *extra])


def _weights(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def student_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    assert _student(teacher, out, "--epochs", "10") == 0
    return out


def test_only_the_student_trains_and_it_learns_the_teachers_outputs(teacher, student_run):
    ours, theirs = _weights(student_run / "model"), _weights(teacher)
    assert {k for k in ours if not k.startswith("student.")} == set(theirs)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())  # backbone, decoder and refiner: the teacher's, bit for bit
    model = from_pretrained(student_run / "model", expect_task="deblending")
    calibrated = json.loads((student_run / "eval_results.json").read_text())["details"]["calibration"]
    assert model.head_config.student_widths == [8, 16] and model.head_config.student_peak_threshold == calibrated["peak_threshold"]
    assert model.head_config.peak_threshold == from_pretrained(teacher).head_config.peak_threshold  # the teacher's path keeps its own
    assert json.loads((student_run / "finetune_config.json").read_text())["strategy"] == "student"
    # against the same student untrained (the run's seed, the teacher's config): the distance to the teacher fell
    # (distill_weight 50: an untrained teacher's outputs do not follow the task loss)
    torch.manual_seed(0)
    fresh = CosmoFMForDeblending(CosmoFMConfig.from_dict(model.config.to_dict()))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("student.")}, strict=False)
    blends = DeblendingTask.labelled_mocks(CARD, 8, 1, stamp_size=32)
    batch = collate_samples(blends, model.config.survey_names)
    with torch.no_grad():
        out = model.cosmofm(batch)
        g = batch.groups[0]
        pixels = net.normalised_pixels(g.values.float(), g.ivar.float(), out.token_groups[0].scale.float())
        head = model._decode(out, 0, pixels, (32, 32))
        floor = float(distillation_loss(head, head))  # the heatmap's cross-entropy with itself
        trained, untrained = (float(distillation_loss(m.student(pixels, (32, 32)), head)) - floor for m in (model, fresh))
    assert trained < 0.9 * untrained, (trained, untrained)  # 0.80 at these 30 steps; an untrained student: 1


def test_the_test_metrics_are_the_students(student_run):
    model = from_pretrained(student_run / "model", expect_task="deblending")
    details = json.loads((student_run / "eval_results.json").read_text())["details"]
    mocks = {**FinetuneRecipe.load("deblending").mocks, "stamp_size": 32}  # the run's blends
    splits_test = DeblendingTask.labelled_mocks(CARD, 20, 0, **mocks)[16:]  # the last 4: the test block
    task = DeblendingTask(model.head_config)
    targets = task.targets(splits_test)
    student = task.metrics(collect_outputs(model, splits_test, 4, student=True), targets)["detection"]
    head = task.metrics(collect_outputs(model, splits_test, 4), targets)["detection"]
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN equals NaN)
    assert same(details["detection"], student) and not same(student, head)  # the head's path finds other peaks


def test_a_student_run_resumes_exactly(teacher, student_run, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _student(teacher, whole, "--epochs", "2") == 0
    assert _student(teacher, cut, "--epochs", "2", "--checkpoint-every", "3", "--set", "finetune.max_steps=3") == 0
    assert _student(teacher, cut, "--epochs", "2", "--checkpoint-every", "3", "--resume") == 0
    reference, resumed = _weights(whole / "model"), _weights(cut / "model")
    assert reference.keys() == resumed.keys() and all(torch.equal(resumed[k], v) for k, v in reference.items())
    assert not all(torch.equal(_weights(student_run / "model")[k], v) for k, v in reference.items())  # 10 epochs moved it further


def test_a_student_release_continues_its_own_student(student_run, tmp_path):
    """A release that has a student, distilled again with the same widths, starts from that student."""
    model = build_student_model("deblending", student_run / "model", {}, seed=5)
    saved = _weights(student_run / "model")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    wider = build_student_model("deblending", student_run / "model", {"student_widths": [8, 16, 24]}, seed=5)
    assert len(wider.student.down) == 3  # a new shape: a fresh student, the teacher's tensors kept
    assert all(torch.equal(v, saved[k]) for k, v in wider.state_dict().items() if not k.startswith("student."))


def test_bad_starts_are_refused_before_any_mock(no_mocks, teacher, capsys, tmp_path):
    argv = [*STUDENT, "--output", str(tmp_path / "x")]
    _refused(capsys, argv, "backbone", "student")  # nothing to distil
    _refused(capsys, [*argv, "--backbone", str(teacher), "--set", "finetune.head.hidden_size=64"], "head", "teacher's tensors")
    _refused(capsys, [*SMALL, "--output", str(tmp_path / "x"), "--backbone", str(teacher)], "no student", "student_widths")
    _refused(capsys, [*argv, "--backbone", str(teacher), "--layer-decay", "0.5"], "layer_decay", "student")


def test_the_strategy_refuses_a_model_without_a_student_and_freezes_the_rest():
    torch.manual_seed(0)
    model = CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**TINY), DeblendingHeadConfig.from_card(CARD, hidden_size=32))
    with pytest.raises(InputError, match="has none"):
        apply_strategy(model, Strategy("student"), 1e-3, 0.01)
    model._set_task(student_widths=[8, 16])
    model.student = PixelStudent.from_head(model.head_config)
    groups = apply_strategy(model, Strategy("student"), 1e-3, 0.01)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.student.parameters()}
    assert Strategy("student").forward_options() == {"student": True} and Strategy("full").forward_options() == {}
