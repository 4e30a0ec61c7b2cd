"""The data contract: data cards validate into typed objects, Samples check their input."""

import numpy as np
import pytest
import yaml

from cosmofm.data_cards import InputError, Sample, available_cards, load_card
from cosmofm.data_cards.schema import CubeCard, FieldCard, ImageCard, SpectrumCard, card_from_dict


def test_shipped_cards_cover_four_modalities():
    kinds = {type(load_card(n)) for n in available_cards()}
    assert kinds == {SpectrumCard, ImageCard, CubeCard, FieldCard}


def test_card_quantities_are_converted_to_canonical_units(tmp_path):
    raw = load_card("sdss-like").to_dict()
    raw["spectrum"]["wavelength_min"] = "360 nm"
    card = card_from_dict(raw)
    assert card.wavelength_min.unit.to_string() == "Angstrom"
    assert card.wavelength_min.value == pytest.approx(3600.0)
    cube = load_card("ska-hi-like")
    assert cube.channel_width.to_value("Hz") == pytest.approx(30e3)


def test_card_round_trips_through_yaml(tmp_path):
    for name in available_cards():
        card = load_card(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(card.to_dict()))
        again = load_card(path)
        assert again.to_dict() == card.to_dict()


def _broken(tmp_path, edit):
    raw = load_card("sdss-like").to_dict()
    edit(raw)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as e:
        load_card(path)
    return str(e.value)


def test_card_missing_field_is_named(tmp_path):
    msg = _broken(tmp_path, lambda r: r["spectrum"].pop("resolving_power"))
    assert "sdss-like.spectrum.resolving_power" in msg and "missing" in msg


def test_card_wrong_unit_is_named(tmp_path):
    msg = _broken(tmp_path, lambda r: r["spectrum"].update(wavelength_min="3600 Jy"))
    assert "wavelength_min" in msg and "Angstrom" in msg


def test_card_unitless_quantity_rejected(tmp_path):
    msg = _broken(tmp_path, lambda r: r["spectrum"].update(wavelength_max=10400))
    assert "wavelength_max" in msg and "no unit" in msg


def test_card_unknown_modality_and_field(tmp_path):
    assert "unknown modality" in _broken(tmp_path, lambda r: r.update(modality="hologram"))
    assert "colour" in _broken(tmp_path, lambda r: r["spectrum"].update(colour="blue"))


def test_card_bad_flux_unit_and_negative_r(tmp_path):
    assert "flux_unit" in _broken(tmp_path, lambda r: r["spectrum"].update(flux_unit="mK"))
    assert "resolving_power" in _broken(tmp_path, lambda r: r["spectrum"].update(resolving_power=-5))


def test_unknown_card_name_lists_the_shipped_ones():
    with pytest.raises(InputError, match="sdss-like"):
        load_card("no-such-survey")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_card(path)


def _spectrum(values=None, ivar=None, wave=None):
    n = 10
    return Sample(
        "spectrum",
        np.ones(n) if values is None else values,
        np.ones(n) if ivar is None else ivar,
        {"wavelength": np.linspace(4000, 5000, n) if wave is None else wave},
        {"card": "sdss-like", "id": "x"},
    )


def test_sample_accepts_and_casts():
    s = _spectrum()
    assert s.values.dtype == np.float32 and s.coords["wavelength"].dtype == np.float64


def test_sample_masked_nan_is_zeroed_but_unmasked_nan_is_an_error():
    values = np.ones(10)
    values[3] = np.nan
    ivar = np.ones(10)
    ivar[3] = 0
    assert _spectrum(values, ivar).values[3] == 0
    with pytest.raises(InputError, match="ivar = 0"):
        _spectrum(values)
    values[3] = np.inf
    with pytest.raises(InputError, match="values"):
        _spectrum(values)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"ivar": -np.ones(10)}, "ivar"),
        ({"ivar": np.full(10, np.nan)}, "ivar"),
        ({"ivar": np.ones(9)}, "ivar"),
        ({"values": np.ones((10, 2))}, "values"),
        ({"wave": np.linspace(4000, 5000, 9)}, "wavelength"),
        ({"wave": np.r_[np.linspace(4000, 5000, 9), 4500.0]}, "monotonic"),
        ({"wave": -np.linspace(4000, 5000, 10)[::-1]}, "non-positive"),
    ],
)
def test_sample_rejects_bad_input(kwargs, field):
    with pytest.raises(InputError, match=field):
        _spectrum(**kwargs)


def test_sample_rejects_unknown_modality_and_missing_coords():
    with pytest.raises(InputError, match="unknown modality"):
        Sample("hologram", np.ones(3), np.ones(3), {}, {})
    with pytest.raises(InputError, match="missing"):
        Sample("image", np.ones((1, 2, 2)), np.ones((1, 2, 2)), {"band_wavelength": [5000.0]}, {})


def test_mocks_follow_the_cards(cards):
    from cosmofm.data_cards.mocks.generators import mock_samples, wavelength_grid

    spec = mock_samples(cards["sdss-like"], 2, seed=1)[0]
    assert spec.shape == (cards["sdss-like"].n_pixels,)
    np.testing.assert_allclose(spec.coords["wavelength"], wavelength_grid(cards["sdss-like"]))
    img = mock_samples(cards["lsst-like"], 1, seed=1)[0]
    assert img.shape == (6, 32, 32) and img.meta["pair_id"] == spec.meta["pair_id"]
    cube = mock_samples(cards["ska-hi-like"], 1, seed=1)[0]
    np.testing.assert_allclose(np.diff(cube.coords["frequency"]), 30e3)
    # noise in the cube matches the card (signal is compact, so the std of the edges is noise)
    assert np.std(cube.values[:, :4, :4]) == pytest.approx(cards["ska-hi-like"].noise_per_channel, rel=0.3)
    field = mock_samples(cards["lightcone-21cm"], 1, seed=1)[0]
    assert field.shape == (32, 32, 32) and np.diff(field.coords["los_distance"]) == pytest.approx(2.0)
    # same seed and index, same object: generators are deterministic
    np.testing.assert_array_equal(mock_samples(cards["sdss-like"], 1, seed=1)[0].values, spec.values)


def test_multi_window_card_builds_a_gapped_grid():
    from cosmofm.data_cards.mocks.spectra import wavelength_grid

    card = load_card("4most-hrs")
    grid = wavelength_grid(card)
    assert grid.size == card.n_pixels and np.all(np.diff(grid) > 0)
    for lo, hi in card.windows:
        inside = (grid >= lo.value - 1e-6) & (grid <= hi.value + 1e-6)
        assert inside.sum() > 0.2 * card.n_pixels
    assert not np.any((grid > 4355.01) & (grid < 5159.99))  # the gap between windows 1 and 2
    assert np.median(np.diff(grid)) == pytest.approx(0.08, rel=0.01)


def test_bad_windows_are_named(tmp_path):
    raw = load_card("4most-hrs").to_dict()
    raw["spectrum"]["windows"][1] = ["4000 Angstrom", "5730 Angstrom"]
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=r"windows\[1\]"):
        load_card(path)
