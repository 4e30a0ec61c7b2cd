"""Out-of-set detection of saved classifiers, per choice of the features the detector reads (issue 17).

For each fine-tuned classifier of `classify_survey` (e.g. the shared backbone's three seeds)
and each `ood_features` of heads/out_of_set.py ("backbone": the last block's token mean
before the final norm; "head": the pooled embedding next to the hidden layer), the detector
is fitted on the TRAINING block and its threshold set on the CALIBRATION block (the split of
`classify_survey`; a model already fitted with that choice keeps its own fit), then scored
by `classify_survey.out_of_set_scores` on the in-set test block and on out-of-set mock sets
(1,000 each: M, carbon and white-dwarf stars, sky and broken fibres). The out-of-set mocks
are the test only: nothing is fitted or tuned on them. Also the macro recall of the test
spectra left after the flags (flagged in-set spectra are not classified).
Run: `python -m cosmofm.bench.classify_out_of_set --models W/finetune-shared-multimodal-seed{0,1,2}/model
--work W --cache DIR --oos-seeds 7 8 --out docs/bench --name classify_out_of_set_s10`
(W: the `--work` of classify_survey, holding its labelled mocks; new out-of-set sets go to --cache).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from cosmofm.bench.classify_quality import mock_folder
from cosmofm.bench import write_report
from cosmofm.bench.classify_survey import CARD, LABELLED_SEED, SPLIT, _recalls, _spread, detector_scores, labelled_folder, out_of_set_mocks, out_of_set_scores
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.classification import FinetuneConfig
from cosmofm.finetune.classify import load_classifier, predict
from cosmofm.finetune.run import split_indices
from cosmofm.heads.classification import labels_from_samples
from cosmofm.heads.out_of_set import DEFAULT_FALSE_FLAG_RATE, OOD_FEATURES


def with_features(model, features: str, train: list, train_labels: np.ndarray, calibration: list, rate: float = DEFAULT_FALSE_FLAG_RATE):
    """`model` with its detector reading `features`: kept as saved when it already does (and is
    fitted), else refitted on the training block, threshold on the calibration block."""
    head = model.head_config
    if head.ood_features == features and head.ood_fitted:
        return model
    model._set_task(ood_features=features, ood_fitted=False, ood_threshold=None)
    model.ood = None  # the detector's width follows the features: set_out_of_set makes a new one
    fit_on, cal_on = (predict(model, block, batch_size=256, features=True)["features"] for block in (train, calibration))
    model.set_out_of_set(fit_on, train_labels, cal_on, rate)
    return model


def run(models: list[str], work: Path, cache: Path, oos_seeds: list[int], n: int) -> dict:
    card = load_card(CARD)
    samples = mock_folder(card, labelled_folder(work, card.name, n), n, LABELLED_SEED)
    splits = split_indices(len(samples), FinetuneConfig(**SPLIT))
    block = {name: [samples[int(i)] for i in index] for name, index in splits.items()}
    sets = {seed: out_of_set_mocks(card, work, seed, cache) for seed in oos_seeds}
    report = {"machine": machine_info(), "card": CARD, "n_samples": n, "labelled_seed": LABELLED_SEED, "out_of_set_seeds": oos_seeds,
              "false_flag_rate_target": DEFAULT_FALSE_FLAG_RATE, "models": models, "runs": []}
    for path in models:
        for features in OOD_FEATURES:
            t0 = time.perf_counter()
            model = load_classifier(path)
            labels = labels_from_samples(samples, model.head_config)[0].numpy()
            model = with_features(model, features, block["train"], labels[splits["train"]], block["calibration"])
            y, flagged = labels[splits["test"]], detector_scores(model, block["test"])[1]
            pred = predict(model, block["test"], batch_size=256)["logits"].argmax(1)
            row = {"model": path, "ood_features": features, "threshold": model.head_config.ood_threshold,
                   "macro_recall_all": float(np.nanmean(_recalls(pred, y, len(model.class_names)))),
                   "macro_recall_kept": float(np.nanmean(_recalls(pred[~flagged], y[~flagged], len(model.class_names)))),
                   "out_of_set": {str(seed): out_of_set_scores(model, block["test"], oos) for seed, oos in sets.items()}}
            row["seconds"], row["load_average"] = time.perf_counter() - t0, os.getloadavg()
            report["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("model", "ood_features", "macro_recall_kept")} | {s: r["auroc"] for s, r in row["out_of_set"].items()}), flush=True)
    report["summary"] = summary(report["runs"])
    return report


def summary(runs: list[dict]) -> dict:
    """Per features and out-of-set seed: mean and spread over models of AUROC, false flags, detection per kind."""
    out = {}
    for features in sorted({r["ood_features"] for r in runs}):
        rows = [r for r in runs if r["ood_features"] == features]
        out[features] = {"macro_recall_change": _spread([r["macro_recall_kept"] - r["macro_recall_all"] for r in rows])}
        for seed in rows[0]["out_of_set"]:
            oos = [r["out_of_set"][seed] for r in rows]
            out[features][f"seed {seed}"] = {k: _spread([o[k] for o in oos]) for k in ("auroc", "false_flag_rate", "detection_rate")}
            out[features][f"seed {seed}"]["per_kind"] = {k: _spread([o["detection_rate_per_kind"][k] for o in oos]) for k in oos[0]["detection_rate_per_kind"]}
    return out


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="release folders of fine-tuned classifiers (classify_survey's)")
    p.add_argument("--work", required=True, help="classify_survey's --work: its labelled mocks (and out-of-set set) are read from here")
    p.add_argument("--cache", default=None, help="where out-of-set sets not in WORK are written (default WORK)")
    p.add_argument("--oos-seeds", type=int, nargs="+", default=[7], help="out-of-set mock sets (7 = classify_survey's)")
    p.add_argument("--n", type=int, default=14000, help="labelled mocks of classify_survey (its split)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--name", default="classify_out_of_set")
    args = p.parse_args(argv)
    work = Path(args.work)
    report = run(args.models, work, Path(args.cache) if args.cache else work, args.oos_seeds, args.n)
    return write_report(args.out, f"{args.name}.json", report)


if __name__ == "__main__":
    main()
