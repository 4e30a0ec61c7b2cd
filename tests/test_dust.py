"""Milky-Way de-reddening (data_cards/dust.py) and the head that reads de-reddened spectra
(ClassificationHeadConfig.galactic_dereddening; issue 17's reddening shift)."""

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from cosmofm.cli import main
from cosmofm.data_cards.dust import DEREDDENED_KEY, DereddenedSpectra, DustMap, deredden, recorded_ebv, transmission
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import write_fits
from cosmofm.data_cards.io.survey_files import write_desi_coadd
from cosmofm.data_cards.mocks import stellar
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.survey import DUST_MAP_ERROR, mock_spectrum_survey
from cosmofm.data_cards.readers import read_any
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.classification import FinetuneConfig, finetune_classification
from cosmofm.finetune.classify import predict
from cosmofm.finetune.model_card import render_model_card
from cosmofm.heads.classification import CosmoFMForSpectralClassification
from cosmofm.pretrain.checkpoint import write_manifest

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=4, projection_dim=8)
WAVE = np.geomspace(3600.0, 10400.0, 800)


@pytest.fixture(scope="module")
def survey():
    card = load_card("sdss-like-survey")
    return card, mock_samples(card, 24, seed=3)


def _spectrum(values, ebv=None, **meta) -> Sample:
    return Sample("spectrum", values.astype(np.float32), np.full(WAVE.size, 4.0, np.float32), {"wavelength": WAVE},
                  {"card": "sdss-like-survey", "id": "s", **({} if ebv is None else {"ebv": ebv}), **meta})


def test_transmission_has_r_v_3_1_and_reddens():
    t = transmission(np.array([4400.0, 5500.0, 9000.0]), 0.2)
    a_v = -2.5 * np.log10(t[1])
    assert a_v == pytest.approx(3.1 * 0.2, rel=0.05)  # A_V = R_V E(B-V) near V
    assert -2.5 * np.log10(t[0]) - a_v == pytest.approx(0.2, rel=0.1)  # A_B - A_V = E(B-V)
    assert t[0] < t[1] < t[2] < 1
    assert np.array_equal(transmission(WAVE, 0.0), np.ones(WAVE.size))


def test_deredden_undoes_ccm89_dust_to_the_law_mismatch_and_keeps_sn():
    """The mocks redden with CCM89, the correction is F99: at E(B-V) = 0.3 what is left is a
    few per cent, where the dust itself took 40-75 % of the light."""
    model = 1 + 0.2 * np.sin(WAVE / 300.0)
    dusty = model * stellar.galactic_extinction(WAVE, 0.3)
    out = deredden(_spectrum(dusty, ebv=0.3))
    far = np.abs(WAVE - 5894) > 30  # the interstellar Na D lines are not dust continuum: left in
    assert np.ptp(np.log(dusty / model)[far]) > 0.9
    assert np.max(np.abs(np.log(out.values / model)[far])) < 0.06
    sn_in = dusty * np.sqrt(4.0)
    assert np.allclose(out.values * np.sqrt(out.ivar), sn_in, rtol=1e-5)  # dividing by T scales the noise with it
    assert out.meta[DEREDDENED_KEY] == 0.3
    assert deredden(out) is out  # never twice


def test_spectra_without_an_ebv_are_kept_as_read_and_bad_values_named():
    plain = deredden(_spectrum(np.ones(WAVE.size)))
    assert plain.meta[DEREDDENED_KEY] is None and np.array_equal(plain.values, np.ones(WAVE.size, np.float32))
    for bad in (float("nan"), -0.1, 30.0, "high"):
        with pytest.raises(InputError, match=r"s\.meta\.ebv"):
            deredden(_spectrum(np.ones(WAVE.size), ebv=bad))
    assert [recorded_ebv(v) for v in (0.05, -9999.0, float("nan"), None, "x")] == [pytest.approx(0.043), None, None, None, None]  # SFD98 -> SF11
    with pytest.raises(InputError, match=r"s\.meta\.ebv.*galactic_dereddening"):
        DereddenedSpectra([_spectrum(np.ones(WAVE.size))], require=True)[0]


def test_survey_mocks_record_a_dust_map_value_with_its_error():
    card = load_card("sdss-like-survey")
    ratios = []
    for i in range(60):
        s = mock_spectrum_survey(card, 8, i)
        ratios.append(np.log(s.meta["ebv"] / s.meta["truth"]["params"]["ebv_mw"]))
    assert np.std(ratios) == pytest.approx(DUST_MAP_ERROR, rel=0.3) and abs(np.mean(ratios)) < 0.08
    dusty = load_card("sdss-like-survey")
    dusty.mock_shift = {"ebv_scale": 3.0}
    base, shifted = mock_spectrum_survey(card, 8, 5), mock_spectrum_survey(dusty, 8, 5)
    assert shifted.meta["ebv"] == pytest.approx(3 * base.meta["ebv"], rel=1e-12)  # the map sees the extra dust


def test_desi_coadd_ebv_reaches_meta_on_the_sf11_scale(tmp_path):
    samples = mock_samples(load_card("desi-like"), 2, seed=5)
    samples[0].meta["ebv"] = 0.043
    path = write_desi_coadd(samples, tmp_path / "coadd-main-dark-1.fits", targetids=[1, 2])
    assert fits.getdata(path, "FIBERMAP")["EBV"][0] == pytest.approx(0.043 / 0.86, rel=1e-6)  # SFD98's scale in the file, as DESI's
    r = read_any(path)
    assert r.samples[0].meta["ebv"] == pytest.approx(0.043, rel=1e-6) and "ebv" not in r.samples[1].meta


def _sfd_maps(folder, north: float, south: float, size: int = 16):
    """Tiny stand-ins for the SFD98 Lambert maps: each hemisphere one constant E(B-V)."""
    folder.mkdir(exist_ok=True)
    for name, value, sign in (("ngp", north, 1), ("sgp", south, -1)):
        hdu = fits.PrimaryHDU(np.full((size, size), value, np.float32))
        hdu.header.update(CRPIX1=size / 2 + 0.5, CRPIX2=size / 2 + 0.5, LAM_SCAL=size / 2, LAM_NSGP=sign)
        hdu.writeto(folder / f"SFD_dust_4096_{name}.fits")
    return folder


def test_dust_map_fills_only_what_files_lack_and_refuses_a_bad_folder(tmp_path):
    dust = DustMap(_sfd_maps(tmp_path / "sfd", 0.05, 0.10))
    north, south = (_spectrum(np.ones(WAVE.size), ra=192.86, dec=27.13), _spectrum(np.ones(WAVE.size), ra=12.86, dec=-27.13))  # the galactic poles
    own, nowhere = _spectrum(np.ones(WAVE.size), ebv=0.2, ra=192.86, dec=27.13), _spectrum(np.ones(WAVE.size))
    assert dust.fill([north, south, own, nowhere]) == 2
    assert north.meta["ebv"] == pytest.approx(0.05 * 0.86, rel=1e-5) and south.meta["ebv"] == pytest.approx(0.10 * 0.86, rel=1e-5)
    assert own.meta["ebv"] == 0.2 and "ebv" not in nowhere.meta
    with pytest.raises(InputError, match="dust_map.*SFD_dust_4096_sgp.fits"):
        (tmp_path / "half").mkdir()
        (tmp_path / "sfd" / "SFD_dust_4096_ngp.fits").rename(tmp_path / "half" / "SFD_dust_4096_ngp.fits")
        DustMap(tmp_path / "half")
    (tmp_path / "half" / "SFD_dust_4096_sgp.fits").write_bytes(b"not a FITS file")
    with pytest.raises(InputError, match="dust_map.*cannot be read"):
        DustMap(tmp_path / "half")


def test_a_dereddening_head_trains_on_and_predicts_dereddened_spectra(survey, tmp_path):
    card, spectra = survey
    cfg = FinetuneConfig(strategy="full", epochs=1, batch_size=8, lr=3e-3, head={"galactic_dereddening": True}, output_dir=str(tmp_path / "run"))
    run = finetune_classification(spectra, card, cfg, backbone_config=TINY)
    model = CosmoFMForSpectralClassification.from_pretrained(run["model_dir"])
    assert model.head_config.galactic_dereddening
    dusty = [Sample(s.modality, s.values, s.ivar, s.coords, {**s.meta, "ebv": 0.4}) for s in spectra[:6]]
    got = predict(model, dusty)["logits"]
    model.head_config.galactic_dereddening = False  # the same weights, fed the corrected spectra by hand
    assert np.allclose(got, predict(model, [deredden(s) for s in dusty])["logits"], atol=1e-5)
    assert not np.allclose(got, predict(model, dusty)["logits"], atol=1e-3)  # and the correction mattered

    card_text = render_model_card(model.config.to_dict(), [card], [], None)
    assert "| spectra as read | de-reddened by each one's Milky-Way E(B-V)" in card_text  # a downloader learns what the head expects

    with pytest.raises(InputError, match=r"meta\.ebv.*galactic_dereddening"):
        finetune_classification(mock_samples(load_card("sdss-like"), 12, seed=1), load_card("sdss-like"), cfg, backbone_config=TINY)


def test_classify_flags_spectra_whose_file_has_no_ebv_or_reads_a_dust_map(survey, tmp_path):
    card, spectra = survey
    cfg = FinetuneConfig(strategy="full", epochs=1, batch_size=8, lr=3e-3, head={"galactic_dereddening": True}, output_dir=str(tmp_path / "run"))
    clf = finetune_classification(spectra, card, cfg, backbone_config=TINY)["model"]
    clf.set_calibration(0.05)  # a sharp softmax, so the catalogue's probabilities tell the inputs apart
    clf.save_pretrained(model_dir := tmp_path / "sharp")
    write_manifest(model_dir)
    poles = {"ra": 192.86, "dec": 27.13}  # the north galactic pole: E(B-V) 0.2 x 0.86 in the maps below
    test = [Sample(s.modality, s.values, s.ivar, s.coords, {**{k: v for k, v in s.meta.items() if k != "ebv" or i % 2}, **poles})
            for i, s in enumerate(spectra[:4])]
    path = write_fits(test, tmp_path / "four.fits", card)
    assert main(["classify", str(path), "--model", str(model_dir), "--output", str(tmp_path / "cat.fits")]) == 0
    plain = Table.read(tmp_path / "cat.fits")
    assert ["no_ebv" in str(f) for f in plain["FLAGS"]] == [True, False, True, False]

    maps = _sfd_maps(tmp_path / "sfd", 0.2, 0.0)
    assert main(["classify", str(path), "--model", str(model_dir), "--output", str(tmp_path / "mapped.fits"), "--dust-map", str(maps)]) == 0
    mapped = Table.read(tmp_path / "mapped.fits")
    assert not any("no_ebv" in str(f) for f in mapped["FLAGS"])
    by_hand = [Sample(s.modality, s.values, s.ivar, s.coords, {**s.meta, "ebv": 0.2 * 0.86}) for s in test[::2]]
    want, unmapped = (clf.probabilities(torch.as_tensor(predict(clf, x)["logits"])) for x in (by_hand, test[::2]))
    names = [c for c in plain.colnames if c.startswith("P_")]
    got = np.array([[mapped[c][i] for c in names] for i in (0, 2)])
    assert np.allclose(got, want, rtol=1e-4, atol=1e-8)  # as if the file had carried the map's value
    assert np.allclose([[plain[c][i] for c in names] for i in (0, 2)], unmapped, rtol=1e-4, atol=1e-8)
    assert np.max(np.abs(want - unmapped)) > 1e-3  # and E(B-V) 0.17 changes them
    assert np.allclose([mapped[c][1] for c in names], [plain[c][1] for c in names])  # the file's own E(B-V) wins


def test_the_generators_dust_comes_off_the_flux_exactly_but_not_off_the_ivar():
    """What classify_dust_probe rests on: behind 3x the dust and with it divided out again, a
    star's flux is its in-distribution flux times a constant; its ivar is not, as the photon
    noise was set by the light that arrived."""
    from cosmofm.bench.classify_dust_probe import undusted

    card, dusty = load_card("sdss-like-survey"), load_card("sdss-like-survey")
    dusty.mock_shift = {"ebv_scale": 3.0}
    index = next(i for i in range(50) if mock_spectrum_survey(card, 4, i).meta["labels"]["spectral_class"] == "STAR_K1"
                 and mock_spectrum_survey(card, 4, i).meta["truth"]["params"]["ebv_mw"] > 0.03)
    a, c = undusted(mock_spectrum_survey(card, 4, index)), undusted(mock_spectrum_survey(dusty, 4, index))
    ok = (a.ivar > 0) & (c.ivar > 0)
    flux_ratio, ivar_ratio = c.values[ok] / a.values[ok], c.ivar[ok] / a.ivar[ok] * (c.values[ok] / a.values[ok]) ** 2
    w = a.coords["wavelength"][ok]
    blue, red = w < 4500, w > 8000
    assert abs(np.median(flux_ratio[blue]) / np.median(flux_ratio[red]) - 1) < 0.01  # colour: back exactly
    assert np.median(ivar_ratio[blue]) / np.median(ivar_ratio[red]) < 0.97  # S/N: fewer blue photons stay fewer
