"""The `cosmofm mock` verb: mock samples of a card as a datasets folder or FITS, a multi-band
mosaic, an SDC2-like survey cube, or a resumable simulation bank (`cosmofm.cli` parses the
arguments; the generators live in `cosmofm.data_cards.mocks`)."""

from __future__ import annotations

from pathlib import Path

# `cosmofm mock KIND` -> the modality it makes
MOCK_KINDS = {"spectra": "spectrum", "images": "image", "cubes": "cube", "lightcones": "field", "mosaic": "image", "survey-cube": "cube"}


def _out_folder(out, fix: str) -> Path:
    """The --out folder, made if needed; an InputError (with `fix` when it is a file) otherwise."""
    from cosmofm.data_cards.errors import InputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} is a file, not a folder", fix)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("--out", f"cannot make the folder {out} ({exc.strerror})", "give a folder path you can write to") from None
    return out


def run_mock(args):
    """`cosmofm mock KIND`: samples of a card as a datasets folder or FITS, a mosaic, a survey cube, or a bank."""
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.mocks.generators import generate
    from cosmofm.data_cards.schema import DEFAULT_CARDS, load_card

    if args.prior is not None:
        return _mock_bank(args)
    bank_only = [flag for flag, value in (("--shard-size", args.shard_size), ("--simulator", args.simulator), ("--overwrite", args.overwrite)) if value]
    if bank_only:
        raise InputError(bank_only[0], "applies only to a simulation bank", "add --prior PRIOR.yaml (cosmofm mock lightcones --prior ...), or drop it")
    expected = MOCK_KINDS[args.kind]
    card = load_card(args.card or DEFAULT_CARDS[expected])
    if card.modality != expected:
        raise InputError("--card", f"{card.name} is a {card.modality} card, not {expected}", f"use a {expected} card, e.g. {DEFAULT_CARDS[expected]}")
    if args.n <= 0:
        raise InputError("--n", f"must be positive, got {args.n}", "ask for at least one sample")
    if args.seed < 0:
        raise InputError("--seed", f"must not be negative, got {args.seed}", "give a seed of 0 or more")
    if args.kind == "survey-cube":
        return _mock_survey_cube(args, card)
    for flag, value in (("--channels", args.channels), ("--density", args.density), ("--log-mhi-min", args.log_mhi_min), ("--plain", args.plain)):
        if value not in (None, False):
            raise InputError(flag, "applies only to cosmofm mock survey-cube", f"drop {flag}")
    if args.kind == "mosaic":
        return _mock_mosaic(args, card)
    for flag, value in (("--size", args.size), ("--bands", args.bands), ("--mag-limit", args.mag_limit)):
        if value is not None:
            raise InputError(flag, "applies only to cosmofm mock mosaic", f"drop {flag}")
    out = Path(args.out)
    if args.format == "fits":
        from cosmofm.data_cards.io.fits_io import write_fits

        out = _out_folder(out, "with --format fits, --out names the folder to write the FITS file into")
        path = out / f"{card.name}-{args.n}.fits"
        samples = generate(card, args.n, seed=args.seed, workers=args.workers, progress=True)
        write_fits(list(samples), path, card)
    else:
        from cosmofm.data_cards.io.hf_io import write_dataset

        path = write_dataset(generate(card, args.n, seed=args.seed, workers=args.workers, progress=True), out, [card])
    print(f"wrote {args.n} {args.kind} ({card.name}) to {path}")


def _mock_mosaic(args, card):
    """`cosmofm mock mosaic`: one multi-band field with its truth as a mosaic FITS (data_cards/mocks/blend_fields.py)."""
    import time

    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.mocks.blend_fields import mock_field, write_field_fits

    if args.format != "datasets":
        raise InputError("--format", "a mosaic is always one FITS file", "drop --format")
    out = _out_folder(args.out, "--out names the folder to write the mosaic into")
    size = 1024 if args.size is None else args.size
    bands = None if args.bands is None else [b.strip() for b in args.bands.split(",") if b.strip()]
    start = time.perf_counter()
    field = mock_field(card, size, args.seed, mag_limit=args.mag_limit, bands=bands)
    path = write_field_fits(out / f"{card.name}-mosaic-{size}-seed{args.seed}.fits", field, card)
    print(f"wrote a {size} x {size} x {len(field.bands)}-band mosaic ({card.name}, {len(field.truth)} sources to "
          f"{field.meta['reference_band']} < {field.meta['mag_limit']:.2f}) to {path} in {time.perf_counter() - start:.1f} s")


def _mock_survey_cube(args, card):
    """`cosmofm mock survey-cube`: one SDC2-like survey cube FITS (cube, TRUTH, NOISE) written block-wise
    in bounded memory, plus its truth table alone (data_cards/mocks/cube_survey.py)."""
    import io
    import time

    from astropy.io import fits
    from astropy.table import Table

    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.io.atomic import atomic_write_bytes
    from cosmofm.data_cards.mocks.cube_survey import write_large_survey_cube

    for flag, value in (("--channels", args.channels), ("--size", args.size)):
        if value is None:
            raise InputError(flag, "is needed for a survey cube", "give e.g. --channels 512 --size 256")
    if args.format != "datasets":
        raise InputError("--format", "a survey cube is always one FITS file", "drop --format")
    out = _out_folder(args.out, "--out names the folder to write the cube into")
    realism = {} if args.plain else {"clustering": True, "primary_beam": True, "flagged_channels": 0.02, "continuum_residual": 1e-3}
    start = time.perf_counter()
    path = write_large_survey_cube(out / f"{card.name}-survey-{args.channels}x{args.size}-seed{args.seed}.fits", card, args.channels, args.size,
                                   density=args.density, seed=args.seed, log_mhi_min=8.0 if args.log_mhi_min is None else args.log_mhi_min,
                                   progress=True, **realism)
    truth = Table.read(path, hdu="TRUTH")
    truth_path = path.with_name(path.stem + "-truth.fits")
    buffer = io.BytesIO()
    fits.table_to_hdu(truth).writeto(buffer)
    atomic_write_bytes(truth_path, buffer.getvalue())
    print(f"wrote a {args.channels} x {args.size} x {args.size} survey cube ({card.name}, {len(truth)} galaxies) to {path} "
          f"and its truth to {truth_path} in {time.perf_counter() - start:.1f} s")


def _mock_bank(args):
    """`cosmofm mock lightcones --prior PRIOR.yaml`: the resumable simulation bank (data_cards/mocks/bank.py)."""
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.mocks.bank import build_bank

    if args.kind != "lightcones":
        raise InputError("--prior", f"makes lightcone banks, not {args.kind}", "use cosmofm mock lightcones --prior PRIOR.yaml")
    for flag, given in (("--card", args.card), ("--format", args.format != "datasets")):
        if given:
            raise InputError(flag, "does not go with --prior (the prior file names the card; a bank is datasets shards)", f"drop {flag}")
    report = build_bank(args.prior, args.n, args.out, seed=args.seed, workers=args.workers, shard_size=args.shard_size,
                        simulator_name=args.simulator or "cosmofm", overwrite=args.overwrite, progress=True)
    print(f"wrote a bank of {report.n} lightcones to {report.out} (bank.json, README.md): "
          f"{report.shards_written} shard(s) made, {report.shards_skipped} already done and verified, {report.seconds:.1f} s")
