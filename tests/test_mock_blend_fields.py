"""Large mock fields (data_cards/mocks/blend_fields.py, field_sky.py) and field-like blend neighbours.

The luminosity function against deep counts and its redshift trend, clustering against
Poisson pair counts, stars against the PSF, image flux against the truth, the mosaic FITS
format and its WCS, determinism, and bad input.
"""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.blend_fields import MockField, field_neighbours, mock_field, read_field_truth, write_field_fits
from cosmofm.data_cards.mocks.blends import mock_blend
from cosmofm.data_cards.mocks.common import NJY_AB_ZP
from cosmofm.data_cards.mocks.field_sky import Clustering, clustered_positions, field_sky
from cosmofm.data_cards.mocks.images import psf_profile
from cosmofm.cli import main


@pytest.fixture(scope="module")
def card():
    return load_card("lsst-like")


@pytest.fixture(scope="module")
def sky(card):
    return field_sky(card)


@pytest.fixture(scope="module")
def noiseless(card):
    return mock_field(card, 256, 3, noise=False)


def test_luminosity_function_counts_and_redshifts(sky):
    gal = sky.draw_galaxies(np.random.default_rng(0), 30.0, (-np.inf, 27.5))  # 30 arcmin^2
    mag = NJY_AB_ZP - 2.5 * np.log10(gal["flux"][:, sky.ref])
    counts = [np.sum((mag >= m) & (mag < m + 1)) for m in (21, 23, 25)]
    assert counts[0] < counts[1] < counts[2], counts
    assert counts[2] > 3 * counts[1]  # deep counts rise steeply, d log N / dm ~ 0.3-0.45
    median_z = [np.median(gal["z"][mag < lim]) for lim in (23, 25, 27.5)]
    assert median_z[0] + 0.15 < median_z[1] < median_z[2] - 0.15, median_z
    # LSST's gold sample, i < 25.3: ~55 galaxies per arcmin^2 (LSST Science Book 2009, sec. 3.7.2)
    i_mag = NJY_AB_ZP - 2.5 * np.log10(gal["flux"][:, sky.bands.index("i")])
    assert 30 < np.sum(i_mag < 25.3) / 30.0 < 70
    # faint galaxies are mostly small: sizes from the size-luminosity relation at their redshift
    rng = np.random.default_rng(1)
    bright, faint = np.flatnonzero(mag < 22)[:60], np.flatnonzero(mag > 26.5)[:300]
    size = lambda idx: np.median([max(s.bulge_hlr, s.disk_hlr) for s in (sky.galaxy_source(gal, i, rng, "g") for i in idx)])  # noqa: E731
    assert size(faint) < 0.5 * size(bright)


def test_clustering_raises_close_pairs_above_poisson():
    rng = np.random.default_rng(5)
    side, n = 1200.0, 30000  # arcsec, ~75 galaxies per arcmin^2
    clustering = Clustering()
    pairs = {}
    for name, model in (("thomas", clustering), ("poisson", None)):
        xy = clustered_positions(rng, n, side, side, model)
        pairs[name] = len(cKDTree(xy, boxsize=side).query_pairs(5.0))  # positions wrap: periodic distances
    expected = n * (n - 1) / 2 * np.pi * 25.0 / side**2
    assert abs(pairs["poisson"] / expected - 1) < 0.05
    excess = pairs["thomas"] / expected - 1
    assert clustering.mean_excess() == pytest.approx(0.322, abs=0.002)  # 2 w(1") 5^-0.8 / 1.2 for w(1") = 0.7
    assert 0.7 * clustering.mean_excess() < excess < 1.3 * clustering.mean_excess(), excess
    # with redshifts, clumps are physical groups: close pairs share their redshift
    z = rng.uniform(0.1, 3.0, n)
    xy = clustered_positions(rng, n, side, side, clustering, z)
    close = np.array(sorted(cKDTree(xy, boxsize=side).query_pairs(1.0)))
    same_z = np.mean(np.abs(z[close[:, 0]] - z[close[:, 1]]) < 0.01)
    assert same_z > 0.25  # physical pairs: w / (1 + w) ~ 0.34 within 1" (Thomas w ~ 0.5 there); random pairs: 0.7 %


def test_stars_are_psf_shaped(card):
    field = mock_field(card, 256, 4, density=0.0, star_density=40.0, noise=False, clustering=None, margin=0.0)
    t = field.truth
    assert set(t["KIND"]) == {"star"} and np.all(t["REDSHIFT"] == 0)
    p = field.pixel_scale
    # isolated: no neighbour within 4", and none brighter within 10" (a bright star's wings reach far)
    xy = np.stack([t["X"], t["Y"]], axis=1) * p
    tree = cKDTree(xy)
    alone = [all(j == i or (t["MAG_r"][j] > t["MAG_r"][i] and np.hypot(*(xy[j] - xy[i])) > 4.0) for j in tree.query_ball_point(xy[i], 10.0))
             for i in range(len(t))]
    ok = np.array(alone) & (t["X"] > 14) & (t["X"] < 241) & (t["Y"] > 14) & (t["Y"] < 241)
    assert ok.sum() >= 4
    assert np.all(t["BLENDEDNESS"][ok] < 0.01)  # their footprints hold almost only their own light
    r = 8  # pixels: +-1.6", 2 FWHM; both images are measured in the same box
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    for b, name in enumerate(field.bands):
        psf = psf_profile(card, b)
        for row in t[ok][:5]:
            cx, cy = int(round(row["X"])), int(round(row["Y"]))
            cut = field.values[b, cy - r:cy + r + 1, cx - r:cx + r + 1].astype(float)
            ref = psf.drawImage(nx=2 * r + 1, ny=2 * r + 1, scale=p, offset=(row["X"] - cx, row["Y"] - cy)).array * row[f"FLUX_{name}"]
            moments = []
            for img in (cut, ref):
                f = img.sum()
                mx, my = (img * xx).sum() / f, (img * yy).sum() / f
                moments.append(np.array([(img * (xx - mx) ** 2).sum(), (img * (yy - my) ** 2).sum(), (img * (xx - mx) * (yy - my)).sum()]) / f)
            assert moments[0][:2] == pytest.approx(moments[1][:2], rel=0.01)
            assert abs(moments[0][2] - moments[1][2]) < 0.01 * moments[1][0]


def test_image_flux_equals_truth_flux(noiseless):
    t = noiseless.truth
    assert np.sum(t["IN_FIELD"]) > 80 and np.sum(~t["IN_FIELD"]) > 0  # a margin of sources outside spills in
    for b, name in enumerate(noiseless.bands):
        image = float(noiseless.values[b].sum(dtype=np.float64))
        truth = float(np.sum(t[f"FLUX_{name}"] * t["FRAC_IN"]))
        assert image == pytest.approx(truth, rel=0.01)
    assert np.all(noiseless.ivar == noiseless.ivar[:, :1, :1])  # noiseless: ivar = 1 / sky^2
    blended = t["BLENDEDNESS"][t["IN_FIELD"]]  # defined for every source centred in the field
    assert np.all((blended > -1e-6) & (blended < 1 + 1e-6))
    close, far = t["NN_DIST"] < 1.0, t["NN_DIST"] > 3.0
    assert np.nanmedian(t["BLENDEDNESS"][close]) > np.nanmedian(t["BLENDEDNESS"][far]) + 0.05


def test_mosaic_fits_round_trip(card, tmp_path):
    field = mock_field(card, (96, 128), 7, bands=["g", "r", "i", "z"])
    assert field.values.shape == field.ivar.shape == (4, 96, 128) and field.values.dtype == np.float32
    path = write_field_fits(tmp_path / "m.fits", field, card)
    assert [p.name for p in tmp_path.iterdir()] == ["m.fits"]  # the temporary file was renamed
    with fits.open(path) as hdul:
        assert hdul[0].data is None and hdul[0].header["CARD"] == "lsst-like" and hdul[0].header["BANDS"] == "g,r,i,z"
        assert [h.header["EXTNAME"] for h in hdul[1:]] == ["g", "r", "i", "z", "IVAR_g", "IVAR_r", "IVAR_i", "IVAR_z", "TRUTH"]
        truth = read_field_truth(path)
        for b, name in enumerate(field.bands):
            h = hdul[name].header
            assert (h["BUNIT"], h["FILTER"], h["PIXSCALE"]) == ("nJy", name, 0.2)
            assert h["WAVELEN"] == pytest.approx(field.wavelengths[b])
            assert h["PSFFWHM"] == pytest.approx(next(c.psf_fwhm.to_value("arcsec") for c in card.bands if c.name == name))
            assert np.array_equal(hdul[name].data, field.values[b]) and np.array_equal(hdul[f"IVAR_{name}"].data, field.ivar[b])
            wcs = WCS(h)
            assert wcs.wcs.ctype[0] == "RA---TAN" and abs(wcs.proj_plane_pixel_scales()[1].to_value("arcsec") - 0.2) < 1e-9
            x, y = wcs.all_world2pix(truth["RA"], truth["DEC"], 0)
            assert np.max(np.abs(x - truth["X"])) < 1e-6 and np.max(np.abs(y - truth["Y"])) < 1e-6
    assert truth["RA"].unit == "deg" and truth["FLUX_r"].unit == "nJy" and truth["X"].unit == "pix"
    assert np.array_equal(truth["ID"], field.truth["ID"]) and np.allclose(truth["FLUX_i"], field.truth["FLUX_i"])
    assert list(np.unique(truth["KIND"])) in (["galaxy"], ["galaxy", "star"])
    # the field centre is the WCS's reference point; RA grows to the east (left)
    ra, dec = field.wcs.all_pix2world([63.5, 62.5], [47.5, 47.5], 0)
    assert (ra[0], dec[0]) == pytest.approx((150.1, 2.2)) and ra[1] > ra[0]


def test_fields_are_deterministic(card):
    a, b, c = (mock_field(card, 64, s, bands=["r"]) for s in (11, 11, 12))
    assert np.array_equal(a.values, b.values) and np.array_equal(a.ivar, b.ivar)
    assert np.array_equal(np.asarray(a.truth["FLUX_r"]), np.asarray(b.truth["FLUX_r"]))
    assert not np.array_equal(a.values, c.values)


def test_blend_neighbours_from_the_field(card):
    dms, kinds, seps, same_z = [], [], [], []
    for i in range(8):
        sample, _ = mock_blend(card, 2, i, n_objects=6, separation=(0.5, 2.5), delta_mag=(0.0, 2.5), neighbours="field", noise=False)
        catalogue, _ = mock_blend(card, 2, i, n_objects=6, noise=False)
        meta = sample.meta["truth"]
        assert meta["objects"][0] == catalogue.meta["truth"]["objects"][0]  # the primary is the catalogue mode's
        assert meta["neighbours"] == "field" and len(meta["objects"]) == 6
        dms += meta["delta_mag"]
        seps += meta["separation_arcsec"]
        kinds += [o["kind"] for o in meta["objects"][1:]]
        if meta["objects"][0]["kind"] == "galaxy":
            same_z += [abs(o["redshift"] - meta["objects"][0]["redshift"]) <= 0.01 for o in meta["objects"][1:]]
    dms, seps = np.array(dms), np.array(seps)
    assert np.all((dms >= -1e-9) & (dms < 2.5)) and np.all((seps >= 0.5) & (seps <= 2.5))
    assert np.mean(dms > 1.25) > 0.6  # the counts rise to the faint end
    assert np.mean(seps > 1.5) > 0.5  # p(theta) ~ theta (1 + w): more room at larger separations
    assert "point" in kinds and "galaxy" in kinds  # stars are neighbours too
    assert len(same_z) >= 10 and np.mean(same_z) > 0.15  # companions at the primary galaxy's redshift
    # the companions' share: int theta w / int theta (1 + w) = 0.333 over 0.5-2.5" for w = 0.7 theta^-0.8
    rng = np.random.default_rng(0)
    near = [abs(s.redshift - 0.3) <= 0.01 for _ in range(40)
            for s in field_neighbours(card, rng, 5, (0.5, 2.5), (20.0, 22.5), companion_z=0.3)[0]]
    assert 0.26 < np.mean(near) < 0.42, np.mean(near)
    with pytest.raises(InputError, match="neighbours"):
        mock_blend(card, 2, 0, neighbours="sky")


def test_cli_writes_a_mosaic(tmp_path, capsys):
    assert main(["mock", "mosaic", "--size", "48", "--seed", "1", "--bands", "r,i", "--mag-limit", "26", "--out", str(tmp_path)]) == 0
    path = tmp_path / "lsst-like-mosaic-48-seed1.fits"
    assert "mosaic" in capsys.readouterr().out
    with fits.open(path) as hdul:
        assert hdul[0].header["BANDS"] == "r,i" and hdul["r"].data.shape == (48, 48)
    assert np.all(read_field_truth(path)["MAG_r"] < 26)
    assert main(["mock", "images", "--size", "48", "--out", str(tmp_path / "x")]) == 2


def test_bad_input_is_named(card, tmp_path):
    bad = [
        (dict(size=4), "size"), (dict(size=(10,)), "size"), (dict(size=64.5), "size"), (dict(seed=-1), "seed"),
        (dict(density=-1.0), "density"), (dict(star_fraction=1.2), "star_fraction"),
        (dict(star_fraction=0.1, star_density=1.0), "star_fraction"), (dict(mag_limit=float("nan")), "mag_limit"),
        (dict(bands=["q"]), "bands"), (dict(clustering="yes"), "clustering"), (dict(centre=(10.0, 95.0)), "centre"),
        (dict(margin=-2.0), "margin"), (dict(centre=(1.0,)), "centre"), (dict(mag_limit="27"), "mag_limit"),
    ]
    for kwargs, name in bad:
        with pytest.raises(InputError) as e:
            mock_field(card, **{"size": 32, **kwargs})
        assert e.value.field == name, (kwargs, e.value)
    with pytest.raises(InputError, match="slope"):
        Clustering(slope=2.5)
    with pytest.raises(InputError, match="MockField"):
        write_field_fits(tmp_path / "x.fits", np.zeros((1, 4, 4)), card)
    with pytest.raises(InputError, match="does not exist"):
        read_field_truth(tmp_path / "missing.fits")
    fits.HDUList([fits.PrimaryHDU()]).writeto(tmp_path / "plain.fits")
    with pytest.raises(InputError, match="TRUTH"):
        read_field_truth(tmp_path / "plain.fits")
    assert isinstance(mock_field(card, 16, 0, mag_limit=20.0, bands=["r"]), MockField)  # a nearly empty field is valid
