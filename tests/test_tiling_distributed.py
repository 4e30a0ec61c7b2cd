"""Tiles shared by launched processes (finetune/tiling_dist.py, issue 21): in one `accelerate
launch` of 2 CPU processes (gloo), `cosmofm detect` with the SoFiA-style finder (a 9-tile plan,
2 forked workers per rank), with a tiny detection3d head (blocks, prefilter, the purity cut
over the whole catalogue with a noise prior, so the flipped-block counter summed over ranks
and forked workers decides its count), through the CLI (then the process group's teardown),
and `cosmofm deblend` (sep, 16 tiles, per-source stamps) each give the catalogue one process
gives, row for row in every column, the same primary keywords and stamps; each rank ran its
share of the tiles; a rank whose finder fails makes both ranks raise (none waits for it); one
process without a launcher forms no process group."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from launch import accelerate_launch, launch_env  # tests/launch.py
from test_deblend_verb import SOURCES as MOSAIC_SOURCES  # tests/test_deblend_verb.py
from test_detect_speed import TINY  # tests/test_detect_speed.py
from test_detect_verb import write_cube  # tests/test_detect_verb.py
from test_tiling import write_mosaic  # tests/test_tiling.py

from cosmofm.data_cards import load_card
from cosmofm.finetune.deblend import deblend_image
from cosmofm.finetune.detect import detect_cube
from cosmofm.heads.sofia_baseline import SofiaConfig

TILE, OVERLAP = (64, 48, 48), (0, 16, 16)  # 1 x 3 x 3 tiles of the 64 x 96 x 96 cube
HEAD = dict(head_block=TILE, prefilter=5.0, reliability=0.5)  # the untrained head scores both signs alike: a low purity keeps rows

# Every rank: the runs of jobs.json through the API (each rank's summaries to rank<r>.json), a run whose finder fails on rank 1's tile, then `cosmofm detect` through the CLI,
# which tears the process group down.
SCRIPT = """
import json, os, sys
from pathlib import Path
import numpy as np
import torch
from astropy.table import Table
from cosmofm.cli import main as cli_main
from cosmofm.data_cards.readers.mosaic import open_mosaic
from cosmofm.finetune.deblend import deblend_image
from cosmofm.finetune.detect import detect_cube
from cosmofm.finetune.tiling import TilePlan, run_tiled
from cosmofm.heads.sofia_baseline import SofiaConfig

out = Path(sys.argv[1])
jobs = json.loads((out / "jobs.json").read_text())
rank = int(os.environ["RANK"])
torch.set_num_threads(2)  # so that workers=2 forks two workers in each rank (the launcher set OMP_NUM_THREADS=1)
summaries = {}
for name, job in jobs["api"].items():
    kw = dict(job["kw"], progress=False)
    if job["verb"] == "detect":
        summaries[name] = detect_cube(job["input"], out / f"{name}.fits", config=SofiaConfig() if job.get("sofia") else None, **kw)
    else:
        summaries[name] = deblend_image(job["input"], out / f"{name}.fits", **kw)

def failing(values, ivar, header):
    if rank == 1:
        raise ValueError("finder failed on purpose")
    return Table({"ROW": np.zeros(0), "COL": np.zeros(0)})

mosaic = open_mosaic(jobs["mosaic"])
try:
    run_tiled(mosaic, failing, out / "failed.fits", TilePlan(mosaic.shape, 100, 0), template=Table({"ID": np.zeros(0, np.int64)}), progress=False)
    failed = None
except Exception as e:
    failed = f"{type(e).__name__}: {e}"
code = cli_main(jobs["cli"])
import torch.distributed as dist
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "summaries": summaries, "failed": failed, "cli": code, "group_left": dist.is_initialized()},
                                                  default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
"""


def _same_catalogue(got, want, rtol: float = 0.0):
    """Every column, row for row (NaN where NaN), units; the primary keywords; the stamps.
    rtol: float columns within it (a network's float32 sums round differently in a process with
    another number of torch threads: 1 ulp of ra and 3e-7 of hi_size seen in CI), else exactly equal."""
    with fits.open(got) as g, fits.open(want) as w:
        assert len(g) == len(w)
        assert dict(g[0].header) == dict(w[0].header)
        a, b = Table.read(g[1]), Table.read(w[1])
        assert a.colnames == b.colnames and len(a) == len(b)
        for name in a.colnames:
            assert a[name].unit == b[name].unit and a[name].dtype == b[name].dtype, name
            x, y = np.asarray(a[name]), np.asarray(b[name])
            if rtol and x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=rtol, atol=0, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)
        for hg, hw in zip(g[2:], w[2:]):
            assert dict(hg.header) == dict(hw.header)
            np.testing.assert_array_equal(hg.data, hw.data)
        return len(a), len(g) - 2


@pytest.mark.timeout(180)
def test_launched_processes_share_the_tiles_and_write_the_one_process_catalogue(tmp_path):
    from cosmofm.heads.detection3d import CosmoFMForDetection3D, Detection3DHeadConfig
    from cosmofm.heads.detection3d_post import fit_noise_prior
    from cosmofm.pretrain import CosmoFMConfig
    from cosmofm.pretrain.checkpoint import write_manifest

    card = load_card("ska-hi-like")
    cube, mosaic = tmp_path / "cube.fits", tmp_path / "field.fits"
    write_cube(cube, card)
    write_mosaic(mosaic, MOSAIC_SOURCES)
    torch.manual_seed(0)
    model = CosmoFMForDetection3D.from_backbone_config(CosmoFMConfig(**TINY), Detection3DHeadConfig.from_card(card, merge_factor=0.0, max_detections=8, pa_from="regressed"))
    with torch.no_grad():
        model.decoder.objectness.bias.fill_(0.0)  # fires everywhere: arbitrary, deterministic detections of both signs
    prior = fit_noise_prior(np.linspace(0.06, 0.6, 40), 50, model.head_config.threshold, 0.05)  # the count part holds for HEAD's blocks
    model._set_task(noise_prior={**prior, "prefilter": HEAD["prefilter"], "head_block": list(HEAD["head_block"])})
    model.save_pretrained(tmp_path / "det")
    write_manifest(tmp_path / "det")
    sofia = {"tile": TILE, "overlap": OVERLAP, "workers": 2}
    jobs = {"api": {"sofia": {"verb": "detect", "input": str(cube), "kw": sofia, "sofia": True},
                    "head": {"verb": "detect", "input": str(cube), "kw": {"model": str(tmp_path / "det"), "tile": TILE, "overlap": OVERLAP, "workers": 2, **HEAD}},
                    "sep": {"verb": "deblend", "input": str(mosaic), "kw": {"tile": 100, "overlap": 40, "thresh": 5.0, "write_stamps": True, "workers": 1}}},
            "mosaic": str(mosaic),
            "cli": ["detect", str(cube), "--output", str(tmp_path / "cli.fits"), "--tile", "64,48,48", "--overlap", "0,16,16", "--sofia-defaults"]}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "shard.py").write_text(SCRIPT)
    launch = subprocess.Popen([*accelerate_launch(2), str(tmp_path / "shard.py"), str(tmp_path)], env=launch_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the one-process catalogues, here, while the launch runs
        ref = tmp_path / "ref"
        ref.mkdir()
        one = {"sofia": detect_cube(cube, ref / "sofia.fits", config=SofiaConfig(), progress=False, **sofia),
               "head": detect_cube(cube, ref / "head.fits", model=str(tmp_path / "det"), tile=TILE, overlap=OVERLAP, workers=2, progress=False, **HEAD)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            one["sep"] = deblend_image(mosaic, ref / "sep.fits", tile=100, overlap=40, thresh=5.0, write_stamps=True, workers=1, progress=False)
        dist = sys.modules.get("torch.distributed")
        assert dist is None or not dist.is_initialized()  # no launcher: no process group formed
        stdout, stderr = launch.communicate(timeout=160)
    finally:
        launch.kill()
    assert launch.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]

    for name, tiles in (("sofia", [5, 4]), ("head", [5, 4]), ("sep", [8, 8])):
        rows, stamps = _same_catalogue(tmp_path / f"{name}.fits", ref / f"{name}.fits", rtol=1e-5 if name == "head" else 0.0)
        for r in ranks:  # every rank: the same summary, its own rank, each rank's share of the tiles
            s = r["summaries"][name]
            assert s["rank"] == r["rank"] and s["world_size"] == 2 and s["tiles_per_rank"] == tiles
            assert s["n_sources"] == one[name]["n_sources"] == rows and s["n_tiles"] == sum(tiles)
        assert rows > 0 and (stamps == rows if name == "sep" else stamps == 0)
    _same_catalogue(tmp_path / "cli.fits", ref / "sofia.fits")
    assert ranks[0]["summaries"]["sofia"]["n_candidates"] == one["sofia"]["n_candidates"] > one["sofia"]["n_sources"]  # the cut on rank 0
    # the purity cut's flipped blocks: counted in forked workers on both ranks, summed, the count the prior scales by
    want = one["head"]["reliability"]
    for r in ranks:
        got = r["summaries"]["head"]["reliability"]
        assert got["blocks_run_negative"] == want["blocks_run_negative"] >= 2 and got["prior"]["per_block"] == prior["per_block"]
        assert r["summaries"]["head"]["head_stats"]["blocks"] == 0  # every tile ran in the rank's forked workers
        assert got["threshold"] == want["threshold"] and got["n_kept"] == want["n_kept"] and got["n_negative"] == want["n_negative"] > 0
    # a finder error on rank 1's tile: rank 1 raises it, rank 0 names it; then the CLI ran and tore the group down
    assert ranks[1]["failed"].startswith("ValueError: finder failed on purpose")
    assert ranks[0]["failed"].startswith("RuntimeError: another process of the launch failed; rank 1: ValueError")
    assert [r["cli"] for r in ranks] == [0, 0] and not any(r["group_left"] for r in ranks)
    assert stdout.count("detected ") == 1  # the CLI's line from rank 0 only
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no rank's part left behind
