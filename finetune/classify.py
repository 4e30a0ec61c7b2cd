"""Inference with a fine-tuned classifier: predictions on samples, catalogues of survey files.

    classify(["spec-4055-55359-0001.fits"], "runs/cls/model", "predictions.fits")

`predict` gives the raw logits and network redshifts of samples in memory (what
calibration and evaluation score); `classify` streams survey files through the shared
predict path (`finetune/predict.py`) with `ClassificationPredictor`, the task's part:
class probabilities, conformal sets, and a redshift per spectrum from the redshift scan
(`heads/redshift_scan.py`), the template fit or the network (`redshift_method`), with
spectra too masked to classify flagged and skipped (`classifiable`), and two flags on
classified spectra whose conformal set is then empty (issue 17): OUT_OF_SET (the
out-of-set detector of heads/out_of_set.py scores them unlike every class) and
LOW_COVERAGE (`low_coverage`: their valid pixels span too little of the card's range).
Both are bool columns, and codes in FLAGS too, so the run's summary counts them. A head
that de-reddens (`galactic_dereddening`, data_cards/dust.py) reads each spectrum divided by
the Milky-Way dust of its file's E(B-V); one whose file gives none is read as it is and
flagged NO_EBV (`no_ebv`, in FLAGS only: its set is kept, the dust of high latitudes is small).
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import numpy as np
import torch

from cosmofm.data_cards.dust import DEREDDENED_KEY, DustMap
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads.calibration import ensemble_prediction
from cosmofm.heads.classification import CosmoFMForSpectralClassification
from cosmofm.heads.out_of_set import log_wavelength_coverage
from cosmofm.heads.redshift_scan import redshift_candidates, scan_collated
from cosmofm.heads.template_fit import REDSHIFT_METHODS
from cosmofm.pretrain.data import collate_samples


def _batches(samples: Sequence[Sample], index: np.ndarray, batch_size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(index), batch_size):
        yield [samples[int(i)] for i in index[start : start + batch_size]]


@torch.no_grad()
def predict(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], batch_size: int = 64, device=None,
            mc_samples: int = 0, features: bool = False) -> dict[str, np.ndarray]:
    """Raw logits (N, C), redshift and its error (N,) for samples, in order; with
    mc_samples > 0 also "mc_logits" (S, N, C) of Monte-Carlo-dropout passes of the head;
    "ood_score" (N,) once the out-of-set detector is fitted; with `features` the
    "features" (N, P + H) the detector reads (what it is fitted on)."""
    model.eval()
    device = device or next(model.parameters()).device
    names = model.config.survey_names
    samples = model.input_spectra(samples)
    logits, z, z_err, mc, ood, feats = [], [], [], [], [], []
    for chunk in _batches(samples, np.arange(len(samples)), batch_size):
        out = model(collate_samples(chunk, names).to(device), mc_samples=mc_samples)
        logits.append(out.logits.float().cpu())
        if out.mc_logits is not None:
            mc.append(out.mc_logits.float().cpu())
        if out.redshift is not None:
            z.append(out.redshift.float().cpu())
            z_err.append(out.redshift_err.float().cpu())
        if out.ood_score is not None:
            ood.append(out.ood_score.cpu())
        if features:
            feats.append(out.features.float().cpu())
    res = {"logits": torch.cat(logits).numpy()}
    if mc:
        res["mc_logits"] = torch.cat(mc, dim=1).numpy()
    if ood:
        res["ood_score"] = torch.cat(ood).numpy()
    if feats:
        res["features"] = torch.cat(feats).numpy()
    if z:
        res["redshift"], res["redshift_err"] = torch.cat(z).numpy(), torch.cat(z_err).numpy()
    return res


def load_classifier(model) -> CosmoFMForSpectralClassification:
    """A classification model from a release folder / repo id (verified) or as given."""
    if isinstance(model, CosmoFMForSpectralClassification):
        return model
    from cosmofm.finetune.release import from_pretrained
    from cosmofm.heads.classification import TASK_TYPE

    return from_pretrained(model, expect_task=TASK_TYPE)  # a backbone or another task's model: refused before loading


def untemplated_classes(clf: CosmoFMForSpectralClassification) -> list[str]:
    """The model's classes the redshift templates (heads.template_fit) do not know: the scan
    and the template fit need none."""
    from cosmofm.heads.template_fit import CLASSES as TEMPLATE_CLASSES

    return sorted(set(clf.class_names) - set(TEMPLATE_CLASSES))


def redshift_method(clf: CosmoFMForSpectralClassification, requested: str | None = None) -> str:
    """Where a catalogue's Z comes from: `requested`, or by default "network" when the model
    carries a redshift network (issue 17: fewer catastrophic redshifts than the scan at the
    same NMAD, 40,000 spectra in 9.3 s on 2 idle cores against the scan's 7.9 s; docs/benchmarks.md),
    else "scan" when the templates know every class of the model, else "network" (the
    head's own regression)."""
    missing = untemplated_classes(clf)
    if requested is None:
        return "network" if missing or clf.redshift_net is not None else "scan"
    if requested not in REDSHIFT_METHODS:
        raise InputError("redshift", f"is {requested!r}", f"use one of {', '.join(REDSHIFT_METHODS)}")
    if requested != "network" and missing:
        raise InputError("redshift", f"{requested!r} needs templates for every class; {missing} have none", "use redshift 'network' for this model's own classes")
    return requested


def classify(inputs, model, output, batch_size: int = 256, card=None, progress: bool = True, redshift: str | None = None,
             mc_samples: int = 0, chunk_rows: int = 1024, overwrite: bool = False, dust_map=None) -> dict:
    """Classify every spectrum in `inputs`; write one catalogue row per object to `output` (.fits / .parquet).

    Each row: ID, CARD, FILE, the file's identifiers (PLATE/MJD/FIBERID, TARGETID, OBJECT,
    RA/DEC), CLASS, P_<class> per class (temperature-scaled), CONFORMAL_SET ('|'-joined
    class names), Z and Z_ERR (dimensionless), FLAGS ('|'-joined reader flag codes).
    `redshift` (`redshift_method`): where Z and Z_ERR come from, for the predicted class:
    "network" (the default for a model that carries a redshift network: heads/redshift_net.py,
    trained with FinetuneConfig.redshift_net_steps; no class needed, its errors calibrated
    for the predicted class's family; without one, the head's own regression, poor for
    galaxies and QSOs), "scan" (the default otherwise; heads.redshift_scan, eigenspectra of
    that class scanned over its redshift range for whole batches, thousands of spectra/s)
    or "template" (the full template fit of that class, heads.template_fit.refine_redshifts,
    ~50 spectra/s). With a fit, Z_NETWORK
    keeps the network's. `mc_samples` > 0: EPISTEMIC, the mutual information [nats] of
    that many Monte-Carlo-dropout passes of the head. With a fitted out-of-set detector:
    OOD_SCORE and OUT_OF_SET (the score above its threshold); always LOW_COVERAGE
    (`low_coverage`). Flagged spectra keep their class and probabilities, but get an empty
    CONFORMAL_SET and the codes out_of_set / low_coverage in FLAGS. `dust_map`: a folder of
    SFD98 map files (data_cards.dust.DustMap) giving spectra whose files carry no E(B-V) the
    map's value at their RA/Dec, for a head that de-reddens (else no_ebv in FLAGS).
    Objects the reader flagged and skipped, objects with fewer unmasked pixels than one
    token of the model (`min_unmasked_pixels`: all_masked, too_few_pixels), and files it
    could not use or that hold no objects (empty_file), get a row with their flags and
    null predictions (no class, NaN probabilities and redshift, no conformal set); one bad
    object never costs the others of its file. InputError when nothing usable remains.

    The catalogue is written atomically (temporary file + rename) and never over one of
    the inputs, nor into a folder of inputs that is read; an existing `output` is replaced
    only with `overwrite`. Returns {"output", "n_rows", "n_classified", "n_files",
    "n_out_of_set", "n_low_coverage", "flags": {code: rows}, "redshift": the method}.

    Streaming (the shared predict path, `finetune.predict.predict_files`): files are cut
    into pieces of at most `chunk_rows` objects; one worker per CPU core (a forked process
    on Linux, a thread elsewhere) reads a piece and runs `ClassificationPredictor` on it
    in batches of `batch_size` (the redshift scan on the whole piece at once), and each
    piece's rows go to disk as soon as it is done. The default piece keeps each array of
    BOSS-like spectra (1024 x 4608 float32, 19 MB) under glibc's 32 MB mmap threshold:
    with worker threads, pieces of 2048 rows classified 40,000 spectra ~30 % slower on 2
    cores (worker processes keep freed memory anyway).
    """
    from cosmofm.finetune.predict import predict_files

    clf = load_classifier(model).eval()
    method = redshift_method(clf, redshift)
    if mc_samples < 0:
        raise InputError("mc_samples", f"must be >= 0, got {mc_samples}", "e.g. 20, or 0 for none")
    if batch_size < 1:
        raise InputError("batch_size", f"must be >= 1, got {batch_size}", "e.g. 256 spectra per batch")
    dust = None
    if dust_map is not None:
        if not clf.head_config.galactic_dereddening:
            raise InputError("dust_map", "was given, but this model's head does not de-redden (galactic_dereddening is off)",
                             "leave --dust-map out, or fine-tune with head {galactic_dereddening: true}")
        dust = DustMap(dust_map)
    predictor = ClassificationPredictor(clf, batch_size, method, mc_samples, dust)
    summary = predict_files(inputs, predictor, output, card=card, progress=progress, chunk_rows=chunk_rows, overwrite=overwrite)
    return {"output": summary["output"], "n_rows": summary["n_rows"], "n_classified": summary["n_predicted"],
            "n_files": summary["n_files"], "n_out_of_set": summary["flags"].get(OUT_OF_SET, 0),
            "n_low_coverage": summary["flags"].get(LOW_COVERAGE, 0), "flags": summary["flags"], "redshift": method}


class ClassificationPredictor:
    """Classification's part of the predict path (`finetune.predict.Predictor`): class
    probabilities, conformal sets and a redshift per spectrum of a piece, spectra with too
    few unmasked pixels skipped (`classifiable`). `redshift`: see `classify` (already
    checked by `redshift_method`); `mc_samples` > 0 runs one piece at a time (Monte-Carlo
    dropout switches the head to training mode for its passes); `dust_map` fills the E(B-V)
    of spectra whose files have none (`classify`)."""

    verb, modality = "classify", "spectrum"

    def __init__(self, clf: CosmoFMForSpectralClassification, batch_size: int = 256, redshift: str = "network", mc_samples: int = 0,
                 dust_map: DustMap | None = None):
        from cosmofm.heads.classification import ClassificationTask
        from cosmofm.heads.redshift_scan import RedshiftScanner

        self.clf, self.batch_size, self.redshift, self.mc_samples, self.dust_map = clf, batch_size, redshift, mc_samples, dust_map
        self.device = next(clf.parameters()).device
        self.workers = 1 if mc_samples else None
        self.scanner = RedshiftScanner() if redshift == "scan" else None  # shared: its template FFTs are cached
        ood = clf.head_config.ood_active
        optional = {"Z_NETWORK": redshift != "network", "EPISTEMIC": mc_samples > 0, "OOD_SCORE": ood, "OUT_OF_SET": ood}
        self.columns = [c for c in ClassificationTask(clf.head_config).catalogue_columns if optional.get(c.name, True)]

    def predict(self, samples: Sequence[Sample]):
        from cosmofm.finetune.predict import PiecePrediction

        skipped: list = []
        if self.dust_map is not None:
            self.dust_map.fill(samples)
        ids, columns = _predict_columns(self.clf, samples, self.batch_size, self.redshift, self.mc_samples, self.scanner, skipped)
        return PiecePrediction(ids, columns, skipped)


def _predict_columns(clf: CosmoFMForSpectralClassification, samples: Sequence[Sample], batch_size: int, redshift: str = "network",
                     mc_samples: int = 0, scanner=None, skipped: list | None = None) -> tuple[list[str], dict[str, np.ndarray | None]]:
    """The ids of the classified `samples` and their catalogue columns (one entry each, in
    order; None for a column the model cannot fill). `redshift`: see `classify` ("scan" uses
    `scanner`, a heads.redshift_scan.RedshiftScanner). `samples` may be lazy (a datasets
    folder): each is read once. Objects not worth classifying (`classifiable`) are left
    out, with a readers Flag each in `skipped` (None: not kept); spectra flagged out of set or
    low coverage are classified and add a KEPT Flag (out_of_set, low_coverage) there."""
    from cosmofm.data_cards.readers.common import KEPT, Flag

    device = next(clf.parameters()).device
    names = np.array(clf.class_names)
    skipped = [] if skipped is None else skipped
    samples = clf.input_spectra(samples)

    def run(batch: list[Sample]) -> dict:
        collated = collate_samples(batch, clf.config.survey_names)
        with torch.no_grad():  # grad mode is per thread
            out = clf(collated.to(device), mc_samples=mc_samples)
        probs = clf.probabilities(out.logits)
        part = {"ids": [s.id for s in batch], "probs": probs, "low_coverage": low_coverage(batch), "no_ebv": not_dereddened(clf, batch),
                "ood_score": out.ood_score.cpu().numpy() if out.ood_score is not None else None,
                "z": out.redshift.float().cpu().numpy() if out.redshift is not None else None,
                "z_err": out.redshift_err.float().cpu().numpy() if out.redshift_err is not None else None,
                "epistemic": ensemble_prediction(out.mc_logits, clf.head_config.temperature).epistemic if out.mc_logits is not None else None}
        predicted = names[probs.argmax(1)]
        if redshift == "network" and clf.redshift_net is not None:  # p(z) from the spectrum, not the head's regression
            net = clf.network_redshifts(batch, classes=predicted, probs=False)  # the catalogue writes no p(z)
            part["z"], part["z_err"] = net.z, net.z_err
        if redshift == "scan":  # on the collated arrays, all batches of the piece at once (below)
            part["collated"], part["candidates"] = collated, redshift_candidates(probs, names)
        elif redshift == "template":
            from cosmofm.heads.template_fit import refine_redshifts

            refined = refine_redshifts(batch, list(predicted))
            part["z_fit"], part["z_err_fit"] = refined["z"], refined["z_err"]
        return part

    results = list(map(run, classifiable(samples, batch_size, min_unmasked_pixels(clf), skipped)))
    if not results:
        return [], {}
    ids = [i for r in results for i in r["ids"]]
    left_out = {f.index for f in skipped}
    positions = [i for i in range(len(samples)) if i not in left_out]  # of the classified samples, in order
    scanned = None
    if redshift == "scan":
        z, z_err = scan_collated(scanner, [r.pop("collated") for r in results], [c for r in results for c in r.pop("candidates")])
        scanned = z, z_err * clf.head_config.redshift_error_scale

    def joined(key: str) -> np.ndarray | None:
        parts = [r[key] for r in results if r.get(key) is not None]
        return np.concatenate(parts) if parts else None

    def float64(key: str) -> np.ndarray | None:
        values = joined(key)
        return None if values is None else values.astype(np.float64)

    probs, low = joined("probs"), joined("low_coverage")
    ood_score = float64("ood_score")
    out_of_set = clf.out_of_set(ood_score)
    sets = clf.prediction_sets(probs, empty=low if out_of_set is None else low | out_of_set)
    columns: dict[str, np.ndarray | None] = {"CLASS": names[probs.argmax(1)], **{f"P_{c}": probs[:, j] for j, c in enumerate(names)}}
    columns["CONFORMAL_SET"] = np.array(["|".join(names[row]) for row in sets]) if sets is not None else None
    if out_of_set is not None:
        columns["OOD_SCORE"], columns["OUT_OF_SET"] = ood_score, out_of_set
        skipped += [Flag(positions[k], ids[k], OUT_OF_SET, f"{ids[k]}: out-of-set score {ood_score[k]:.4g} > "
                         f"{clf.head_config.ood_threshold:.4g}: like none of the classes; empty conformal set", KEPT) for k in np.flatnonzero(out_of_set)]
    columns["LOW_COVERAGE"] = low
    skipped += [Flag(positions[k], ids[k], LOW_COVERAGE, f"{ids[k]}: valid pixels cover < {MIN_LOG_WAVELENGTH_COVERAGE:.0%} of the "
                     "card's log-wavelength range; empty conformal set", KEPT) for k in np.flatnonzero(low)]
    skipped += [Flag(positions[k], ids[k], NO_EBV, f"{ids[k]}: no Galactic E(B-V) in the file (meta 'ebv'): classified as read, "
                     "not de-reddened; give the dust map's E(B-V) per target", KEPT) for k in np.flatnonzero(joined("no_ebv"))]
    columns["Z"], columns["Z_ERR"] = float64("z"), float64("z_err")
    if redshift != "network":
        columns["Z_NETWORK"] = columns["Z"]
        columns["Z"], columns["Z_ERR"] = scanned or (float64("z_fit"), float64("z_err_fit"))
    if mc_samples:
        columns["EPISTEMIC"] = float64("epistemic")
    return ids, columns


OUT_OF_SET, LOW_COVERAGE, NO_EBV = "out_of_set", "low_coverage", "no_ebv"  # their FLAGS codes


def not_dereddened(clf: CosmoFMForSpectralClassification, samples: Sequence[Sample]) -> np.ndarray:
    """(N,) bool: spectra (as `clf.input_spectra` gave them) that a de-reddening head had to
    read as they were, their file lacking an E(B-V); all False for a head that does not de-redden."""
    if not clf.head_config.galactic_dereddening:
        return np.zeros(len(samples), dtype=bool)
    return np.array([s.meta.get(DEREDDENED_KEY) is None for s in samples], dtype=bool)


# Below half the card's ln(lambda) range a class decision rests on a few features: one arm
# of a two-arm spectrograph, or the blue half without H-alpha and the red continuum. Measured
# (issue 17) on a 32-wide classifier fine-tuned on sdss-like-survey mocks, 500 held-out
# spectra kept valid over one contiguous window: accuracy 0.76 at full coverage, 0.38 at
# 80 %, 0.19 at 50 % (chance 0.08), while its mean top probability rose to 0.87. Its
# out-of-set score already flagged 98 % of them at 70 % and all at <= 50 %; this flag does
# not depend on how a network was trained.
MIN_LOG_WAVELENGTH_COVERAGE = 0.5


def low_coverage(samples: Sequence[Sample], minimum: float = MIN_LOG_WAVELENGTH_COVERAGE) -> np.ndarray:
    """(N,) bool: the pixels with ivar > 0 cover less than `minimum` of the card's
    ln(lambda) range (`heads.out_of_set.log_wavelength_coverage`; the spectrum's own grid
    for a card that is not shipped). Such a spectrum can show a few lines but not the
    continuum shape and line set that tell the classes apart."""
    return np.array([log_wavelength_coverage(s.coords["wavelength"], s.ivar, card_log_span(s.card)) < minimum for s in samples], dtype=bool)


@functools.lru_cache(maxsize=64)
def card_log_span(card_name: str) -> float | None:
    """ln(lambda_max / lambda_min) of a shipped spectrum card (summed over its windows), None for another card."""
    from cosmofm.data_cards.schema import SpectrumCard, load_card

    try:
        card = load_card(card_name) if card_name else None
    except InputError:
        return None
    if not isinstance(card, SpectrumCard):
        return None
    return float(sum(np.log(hi.to_value("Angstrom") / lo.to_value("Angstrom")) for lo, hi in card.wavelength_windows))


def min_unmasked_pixels(clf: CosmoFMForSpectralClassification) -> int:
    """Unmasked pixels a spectrum needs to be classified: one token's worth (the tokenizer's
    spectrum_patch_size, 64 pixels for the shipped recipes). With fewer the network still
    answers (a fully masked spectrum got P = 0.98 for one class and a one-class conformal
    set), but from no data: an answer a catalogue must not present as a measurement."""
    return int(clf.config.spectrum_patch_size)


def classifiable(samples: Sequence[Sample], batch_size: int, min_pixels: int, skipped: list) -> Iterator[list[Sample]]:
    """The samples in batches of `batch_size`, in order, less those that cannot be classified,
    each of which adds a SKIPPED Flag to `skipped` (index = position in
    `samples`, id None for a row of a lazy sequence that could not be read): a row that
    raises InputError (unreadable), no unmasked pixel (all_masked), or fewer than
    `min_pixels` (too_few_pixels). A spectrum's unmasked pixels are counted with numpy over
    its first 4 x `min_pixels` pixels, and over all of them only when those fall short."""
    from cosmofm.data_cards.readers.common import SKIPPED, Flag

    batch: list[Sample] = []
    for i in range(len(samples)):
        try:
            sample = samples[i]
        except InputError as e:
            skipped.append(Flag(i, None, "unreadable", f"not classified: {e}", SKIPPED))
            continue
        n = int(np.count_nonzero(sample.ivar[: 4 * min_pixels] > 0))  # most spectra show enough in their first tokens
        if n < min_pixels:
            n = int(np.count_nonzero(sample.ivar > 0))
        if n < min_pixels:
            skipped.append(Flag(i, sample.id, "all_masked" if n == 0 else "too_few_pixels",
                                f"{sample.id}: {n} unmasked pixels, fewer than one token of the model ({min_pixels}): not classified", SKIPPED))
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
