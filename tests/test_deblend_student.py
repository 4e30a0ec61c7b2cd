"""The deblending head's fast path (heads/deblending_student.py): the student computes the
decoder's outputs from pixels alone, distillation brings them to the head's while nothing else
moves, it survives the save / load round trip, `cosmofm deblend --student` runs it over a
mosaic, and the bench (scripts/bench/deblend_student.py) measures it beside the head and sep."""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from test_deblending_head import CARD, TINY, one_thread  # noqa: F401 (one_thread: the module's autouse fixture)
from test_tiling import write_mosaic  # tests/test_tiling.py

from cosmofm.bench.deblend_student import main as bench_main
from cosmofm.bench.deblend_student import train_student
from cosmofm.data_cards import InputError
from cosmofm.finetune.deblend import deblend_image
from cosmofm.finetune.task_predict import load_task_model
from cosmofm.heads import deblending_net as net
from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig, DeblendingTask
from cosmofm.heads.deblending_data import blend_truth_arrays
from cosmofm.heads.deblending_predict import deblend_samples
from cosmofm.heads.deblending_student import distillation_loss
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from cosmofm.pretrain.manifest import save_release
from cosmofm.pretrain.tokenizers import sample_scale



@pytest.fixture(scope="module")
def blends():
    """Eight 64 x 64 blends of 2-6 objects with their truth, as the bench draws them."""
    return DeblendingTask.labelled_mocks(CARD, 8, 0)


def _head(**head) -> CosmoFMForDeblending:
    torch.manual_seed(0)
    return CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**TINY), DeblendingHeadConfig.from_card(CARD, hidden_size=32, **head))


def _teacher_and_student_outputs(model, samples):
    """The head's per-pixel outputs (backbone + decoder) and the student's, on the same pixels."""
    batch = collate_samples(samples, model.config.survey_names)
    g = batch.groups[0]
    with torch.no_grad():
        out = model.cosmofm(batch)
        pixels = net.normalised_pixels(g.values.float(), g.ivar.float(), out.token_groups[0].scale.float())
        shape = tuple(g.values.shape[-2:])
        return model._decode(out, 0, pixels, shape), model.student(pixels, shape)


def test_scale_without_the_backbone_is_the_tokenizers(blends):
    model = _head()
    batch = collate_samples(blends, model.config.survey_names)
    g = batch.groups[0]
    g.ivar[0, :, :8] = 0  # masked pixels stay out of the rms
    with torch.no_grad():
        scale = model.cosmofm(batch).token_groups[0].scale
    assert torch.allclose(sample_scale(g.values.float(), (g.ivar > 0).float()), scale, rtol=1e-6)
    assert sample_scale(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)).tolist() == [1.0, 1.0]  # all-zero stamps: 1, not 0


def test_no_student_is_a_clear_error_and_bad_widths_are_named(blends):
    model = _head()
    with pytest.raises(InputError, match="student"):
        deblend_samples(model, blends[:2], student=True)
    for bad in ([16], [16, 0], "16,32"):
        with pytest.raises(InputError, match="student_widths"):
            DeblendingHeadConfig.from_card(CARD, student_widths=bad)
    with pytest.raises(InputError, match="student_peak_threshold"):
        DeblendingHeadConfig.from_card(CARD, student_peak_threshold=1.5)


def test_distillation_brings_the_student_to_the_head_and_moves_nothing_else(blends):
    model = _head(student_widths=[8, 16, 24])
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("student.")}
    teacher, student = _teacher_and_student_outputs(model, blends)
    start = float(distillation_loss(student, teacher))
    facts = train_student(model, [(s, None) for s in blends], [8, 16, 24], steps=60, batch_size=4, lr=3e-3, seed=0, distill_weight=50.0,
                          log_every=1000)
    teacher, student = _teacher_and_student_outputs(model, blends)
    end = float(distillation_loss(student, teacher))
    assert end < 0.5 * start, (start, end)  # the student learned the head's outputs (weighted above the task loss,
    # which an untrained head's outputs do not follow)
    assert facts["parameters"] == sum(p.numel() for p in model.student.parameters()) and facts["steps"] == 60
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # backbone, decoder and refiner frozen
    assert all(p.requires_grad for p in model.parameters())  # and trainable again afterwards
    # the student's path gives a full catalogue: fluxes add up to the image with the background
    model.head_config.peak_threshold = 0.05
    out = model(collate_samples(blends[:2], model.config.survey_names), student=True)
    assert out.backbone is None  # no backbone ran
    image = torch.stack([torch.as_tensor(s.values * (s.ivar > 0)) for s in blends[:2]]).sum((-2, -1))
    total = torch.nan_to_num(out.fluxes).sum(1) + out.background_flux
    assert torch.allclose(total, image.float(), rtol=1e-4, atol=1e-2)


def test_distill_weight_zero_trains_on_the_task_alone(blends):
    model = _head(student_widths=[8, 16], distill_weight=0.0)
    targets = DeblendingTask(model.head_config).targets(blends[:2])
    out = model(collate_samples(blends[:2], model.config.survey_names), student=True, **targets)
    assert out.backbone is None and out.loss is not None and torch.isfinite(out.loss)  # no teacher ran
    model.head_config.distill_weight = 1.0
    with_teacher = model(collate_samples(blends[:2], model.config.survey_names), student=True, **targets)
    assert with_teacher.backbone is not None and float(with_teacher.loss.detach()) > float(out.loss.detach())  # the distillation term adds


def test_student_survives_save_and_load(blends, tmp_path):
    model = _head(student_widths=[8, 16, 24], student_peak_threshold=0.05)
    with torch.no_grad():
        model.student.out.bias[0] = 2.0  # peaks everywhere the student sees structure: sources to compare
    save_release(model, tmp_path / "m")
    loaded = load_task_model(tmp_path / "m", "deblending")
    assert loaded.head_config.student_widths == [8, 16, 24] and loaded.head_config.student_peak_threshold == 0.05
    a = deblend_samples(model, blends, student=True)
    b = deblend_samples(loaded, blends, student=True)
    assert sum(len(c) for c in a) > 0
    assert all(np.array_equal(x.positions, y.positions) and np.allclose(x.fluxes["head"], y.fluxes["head"]) for x, y in zip(a, b))
    # under bfloat16 autocast (the default of `cosmofm deblend` on CPUs that compute it natively) the
    # student's hidden convolutions round, its outputs and the split stay float32: same sources, close fluxes
    given = [c.positions for c in a]
    f32 = deblend_samples(loaded, blends, given, student=True)
    bf = deblend_samples(loaded, blends, given, student=True, bf16=True)
    rel = np.concatenate([(y.fluxes["head"] - x.fluxes["head"]) / np.abs(x.fluxes["head"]).clip(1e-3) for x, y in zip(f32, bf)])
    assert np.median(np.abs(rel)) < 0.01 and not np.array_equal(bf[0].fluxes["head"], f32[0].fluxes["head"])  # the autocast reached it
    # the student's own threshold: the head's path at the same threshold finds other sources
    head = deblend_samples(model, blends)
    assert [len(c) for c in head] != [len(c) for c in a]


def test_cli_path_runs_the_student_over_a_mosaic(tmp_path):
    path = tmp_path / "field.fits"
    write_mosaic(path, [(30.0, 30.0, 900, 1.8), (100.0, 150.0, 900, 1.8), (130.0, 98.0, 900, 1.8)])
    config = CosmoFMConfig(**{**TINY, "survey_names": ["lsst-like"]})
    head = DeblendingHeadConfig(n_bands=2, bands=["g", "r"], band_wavelengths=[4800.0, 6300.0], card="lsst-like", hidden_size=32)
    model = CosmoFMForDeblending.from_backbone_config(config, head)
    with pytest.raises(InputError, match="no distilled student"):
        deblend_image(path, tmp_path / "x.fits", model=model, student=True, workers=1, progress=False)
    with pytest.raises(InputError, match="student"):
        deblend_image(path, tmp_path / "x.fits", method="sep", student=True, workers=1, progress=False)
    model = CosmoFMForDeblending.from_backbone_config(config, dataclasses.replace(head, student_widths=[8, 16]))
    with torch.no_grad():
        model.student.out.bias[0] = 3.0
        model.student.out.bias[3:5] = -30.0  # the background takes nothing: segments to cut out
    save_release(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = deblend_image(path, tmp_path / "s.fits", model=tmp_path / "m", student=True, workers=1, progress=False, bf16=False)
        plain = deblend_image(path, tmp_path / "p.fits", model=tmp_path / "m", workers=1, progress=False, bf16=False)
    assert fits.getheader(tmp_path / "s.fits", 0)["STUDENT"] is True and fits.getheader(tmp_path / "p.fits", 0)["STUDENT"] is False
    assert summary["n_sources"] > 0 and summary["n_sources"] != plain["n_sources"]  # the student's peaks, not the head's


def test_bench_scores_and_times_head_student_and_sep(tmp_path):
    report = bench_main(["--out", str(tmp_path), "--n-train", "12", "--n-tune", "6", "--n-test", "4", "--test-seeds", "0",
                         "--steps", "3", "--student-steps", "3", "--student-widths", "8", "16", "--rounds", "2",
                         "--arms", "distilled", "scratch", "--save-model", str(tmp_path / "m"), "--save-teacher", str(tmp_path / "m0")])
    saved = json.loads((tmp_path / "deblend_student.json").read_text())
    assert set(saved["arms"]) == {"student distilled seed 0", "student scratch seed 0"}
    for arm in saved["arms"].values():
        speed = arm["speed"]
        assert len(speed["sep"]["stamps_per_s"]) == 2 and len(speed["head"]["ratio_to_sep"]) == 2
        assert all(r > 0 for r in next(v for k, v in speed.items() if k.startswith("student"))["ratio_to_sep"])
        assert arm["training"]["steps"] == 3
    assert {"head", "sep", "head_known_positions", "student distilled seed 0"} <= set(report["headline"])
    assert saved["machine"]["cpu_model"] and "loadavg_end" in saved["machine"]
    loaded = load_task_model(tmp_path / "m", "deblending")
    assert loaded.student is not None and loaded.head_config.distill_weight == 1.0
    assert loaded.head_config.student_peak_threshold == saved["arms"]["student distilled seed 0"]["peak_threshold"]
    # the saved student scored as it is, on test blends of another seeing: nothing trains
    shifted = bench_main(["--out", str(tmp_path / "shift"), "--model", str(tmp_path / "m"), "--arms", "loaded", "--n-train", "6",
                          "--n-tune", "6", "--n-test", "4", "--test-seeds", "0", "--rounds", "1", "--test-shift", "psf_scale=1.25"])
    assert list(shifted["arms"]) == ["student loaded"] and shifted["test_shift"] == {"psf_scale": 1.25}
    assert shifted["arms"]["student loaded"]["peak_threshold"] == loaded.head_config.student_peak_threshold
    with pytest.raises(InputError, match="no distilled student"):
        bench_main(["--out", str(tmp_path / "x"), "--model", str(tmp_path / "m0"), "--arms", "loaded", "--n-train", "6", "--n-tune", "6",
                    "--n-test", "2", "--test-seeds", "0"])


def test_a_students_own_refiner_replaces_the_heads_on_its_path_and_learns(blends, tmp_path):
    model = _head(student_widths=[8, 16], student_refine_channels=6)
    assert model.student.refiner.out.in_channels == 6 and model.student.refiner.window == model.refiner.window
    positions = [blend_truth_arrays(s)[1] for s in blends[:4]]  # known positions: the same sources on both paths
    student = lambda: deblend_samples(model, blends[:4], positions, student=True)  # noqa: E731
    head = lambda: deblend_samples(model, blends[:4], positions)  # noqa: E731
    before_student, before_head = student(), head()
    with torch.no_grad():
        model.refiner.out.bias.fill_(0.5)  # the head's refiner moves: only the head's path follows
        model.refiner.out.weight.normal_(0, 0.1)
    moved_head = head()
    assert all(np.array_equal(a.fluxes["head"], b.fluxes["head"]) for a, b in zip(before_student, student()))
    assert not all(np.allclose(a.fluxes["head"], b.fluxes["head"]) for a, b in zip(before_head, moved_head))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("student.")}
    start = model.student.refiner.out.weight.clone()
    train_student(model, [(s, None) for s in blends], [8, 16], steps=5, batch_size=4, lr=3e-3, seed=0, distill_weight=1.0,
                  log_every=1000, refine_channels=6)
    assert not torch.equal(model.student.refiner.out.weight, start)  # it trained (its last layer left zero) ...
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # ... and nothing of the head moved
    save_release(model, tmp_path / "m")
    loaded = load_task_model(tmp_path / "m", "deblending")
    assert loaded.head_config.student_refine_channels == 6 and loaded.student.refiner is not None
    a, b = student(), deblend_samples(loaded, blends[:4], positions, student=True)
    assert all(np.allclose(x.fluxes["head"], y.fluxes["head"]) for x, y in zip(a, b))
    with pytest.raises(InputError, match="student_refine_channels"):
        DeblendingHeadConfig.from_card(CARD, student_refine_channels=-1)


def test_channels_last_is_a_layout_not_a_change_of_results(blends):
    """`deblend_samples(channels_last=...)`, the CPU default: the same sources and fluxes as the
    default layout, on the head's path and the student's."""
    model = _head(student_widths=[8, 16], student_refine_channels=6)
    with torch.no_grad():
        model.decoder.out.bias[0] = model.student.out.bias[0] = 2.0  # both paths find peaks to compare
        model.student.refiner.out.weight.normal_(0, 0.1)  # and its refiner acts
    for student in (False, True):
        plain = deblend_samples(model, blends, student=student, channels_last=False)
        assert model.student.up[0][0].weight.is_contiguous()
        fast = deblend_samples(model, blends, student=student, channels_last=True)
        assert model.student.up[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        assert sum(len(c) for c in plain) > 0
        for a, b in zip(plain, fast):
            assert a.positions.shape == b.positions.shape and np.allclose(a.positions, b.positions, atol=1e-4)  # float rounding
            assert (a.segmentation == b.segmentation).mean() > 0.999
            assert np.allclose(a.fluxes["head"], b.fluxes["head"], rtol=1e-4, atol=1e-3)
