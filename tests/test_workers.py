"""The one worker pool (data_cards/workers.py): results in order from processes, threads and
this process; a failure that names its item and keeps its InputError whole; workers = 1 in
this process; the worker-count rule against torch's own; and the classical `cosmofm
deblend --method sep` / `cosmofm detect --method sofia` runs that never import torch."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.workers import MAX_WORKERS, can_fork, cores, in_parallel, n_workers


def _square_with_pid(item):
    if item == "bad":
        raise InputError("item", "is bad", "give a good one")
    return item * item, os.getpid()


def _init_env():
    os.environ["COSMOFM_TEST_WORKER_INIT"] = "ran"


def _init_seen(item):
    return item, os.environ.get("COSMOFM_TEST_WORKER_INIT")


@pytest.mark.parametrize("processes, chunksize", [(True, 1), (True, 3), (False, 1), (False, 4)])
def test_results_come_back_in_order(processes, chunksize):
    out = list(in_parallel(_square_with_pid, iter(range(11)), 2, processes=processes, chunksize=chunksize))
    assert [v for v, _ in out] == [i * i for i in range(11)]
    pids = {pid for _, pid in out}
    assert (os.getpid() not in pids) == (processes and can_fork())  # Linux: forked processes; threads share this pid


def test_one_worker_runs_in_this_process_and_skips_the_initializer():
    out = list(in_parallel(_init_seen, [1, 2, 3], 1, processes=True, initializer=_init_env))
    assert out == [(1, None), (2, None), (3, None)]
    assert "COSMOFM_TEST_WORKER_INIT" not in os.environ
    assert {pid for _, pid in in_parallel(_square_with_pid, range(4), 1, processes=True)} == {os.getpid()}


def test_initializer_runs_in_each_worker_process():
    out = list(in_parallel(_init_seen, range(6), 2, processes=True, picklable=True, initializer=_init_env))
    assert out == [(i, "ran") for i in range(6)]
    assert "COSMOFM_TEST_WORKER_INIT" not in os.environ  # the parent's environment is untouched


@pytest.mark.parametrize("workers, processes, chunksize", [(1, False, 1), (2, False, 2), (2, True, 1), (2, True, 3)])
def test_a_failure_names_its_item_and_keeps_the_input_error_whole(workers, processes, chunksize):
    items = [1, 2, 3, 4, "bad", 6, 7]
    seen = []
    with pytest.raises(InputError, match="item: is bad") as caught:
        for value, _ in in_parallel(_square_with_pid, iter(items), workers, processes=processes, chunksize=chunksize):
            seen.append(value)
    assert seen == [1, 4, 9, 16]  # every result before the failing item, in order
    assert caught.value.fix == "give a good one"
    assert caught.value.__notes__ == ["in_parallel: _square_with_pid failed on item 4: 'bad'"]
    if processes and workers > 1 and can_fork():  # the worker's traceback comes along as the cause
        assert "_square_with_pid" in str(caught.value.__cause__) and "raise InputError" in str(caught.value.__cause__)


def test_lazy_items_stay_lazy():
    """An endless iterator: a bounded number of items is taken, so stopping early works."""
    taken = []

    def items():
        for i in itertools.count():
            taken.append(i)
            yield i

    out = list(itertools.islice(in_parallel(_square_with_pid, items(), 2, processes=True), 5))
    assert [v for v, _ in out] == [0, 1, 4, 9, 16]
    assert len(taken) <= 5 + 2 * 2  # what was read: the 5 yielded and at most two per worker in flight


def test_progress_bar_counts_results(capsys):
    assert [v for v, _ in in_parallel(_square_with_pid, [2, 3, 4], 2, progress=True, desc="squares", unit="sq")] == [4, 9, 16]
    err = capsys.readouterr().err
    assert "squares" in err and "3/3" in err


def test_n_workers_is_capped_by_the_cores_and_eight():
    cap = min(MAX_WORKERS, cores())
    assert n_workers() == n_workers(None) == n_workers(0) == cap
    assert n_workers(1) == 1
    assert n_workers(1000) == cap
    with pytest.raises(InputError, match="chunksize"):
        next(in_parallel(_square_with_pid, [1], 2, chunksize=0))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **extra}


def test_cores_without_torch_is_what_torch_uses():
    """The torch-free rule gives torch's own thread count, for the default and the variables."""
    code = ("import sys; from cosmofm.data_cards.workers import cores; a = cores(); assert 'torch' not in sys.modules; "
            "import torch; print(a, torch.get_num_threads(), cores())")
    settings = [{}, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"}]
    runs = [subprocess.Popen([sys.executable, "-c", code], env=_clean_env(**s), stdout=subprocess.PIPE, text=True) for s in settings]
    answers = [tuple(int(x) for x in p.communicate(timeout=300)[0].split()) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0]
    assert answers == [(a[1], a[1], a[1]) for a in answers]  # without torch == torch == with torch loaded
    assert answers[1][0] == 1 and answers[2][0] == min(2, os.cpu_count())


CLASSICAL_RUN = """
import sys
from cosmofm.cli import main
assert main({argv!r}) == 0
from astropy.table import Table
print(len(Table.read({out!r})), "torch" in sys.modules)
"""


def test_classical_deblend_and_detect_never_import_torch(tmp_path, cards):
    """`cosmofm deblend --method sep` and `cosmofm detect --method sofia`, with two worker
    processes, in fresh interpreters: their catalogues, and no torch in sys.modules."""
    from test_deblend_verb import SOURCES as MOSAIC_SOURCES
    from test_detect_verb import SOURCES as CUBE_SOURCES
    from test_detect_verb import write_cube
    from test_tiling import write_mosaic

    write_mosaic(tmp_path / "field.fits", MOSAIC_SOURCES)
    write_cube(tmp_path / "cube.fits", cards["ska-hi-like"])
    deblend = ["deblend", str(tmp_path / "field.fits"), "--output", str(tmp_path / "sources.fits"), "--method", "sep",
               "--tile", "100", "--overlap", "40", "--workers", "2", "--thresh", "5"]
    detect = ["detect", str(tmp_path / "cube.fits"), "--output", str(tmp_path / "hi.fits"), "--method", "sofia", "--sofia-defaults",
              "--tile", "64,48,48", "--overlap", "16,16,16", "--workers", "2"]
    runs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLASSICAL_RUN.format(argv=argv, out=argv[3]))],
                             env=_clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in (deblend, detect)]
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].split()[-2:] == [str(len(MOSAIC_SOURCES)), "False"]
    assert outs[1][0].split()[-2:] == [str(len(CUBE_SOURCES)), "False"]
