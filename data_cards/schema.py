"""Data cards: YAML files that say how to read a survey's numbers physically.

A card is validated into a typed object (`SpectrumCard`, `ImageCard`, `CubeCard`,
`FieldCard`). Physical fields are written in YAML as astropy quantity strings
("3600 Angstrom", "0.2 arcsec", "1.05e9 Hz", "64 Mpc") and held as `astropy.units.Quantity`
in the card's canonical unit; a value that does not convert raises `InputError`
naming the field. Every error names the dotted path of the bad field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import astropy.units as u
import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import MODALITIES

# The shipped cards: package data, read through importlib.resources so that any install
# (editable, wheel, zip) finds them. A Traversable: `/`, `iterdir`, `is_file`, `read_text`.
CARDS_DIR = resources.files(__package__) / "cards"


def _quantity(unit: str, positive: bool = True, default=dataclasses.MISSING):
    """A card field holding a physical quantity, converted to `unit` on load."""
    return field(default=default, metadata={"unit": unit, "positive": positive})


def _choice(*choices: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"choices": choices})


def _positive(default=dataclasses.MISSING):
    return field(default=default, metadata={"positive": True})


@dataclass
class LabelSchema:
    """What the labels in `Sample.meta["labels"]` mean."""

    name: str  # the label key, e.g. "spectral_class" or "redshift"
    kind: str = _choice("class", "regression", default="class")
    classes: list[str] = field(default_factory=list)  # ordered; index = class id
    unit: str = ""  # for regression targets, an astropy unit string ("" = dimensionless)


@dataclass
class Band:
    """One imaging band."""

    name: str
    wavelength: u.Quantity = _quantity("Angstrom")  # effective wavelength
    psf_fwhm: u.Quantity = _quantity("arcsec")
    zero_point: float = 0.0  # AB magnitude of one flux unit per exposure
    sky_noise: float = _positive(default=1.0)  # per-pixel noise sigma, in the card's flux_unit


@dataclass
class DataCard:
    """What every card has, whatever the modality."""

    name: str
    modality: str
    survey: str
    description: str = ""
    provenance: str = ""
    license: str = "unknown"
    citation: str = ""
    intended_use: str = ""
    labels: list[LabelSchema] = field(default_factory=list)
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    # the modality block's name in YAML; subclasses set it
    block: ClassVar[str] = ""

    def __post_init__(self):
        total = sum(self.splits.values())
        if self.splits and abs(total - 1.0) > 1e-6:
            raise InputError(f"{self.name}.splits", f"fractions sum to {total}, not 1", "make the split fractions add up to 1")

    def to_dict(self) -> dict[str, Any]:
        """The card as plain YAML-able data (quantities back to strings)."""
        common = {f.name for f in dataclasses.fields(DataCard)}
        out: dict[str, Any] = {}
        block: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            (out if f.name in common else block)[f.name] = _plain(getattr(self, f.name))
        out[self.block] = block
        return out


@dataclass
class SpectrumCard(DataCard):
    wavelength_min: u.Quantity = _quantity("Angstrom", default=None)  # vacuum
    wavelength_max: u.Quantity = _quantity("Angstrom", default=None)
    n_pixels: int = _positive(default=None)
    sampling: str = _choice("log", "linear", default="log")  # log = constant dlambda/lambda (SDSS loglam)
    medium: str = _choice("vacuum", "air", default="vacuum")  # of the wavelengths in the survey's files
    resolving_power: float = _positive(default=None)  # R = lambda / FWHM of the line-spread function
    flux_unit: str = "1e-17 erg / (s cm2 Angstrom)"
    typical_snr: float = _positive(default=10.0)  # median per-pixel S/N
    sky_model: str = ""
    # Disjoint wavelength windows of a multi-window spectrograph (e.g. 4MOST HRS), as
    # [[min, max], ...] quantity strings; empty = one window from wavelength_min to _max.
    windows: list = field(default_factory=list)
    # What the mock generator draws for this card (mocks/spectra.py): "basic" = the 13-class
    # generator (stars by Teff alone, CWW galaxy continua), "survey" = mocks/survey.py (stars
    # with log g, [Fe/H] and Galactic dust, stellar-population galaxies, sky residuals,
    # flux-calibration errors, bad columns, S/N 2-100). Reading real files ignores it.
    mock_realism: str = _choice("basic", "survey", default="basic")
    # Observing conditions of survey mocks moved away from the training settings, for
    # shift tests (mocks/survey.py): factors on the drawn E(B-V), flux-calibration error,
    # sky-subtraction residuals and S/N, and redshift ranges the drawn redshifts are mapped
    # onto. The same (seed, index) draws the same object under any shift. Empty = none.
    mock_shift: dict = field(default_factory=dict)
    block: ClassVar[str] = "spectrum"

    @property
    def wavelength_windows(self) -> list[tuple[u.Quantity, u.Quantity]]:
        """The (min, max) of each window: `windows`, or the one from wavelength_min to _max."""
        return self.windows or [(self.wavelength_min, self.wavelength_max)]

    def __post_init__(self):
        super().__post_init__()
        where = f"{self.name}.spectrum"
        if self.mock_realism not in ("basic", "survey"):  # cards built in Python skip _convert's check
            raise InputError(f"{where}.mock_realism", f"{self.mock_realism!r} is not allowed", "use one of ['basic', 'survey']")
        if self.wavelength_max <= self.wavelength_min:
            raise InputError(f"{where}.wavelength_max", "must be larger than wavelength_min", "swap or fix the range")
        self.windows = [_window(w, f"{where}.windows[{i}]") for i, w in enumerate(self.windows)]
        self.mock_shift = _mock_shift(self.mock_shift, self.mock_realism, f"{where}.mock_shift")
        for i, (lo, hi) in enumerate(self.windows):
            if lo < self.wavelength_min or hi > self.wavelength_max:
                raise InputError(f"{where}.windows[{i}]", "lies outside wavelength_min..wavelength_max", "widen the range or fix the window")
            if i and lo <= self.windows[i - 1][1]:
                raise InputError(f"{where}.windows[{i}]", "overlaps or precedes the previous window", "list disjoint windows in increasing wavelength")
        _check_unit(f"{self.name}.spectrum.flux_unit", self.flux_unit, u.erg / u.s / u.cm**2 / u.AA, u.spectral_density(self.wavelength_min))


@dataclass
class ImageCard(DataCard):
    bands: list[Band] = field(default_factory=list)
    pixel_scale: u.Quantity = _quantity("arcsec", default=None)
    stamp_size: int = _positive(default=None)  # pixels on a side of the stamps the model sees
    flux_unit: str = "nJy"
    block: ClassVar[str] = "image"

    def __post_init__(self):
        super().__post_init__()
        if not self.bands:
            raise InputError(f"{self.name}.image.bands", "is empty", "list at least one band with name, wavelength and psf_fwhm")
        _check_unit(f"{self.name}.image.flux_unit", self.flux_unit, u.Jy)


@dataclass
class CubeCard(DataCard):
    pixel_scale: u.Quantity = _quantity("arcsec", default=None)
    beam_fwhm: u.Quantity = _quantity("arcsec", default=None)
    frequency_start: u.Quantity = _quantity("Hz", default=None)  # centre of the first channel
    channel_width: u.Quantity = _quantity("Hz", default=None)
    rest_frequency: u.Quantity = _quantity("Hz", default=1420405751.768 * u.Hz)  # HI 21 cm
    n_channels: int = _positive(default=None)  # channels in the chunks the model sees
    spatial_size: int = _positive(default=None)  # pixels on a side of those chunks
    brightness_unit: str = "Jy/beam"
    noise_per_channel: float = _positive(default=None)  # in brightness_unit
    block: ClassVar[str] = "cube"

    def __post_init__(self):
        super().__post_init__()
        _check_unit(f"{self.name}.cube.brightness_unit", self.brightness_unit, u.Jy / u.beam)


# SKA-Low array assemblies with a station layout in tools21cm (stations: AA0.5 4, AA1 16,
# AA2 68, AA* 307, AA4 512; sim21cm.observe.SKA_LOW_LAYOUTS).
SKA_LOW_LAYOUTS = ("AA4", "AA*", "AA2", "AA1", "AA0.5")


@dataclass
class FieldInstrument:
    """How a 21cm field is observed: a `FieldCard`'s `instrument:` block (applied by
    `cosmofm.data_cards.mocks.fields.observe_field`, physics in `mocks/sim21cm/observe.py`).

    The sky signal is smoothed by the synthesised beam, thermal noise is added, then the
    foreground wedge is removed from signal and noise together.
    """

    telescope: str = _choice("ska-low", default="ska-low")
    layout: str = _choice(*SKA_LOW_LAYOUTS, default="AA4")  # SKA-Low array assembly (stations and tools21cm layout)
    # "radiometer": white noise per voxel from the radiometer equation; "tools21cm": uv-track
    # noise of the layout ([sim21cm] extra); "none": the card's noise_sigma white noise instead
    noise_model: str = _choice("radiometer", "tools21cm", "none", default="radiometer")
    integration_time: u.Quantity = _quantity("h", default=1000.0 * u.h)  # total observing time
    beam: str = _choice("max-baseline", "none", default="max-baseline")  # Gaussian FWHM lambda / max_baseline per slice
    max_baseline: u.Quantity = _quantity("km", default=2.0 * u.km)  # 2 km: the SKA-Low core (tools21cm's default)
    wedge: str = _choice("horizon", "primary-beam", "none", default="horizon")
    wedge_buffer: u.Quantity = _quantity("1 / Mpc", positive=False, default=0.0 / u.Mpc)  # added to k_par of the wedge edge, >= 0
    wedge_chunk: int = field(default=0, metadata={"min": 0})  # slices per wedge FFT along the line of sight; 0 = los_cells


@dataclass
class FieldCard(DataCard):
    box_size: u.Quantity = _quantity("Mpc", default=None)  # comoving, transverse side
    n_cells: int = _positive(default=None)  # cells per transverse side of a chunk
    los_cells: int = _positive(default=None)  # cells along the line of sight of a chunk
    redshift_min: float = field(default=None, metadata={"min": 0.0})
    redshift_max: float = field(default=None, metadata={"min": 0.0})
    quantity: str = "brightness_temperature"
    unit: str = "mK"
    lightcone: bool = True  # False: coeval boxes at redshift_min
    simulator: str = ""
    parameters: dict[str, float | list[float]] = field(default_factory=dict)  # simulator parameters (21cmFAST names); [low, high] = drawn per lightcone
    noise_sigma: float = _positive(default=1.0)  # per-cell noise in `unit` (thermal noise; sets ivar); unused with an instrument's noise model
    # How the field is observed (`FieldInstrument`); None = the simulated field plus white noise
    # of noise_sigma. A factory, not default=None: `_build` reads a None default as required.
    instrument: FieldInstrument | None = field(default_factory=lambda: None)
    block: ClassVar[str] = "field"

    def __post_init__(self):
        super().__post_init__()
        if self.redshift_max < self.redshift_min:
            raise InputError(f"{self.name}.field.redshift_max", "is below redshift_min", "fix the redshift range")
        try:
            u.Unit(self.unit)
        except ValueError as e:
            raise InputError(f"{self.name}.field.unit", f"{self.unit!r} is not an astropy unit ({e})", "use e.g. 'mK'") from None
        self.instrument = self._instrument(self.instrument)

    def _instrument(self, value) -> FieldInstrument | None:
        """The `instrument` block validated (from YAML or built in Python alike); errors name its fields."""
        if value is None:
            return None
        where = f"{self.name}.field.instrument"
        if isinstance(value, FieldInstrument):
            value = _plain(value)  # re-validated below: dataclasses built in Python skip `_convert`
        if not isinstance(value, dict):
            raise InputError(where, "must be a mapping", "write e.g. 'instrument: {layout: AA4, integration_time: 1000 h}'")
        inst = _build(FieldInstrument, value, prefix=where)
        if inst.wedge_buffer.value < 0:
            raise InputError(f"{where}.wedge_buffer", f"must be >= 0, got {inst.wedge_buffer}", "give a buffer like '0.07 / Mpc' or 0 / Mpc")
        if self.quantity != "brightness_temperature":
            raise InputError(where, f"observes 21cm brightness temperature, not {self.quantity!r}", "drop the instrument block")
        if self.unit != "mK":
            raise InputError(f"{self.name}.field.unit", f"the instrument's noise is in mK, the card says {self.unit!r}", "use unit: mK")
        return inst

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.instrument is None:  # cards without an instrument read exactly as before it existed
            out[self.block].pop("instrument")
        return out


CARD_TYPES: dict[str, type[DataCard]] = {"spectrum": SpectrumCard, "image": ImageCard, "cube": CubeCard, "field": FieldCard}


# The shipped card used for each modality when nothing else says which.
DEFAULT_CARDS = {"spectrum": "sdss-like", "image": "lsst-like", "cube": "ska-hi-like", "field": "lightcone-21cm"}


def available_cards() -> list[str]:
    """Names of the cards shipped with the package."""
    return sorted(p.name.removesuffix(".yaml").replace("_", "-") for p in CARDS_DIR.iterdir() if p.name.endswith(".yaml"))


def load_card(name_or_path: str | Path) -> DataCard:
    """Load a shipped card by name (`"sdss-like"`) or any card from a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        shipped = CARDS_DIR / f"{str(name_or_path).replace('-', '_')}.yaml"
        if not shipped.is_file():
            raise InputError("card", f"no shipped card named {name_or_path!r}", f"use one of {available_cards()} or a path to a YAML card")
        with resources.as_file(shipped) as real:  # the file itself, unless the package is zipped
            return _card_file(real)
    if not path.exists():
        raise InputError("card", f"file {path} does not exist", "give the path to a YAML data card")
    return _card_file(path)


def _card_file(path: Path) -> DataCard:
    stat = path.stat()
    raw = _parsed_yaml(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return card_from_dict(copy.deepcopy(raw), source=str(path))


@functools.lru_cache(maxsize=64)
def _parsed_yaml(path: str, mtime_ns: int, size: int) -> Any:
    """A card file's YAML, parsed once per version of the file: readers resolve the card of
    every piece of a file they stream, and parsing was ~5 % of classifying a piece."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise InputError(path, f"is not valid YAML ({e})", "fix the YAML syntax") from None


def card_from_dict(raw: Any, source: str = "card") -> DataCard:
    if not isinstance(raw, dict):
        raise InputError(source, "is not a mapping of fields", "a card is a YAML mapping with name, modality, survey and a modality block")
    modality = raw.get("modality")
    if modality not in MODALITIES:
        raise InputError(f"{source}: modality", f"unknown modality {modality!r}", f"use one of {', '.join(MODALITIES)}")
    cls = CARD_TYPES[modality]
    raw = dict(raw)
    block = raw.pop(cls.block, None)
    if not isinstance(block, dict):
        raise InputError(f"{raw.get('name', source)}.{cls.block}", "block is missing", f"a {modality} card needs a '{cls.block}:' mapping")
    common = {f.name for f in dataclasses.fields(DataCard)}
    clash = common & set(block)
    if clash:
        raise InputError(f"{raw.get('name', source)}.{cls.block}", f"repeats top-level fields {sorted(clash)}", "keep them at the top level")
    return _build(cls, {**raw, **block}, prefix=str(raw.get("name", source)), block=cls.block)


def _build(cls, raw: dict, prefix: str, block: str = ""):
    """Validate `raw` into dataclass `cls`; errors name `prefix.field`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    where = lambda name: f"{prefix}.{block}.{name}" if block and name not in _COMMON else f"{prefix}.{name}"  # noqa: E731
    if unknown:
        raise InputError(where(unknown[0]), f"unknown field(s) {unknown}", f"known fields: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in raw:
            if required or f.default is None:
                raise InputError(where(name), "is missing", _hint(f))
            continue
        kwargs[name] = _convert(raw[name], f, where(name))
    return cls(**kwargs)


_COMMON = {f.name for f in dataclasses.fields(DataCard)}


def _hint(f: dataclasses.Field) -> str:
    if "unit" in f.metadata:
        return f"add it as a quantity string, e.g. '{f.name}: 1.0 {f.metadata['unit']}'"
    if "choices" in f.metadata:
        return f"add one of {list(f.metadata['choices'])}"
    return f"add '{f.name}:' to the card"


def _convert(value: Any, f: dataclasses.Field, where: str):
    meta = f.metadata
    if "unit" in meta:
        try:
            q = u.Quantity(value)
        except (TypeError, ValueError) as e:
            raise InputError(where, f"{value!r} is not a quantity ({e})", f"write it like '1.0 {meta['unit']}'") from None
        if q.unit == u.dimensionless_unscaled:
            raise InputError(where, f"{value!r} has no unit", f"write it like '{value} {meta['unit']}'")
        try:
            q = q.to(meta["unit"])
        except u.UnitConversionError:
            raise InputError(where, f"{value!r} cannot be converted to {meta['unit']}", f"give a quantity in units of {meta['unit']}") from None
        if meta.get("positive") and q.value <= 0:
            raise InputError(where, f"must be positive, got {value!r}", "give a positive value")
        return q
    if "choices" in meta:
        if value not in meta["choices"]:
            raise InputError(where, f"{value!r} is not allowed", f"use one of {list(meta['choices'])}")
        return value
    if f.name == "bands":
        if not isinstance(value, list):
            raise InputError(where, "must be a list of bands", "list bands as mappings with name, wavelength, psf_fwhm")
        return [_build(Band, b, f"{where}[{i}]") if isinstance(b, dict) else _bad(f"{where}[{i}]") for i, b in enumerate(value)]
    if f.name == "labels":
        if not isinstance(value, list):
            raise InputError(where, "must be a list of label schemas", "e.g. '- {name: spectral_class, kind: class, classes: [STAR, QSO]}'")
        return [_build(LabelSchema, b, f"{where}[{i}]") if isinstance(b, dict) else _bad(f"{where}[{i}]") for i, b in enumerate(value)]
    if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) or meta.get("positive") or "min" in meta:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(where, f"{value!r} is not a number", "give a plain number")
        if f.type == "int" and not isinstance(value, int):
            raise InputError(where, f"{value!r} is not a whole number", "give an integer")
        if meta.get("positive") and value <= 0:
            raise InputError(where, f"must be positive, got {value!r}", "give a positive number")
        if "min" in meta and value < meta["min"]:
            raise InputError(where, f"must be >= {meta['min']}, got {value!r}", "give a physical value")
        return value
    return value


def _window(value, where: str) -> tuple[u.Quantity, u.Quantity]:
    """[min, max] quantity strings (or already-parsed quantities) -> Angstrom quantities."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise InputError(where, f"{value!r} is not a [min, max] pair", "write e.g. ['3926 Angstrom', '4355 Angstrom']")
    try:
        lo, hi = (u.Quantity(v).to(u.AA) for v in value)
    except (TypeError, ValueError, u.UnitConversionError) as e:
        raise InputError(where, f"{value!r} is not a pair of wavelengths ({e})", "write e.g. ['3926 Angstrom', '4355 Angstrom']") from None
    if hi <= lo:
        raise InputError(where, "max is not above min", "give [min, max]")
    return lo, hi


MOCK_SHIFT_FACTORS = ("ebv_scale", "calibration_scale", "sky_residual_scale", "snr_scale")
MOCK_SHIFT_RANGES = ("galaxy_z_range", "qso_z_range")


def _mock_shift(shift, realism: str, where: str) -> dict:
    """A validated `mock_shift` mapping: positive factors and increasing [lo, hi] redshift ranges."""
    if not isinstance(shift, dict):
        raise InputError(where, f"must be a mapping, got {type(shift).__name__}", f"write e.g. {{ebv_scale: 3}} with keys {list(MOCK_SHIFT_FACTORS + MOCK_SHIFT_RANGES)}")
    if shift and realism != "survey":
        raise InputError(where, "only survey mocks can be shifted", "set mock_realism: survey or drop mock_shift")
    out = {}
    for key, value in shift.items():
        if key in MOCK_SHIFT_FACTORS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{where}.{key}", f"{value!r} is not a positive number", "give a factor > 0 (1 = the training setting)")
            out[key] = float(value)
        elif key in MOCK_SHIFT_RANGES:
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
            if not ok or not 0 <= value[0] < value[1]:
                raise InputError(f"{where}.{key}", f"{value!r} is not an increasing [lo, hi] redshift range", "write [lo, hi] with 0 <= lo < hi")
            out[key] = [float(v) for v in value]
        else:
            raise InputError(f"{where}.{key}", "is not a known shift", f"use some of {list(MOCK_SHIFT_FACTORS + MOCK_SHIFT_RANGES)}")
    return out


def _bad(where: str):
    raise InputError(where, "must be a mapping", "write it as 'key: value' pairs")


def _check_unit(where: str, unit: str, target, equivalencies=None):
    try:
        u.Unit(unit).to(target, equivalencies=equivalencies or [])
    except ValueError as e:
        raise InputError(where, f"{unit!r} is not a unit convertible to {target} ({e})", f"use a unit like '{target}'") from None


def _plain(v: Any) -> Any:
    if isinstance(v, u.Quantity):
        return f"{float(v.value)!r} {v.unit.to_string()}"
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
