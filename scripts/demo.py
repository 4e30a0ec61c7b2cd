"""`cosmofm demo`: the main job end to end on the embedded default data.

Generates mocks of all four modalities (spectra, images, HI cubes, 21cm lightcones),
pretrains a small backbone, shows the loss falling, saves a safetensors release,
reloads it with `AutoModel.from_pretrained`, checks it on held-out mocks, and
publishes the release (weights, generated model card with the held-out metrics, data
cards, recipe, manifest) to a hub, then loads it back by repo id. The hub is a
local-directory hub under the output folder unless `hub_endpoint` names another.
Last, it fine-tunes the spectral classifier twice on that backbone and classifies the
same 4MOST-like ESO file with each: once on mocks of another instrument (sdss-like: the
file should be flagged out of set), once on mocks of the file's own card (4most-lrs:
what a survey team would do).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.hub import pull, push
from cosmofm.finetune.local_hub import local_hub_root
from cosmofm.finetune.release_folder import EVAL_NAME
from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, collate_samples
from cosmofm.pretrain.checkpoint import atomic_write_json
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import load_pretraining_model, pretrain

HELD_OUT_SEED = 10_000  # objects the model never saw
DEMO_REPO_ID = "cosmofm/demo"


def run_demo(output: str | Path = "outputs/demo", steps: int | None = None, hub_endpoint: str | None = None,
             repo_id: str = DEMO_REPO_ID, n_labelled: int = 1200) -> dict:
    t0 = time.perf_counter()
    output = Path(output)
    overrides = [f"run.output_dir={output / 'pretrain'}"]
    if steps is not None:
        overrides.append(f"optim.max_steps={steps}")
    recipe = PretrainRecipe.load("demo", overrides)
    print(f"[1/6] pretraining on mocks of {', '.join(recipe.data.mock_cards)} for {recipe.optim.max_steps} steps")
    summary = pretrain(recipe, overwrite=True)  # the demo's own folder: a second demo replaces the first one's run
    losses = summary["losses"]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"      loss (mean of first/last {k} steps): {first:.4g} -> {last:.4g}")
    plot = plot_loss_curve(Path(summary["metrics"]), output / "loss_curve.png")

    print("[2/6] reloading the release with transformers.AutoModel.from_pretrained")
    from transformers import AutoModel

    import cosmofm

    backbone = AutoModel.from_pretrained(summary["model_dir"])
    verified = cosmofm.from_pretrained(summary["model_dir"])  # checksums verified
    trained = load_pretraining_model(recipe.run.output_dir)
    held_out = _held_out_batch(recipe, backbone.config)
    with torch.no_grad():
        same = torch.equal(backbone(held_out).pooled, trained.cosmofm(held_out).pooled)
        same = same and torch.equal(verified(held_out).pooled, trained.cosmofm(held_out).pooled)
    print(f"      {type(backbone).__name__} reloaded; embeddings identical to the trained model: {same}")

    print("[3/6] held-out mocks (new objects)")
    report = evaluate_held_out(trained, held_out)
    untrained = evaluate_held_out(_untrained_like(trained), held_out)
    print(f"      masked-token chi2/dof: pretrained {report['masked_chi2']:.3g} vs untrained {untrained['masked_chi2']:.3g}")
    print(f"      spectrum->image retrieval top-1: {report['retrieval_top1']:.2f} (chance {1 / report['n_pairs']:.2f}, untrained {untrained['retrieval_top1']:.2f})")
    write_eval_results(report, untrained, recipe.data.mock_cards, Path(recipe.run.output_dir) / EVAL_NAME)

    hub = hub_endpoint or str(output / "hub")
    print(f"[4/6] publishing the release to the hub {hub} and loading it back by repo id")
    published = push(recipe.run.output_dir, repo_id, hub_endpoint=hub, commit_message="cosmofm demo release")
    print(f"      pushed {published.repo_id} revision {published.revision}, commit {published.commit}")
    from_hub = cosmofm.from_pretrained(repo_id, revision=published.commit, hub_endpoint=hub)  # downloads + verifies
    loaded = {"cosmofm.from_pretrained": from_hub}
    if local_hub_root(hub) is None and _is_default_endpoint(hub):  # transformers reads HF_ENDPOINT only
        loaded["AutoModel.from_pretrained"] = AutoModel.from_pretrained(repo_id, revision=published.commit)
    with torch.no_grad():
        reference = trained.cosmofm(held_out).pooled
        hub_same = all(torch.equal(m(held_out).pooled, reference) for m in loaded.values())
    folder = pull(repo_id, revision=published.commit, hub_endpoint=hub)
    print(f"      loaded by repo id with {' and '.join(loaded)}; embeddings identical: {hub_same}")
    print(f"      (cosmofm pull {repo_id} --revision {published.commit} --hub-endpoint {hub})")
    eso_file, truth = write_eso_file(output)  # one file, classified by both classifiers
    classification = finetune_and_classify(output, summary["model_dir"], eso_file, truth, n_labelled=n_labelled)
    own_card = finetune_and_classify(output, summary["model_dir"], eso_file, truth, n_labelled=n_labelled, card_name=ESO_FILE_CARD, step="[6/6]")
    report = {"loss_first": first, "loss_last": last, "held_out": report, "held_out_untrained": untrained, "reload_identical": bool(same),
              "hub": {"endpoint": hub, "repo_id": repo_id, "revision": published.revision, "commit": published.commit,
                      "local_folder": str(folder), "reload_identical": bool(hub_same)},
              "classification": classification, "classification_own_card": own_card, "seconds": time.perf_counter() - t0}
    (output / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nWritten under {output}/:\n"
        f"  release (safetensors + config + manifest): {summary['model_dir']}\n"
        f"  published: {repo_id} (commit {published.commit[:12]}) on {hub}; model card: {folder / 'README.md'}\n"
        f"  training checkpoints: {recipe.run.output_dir}/checkpoints  (resume: cosmofm pretrain --config {recipe.run.output_dir}/recipe.yaml --resume)\n"
        f"  metrics per step: {summary['metrics']}\n  loss curve: {plot}\n"
        f"  classifiers (release, eval_results.json, figures): {classification['output_dir']}, {own_card['output_dir']}\n"
        f"  classified catalogues of a 4MOST-like ESO file: {classification['catalogue']} ({classification['card']} model), "
        f"{own_card['catalogue']} ({own_card['card']} model, the file's instrument)\n"
        f"  TensorBoard / wandb (offline) logs: {recipe.run.output_dir}\n  report: {output / 'demo_report.json'}\n"
        f"done in {report['seconds']:.0f} s"
    )
    return report


ESO_FILE_CARD = "4most-lrs"  # the instrument of the demo's ESO Phase 3 file


def write_eso_file(output: Path, n_new: int = 200) -> tuple[Path, dict]:
    """A 4MOST-like ESO Phase 3 file of `n_new` new objects (mocks of `ESO_FILE_CARD`) in
    `output`, and each object's labels by its id (the truth the demo scores against)."""
    from cosmofm.data_cards.io.survey_files import write_eso_sdp

    new = mock_samples(load_card(ESO_FILE_CARD), n_new, seed=HELD_OUT_SEED + 2)
    eso = write_eso_sdp(new, output / "ADP.demo-4most-lrs.fits", objects=[s.id for s in new])
    return eso, {s.id: s.meta["labels"] for s in new}


def finetune_and_classify(output: Path, backbone_dir: str, eso_file: Path, truth: dict, n_labelled: int = 1200,
                          card_name: str = "sdss-like", step: str = "[5/6]") -> dict:
    """Fine-tune the spectral classification head on labelled mocks of `card_name`, then
    classify the 4MOST-like ESO Phase 3 file `eso_file` (`write_eso_file`; `truth`: its
    objects' labels by id), as a user would, and score it; print how many spectra of the file
    were flagged out of set (issue 17) and low coverage. A classifier of another instrument
    should flag the file, one fine-tuned on its own card (`ESO_FILE_CARD`) should classify it."""
    from cosmofm.data_cards.io.catalogue import read_catalogue
    from cosmofm.finetune.classification import FinetuneConfig, finetune_classification
    from cosmofm.finetune.classify import classify
    from cosmofm.heads.metrics import redshift_metrics

    card = load_card(card_name)
    print(f"{step} fine-tuning the spectral classifier (13 classes + redshift) on {n_labelled} labelled {card.name} mocks")
    labelled = mock_samples(card, n_labelled, seed=HELD_OUT_SEED + 1)
    folder = output / ("classifier" if card_name == "sdss-like" else f"classifier-{card_name}")
    cfg = FinetuneConfig(strategy="full", epochs=6, batch_size=32, lr=2e-3, backbone_lr_scale=0.3, output_dir=str(folder))
    result = finetune_classification(labelled, card, cfg, backbone=backbone_dir)
    m = result["metrics"]
    print(f"      test block: accuracy {m['accuracy']:.3f}, macro recall {m['macro_recall']:.3f}, ECE {m['ece_after']:.3f} "
          f"(before temperature {m['ece_before']:.3f}), conformal coverage {m['conformal_coverage']:.3f} (nominal {1 - m['conformal_alpha']:.2f})")
    catalogue = output / ("classified.fits" if card_name == "sdss-like" else f"classified-{card_name}.fits")
    summary = classify([str(eso_file)], result["model_dir"], catalogue, progress=False, overwrite=True)  # the demo's own file
    rows = read_catalogue(catalogue)
    correct = np.array([str(c) == truth[str(o)]["spectral_class"] for o, c in zip(rows["OBJECT"], rows["CLASS"])])
    flagged = np.asarray(rows["OUT_OF_SET"], dtype=bool) if "OUT_OF_SET" in rows.colnames else np.zeros(len(rows), bool)
    accuracy = float(np.mean(correct))
    kept = float(np.mean(correct[~flagged])) if (~flagged).any() else float("nan")
    z_true = np.array([truth[str(o)]["redshift"] for o in rows["OBJECT"]])
    z_scores = {key: redshift_metrics(z_true, np.ma.filled(rows[key], np.nan))["redshift_catastrophic_fraction"] for key in ("Z", "Z_NETWORK")}
    own = "the file's own instrument" if card_name == ESO_FILE_CARD else f"an instrument the {card.name} model never saw"
    unflagged = f"{kept:.3f} of those not flagged" if (~flagged).any() else "every spectrum flagged"
    print(f"      classified {len(rows)} spectra of a 4MOST-like ESO file ({own}): accuracy {accuracy:.3f} (chance {1 / 13:.3f}), "
          f"{unflagged}; catastrophic redshifts {z_scores['Z']:.3f} (scan of the predicted class; the network's own {z_scores['Z_NETWORK']:.3f})")
    detector = (f"the detector was set for {m['ood_target_rate']:.1%} false flags, test block {m['ood_false_flag_rate']:.1%}"
                if m["ood_threshold"] is not None else f"no threshold: {m['n_calibration']} calibration spectra cannot resolve {m['ood_target_rate']:.1%}")
    print(f"      out-of-set flags: {summary['n_out_of_set']} of {len(rows)} spectra (OUT_OF_SET; {detector}), low coverage: {summary['n_low_coverage']}")
    return {"card": card.name, "output_dir": result["output_dir"], "catalogue": str(catalogue),
            "test_metrics": {k: m[k] for k in ("accuracy", "macro_recall", "ece_before", "ece_after", "conformal_coverage")},
            "eso_file_accuracy": accuracy, "eso_file_accuracy_not_flagged": kept, "eso_file_catastrophic_z": z_scores["Z"],
            "eso_file_catastrophic_z_network": z_scores["Z_NETWORK"],
            "eso_file_out_of_set": summary["n_out_of_set"], "eso_file_low_coverage": summary["n_low_coverage"]}


def _is_default_endpoint(endpoint: str) -> bool:
    from huggingface_hub import constants

    return endpoint.rstrip("/") == constants.ENDPOINT.rstrip("/")


def write_eval_results(report: dict, untrained: dict, cards: list[str], path: Path) -> Path:
    """The held-out metrics as the evaluation JSON that the model card renders."""
    dataset = {"type": "+".join(cards), "name": f"cosmofm held-out mocks (seed {HELD_OUT_SEED})", "split": "test"}
    results = [
        {"task": {"type": "masked-modelling", "name": "Masked-token reconstruction"}, "dataset": dataset,
         "metrics": [{"type": "chi2_per_dof", "name": "masked chi2/dof", "value": report["masked_chi2"]},
                     {"type": "chi2_per_dof", "name": "masked chi2/dof, untrained baseline", "value": untrained["masked_chi2"]}]},
        {"task": {"type": "cross-modal-retrieval", "name": "Spectrum-to-image retrieval"}, "dataset": dataset,
         "metrics": [{"type": "accuracy", "name": "top-1 accuracy", "value": report["retrieval_top1"]},
                     {"type": "accuracy", "name": "top-1 accuracy, chance", "value": 1 / report["n_pairs"]}]},
    ]
    atomic_write_json(path, {"results": results})
    return path


def plot_loss_curve(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy([r["step"] for r in rows], [r["loss"] for r in rows], label="total")
    for name in sorted({m for r in rows for m in r.get("per_modality_chi2", {})}):
        pts = [(r["step"], r["per_modality_chi2"][name]) for r in rows if name in r.get("per_modality_chi2", {})]
        ax.semilogy(*zip(*pts), lw=0.8, alpha=0.7, label=f"{name} chi2/dof")
    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="noise floor")
    ax.set(xlabel="optimizer step", ylabel="loss", title="cosmofm pretraining (masked chi2 + alignment)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _untrained_like(model: CosmoFMForPretraining) -> CosmoFMForPretraining:
    torch.manual_seed(0)
    return CosmoFMForPretraining(model.config).eval()


def _held_out_batch(recipe: PretrainRecipe, config: CosmoFMConfig, n_pairs: int = 64):
    samples = []
    for name in recipe.data.mock_cards:
        card = load_card(name)
        n = n_pairs if card.modality in ("spectrum", "image") else 16
        samples += mock_samples(card, n, seed=HELD_OUT_SEED)
    return collate_samples(samples, config.survey_names, seeds=range(len(samples)))


@torch.no_grad()
def evaluate_held_out(model: CosmoFMForPretraining, batch) -> dict:
    out = model(batch)
    z = torch.nn.functional.normalize(model.contrastive.proj(out.backbone.pooled), dim=-1)
    rows = {g.modality: g.rows for g in out.backbone.token_groups}
    spec, img = rows["spectrum"], rows["image"]
    sim = z[spec] @ z[img].T  # pairs share an index: spectrum i <-> image i
    top1 = (sim.argmax(1) == torch.arange(len(spec))).float().mean()
    return {"masked_chi2": float(out.per_sample_chi2.mean()), "retrieval_top1": float(top1), "n_pairs": len(spec)}
