"""Streaming pretraining data (pretrain/streaming.py): exactly once per epoch over 2 ranks x 2
workers, exact resume mid-epoch, and bad shards / weights refused before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import N_IMAGES, N_SPECTRA, accelerate_launch, sharded_dataset  # tests/launch.py

from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.pretrain.recipe import PretrainRecipe

LOCAL_BATCH, WORKERS = 4, 2


def _recipe(dataset: Path, out: Path, *extra: str) -> PretrainRecipe:
    return PretrainRecipe.load("tiny", [f"run.output_dir={out}", "data.streaming=true", f"data.datasets=[{dataset}]",
                                        "data.piece_rows=4", "data.shuffle_buffer=8", "data.mixture={sdss-like: 3, image: 1}", *extra])


def _stream_ids(recipe, rank: int, world: int, consumed: int, n_batches: int) -> list[list]:
    """[(ids, epochs)] of this rank's next n_batches through a real DataLoader with workers."""
    import itertools

    from cosmofm.pretrain.streaming import build_plan, streaming_loader

    plan = build_plan(recipe.data, recipe.run.output_dir, world, recipe.data.num_workers)
    loader = streaming_loader(plan, recipe, rank, world, consumed, plan.cards)
    return [[b.ids, b.epochs, b.sample_seeds.tolist()] for b in itertools.islice(loader, n_batches)]


def _rank_main(dataset: str, out: str):
    """One of the gloo processes: its stream from the start, and resumed after 5 batches,
    with pieces that split by shard (4 rows) and with too few for that (12 rows)."""
    from accelerate import PartialState

    from cosmofm.pretrain.streaming import build_plan, split_mode

    state = PartialState(cpu=True)  # the process group the launcher set up (gloo on CPU)
    result = {}
    for rows in (4, 12):
        recipe = _recipe(Path(dataset), Path(out), f"data.num_workers={WORKERS}", f"optim.global_batch={LOCAL_BATCH * state.num_processes}",
                         f"data.piece_rows={rows}")
        mode = split_mode(build_plan(recipe.data, out, state.num_processes, WORKERS), state.num_processes * WORKERS)
        full = _stream_ids(recipe, state.process_index, state.num_processes, 0, 24)
        resumed = _stream_ids(recipe, state.process_index, state.num_processes, 5, 24 - 5)
        result[mode] = {"full": full, "resumed": resumed}
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps(result))
    state.wait_for_everyone()


def test_two_ranks_two_workers_see_every_sample_once_per_epoch_and_resume_exactly(tmp_path):
    dataset = sharded_dataset(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = accelerate_launch(2) + [__file__, str(dataset), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = {s.id for s in mock_samples(load_card("sdss-like"), N_SPECTRA, seed=7) + mock_samples(load_card("lsst-like"), N_IMAGES, seed=7)}
    for mode in ("shards", "examples"):  # datasets' two ways of splitting; both must hold
        ranks = [r[mode] for r in results]
        # 24 batches of 4 per rank = 192 samples = 3 epochs of 64 over the two ranks: every
        # worker has finished its epoch 0 long before
        epoch0 = [i for r in ranks for ids, epochs, _ in r["full"] for i, e in zip(ids, epochs) if e == 0]
        assert len(epoch0) == len(set(epoch0)), f"{mode}: a sample was seen twice in one epoch"
        assert set(epoch0) == everything, f"{mode}: samples lost in epoch 0: {sorted(everything - set(epoch0))[:5]}"
        for r in ranks:
            # resumed after 5 batches: exactly the batches (ids, and masking seeds) the uninterrupted stream had next
            assert r["resumed"] == r["full"][5:], mode
            # the mixture: 3:1 for spectra early in epoch 0, against 40:24 in the corpus
            first = [i for ids, _, _ in r["full"][:4] for i in ids]
            assert sum(i.startswith("sdss") for i in first) >= 9, (mode, first)
        assert not set(ranks[0]["full"][0][0]) & set(ranks[1]["full"][0][0]), f"{mode}: both ranks got the same samples"


def test_mixture_weights_set_the_interleaving(tmp_path):
    """The corpus is 40 spectra : 24 images; the weights, not that ratio, set the early mix."""
    dataset = sharded_dataset(tmp_path / "data")
    for weights, card in (("{sdss-like: 9, image: 1}", "sdss"), ("{sdss-like: 1, image: 9}", "lsst")):
        recipe = _recipe(dataset, tmp_path / "run", f"data.mixture={weights}", "data.shuffle_buffer=0")
        first = [i for ids, _, _ in _stream_ids(recipe, 0, 1, 0, 4) for i in ids]
        assert sum(i.startswith(card) for i in first) >= 13, (weights, first)  # 16 x 0.9 = 14.4 expected
        # and still every sample once per epoch: 16 batches = 64 samples = epoch 0 exactly
        epoch0 = [i for ids, epochs, _ in _stream_ids(recipe, 0, 1, 0, 16) for i, e in zip(ids, epochs) if e == 0]
        assert len(epoch0) == len(set(epoch0)) == N_SPECTRA + N_IMAGES


def test_streaming_pretrain_resumes_exactly(tmp_path):
    """The training loop on a stream: resumed from step 3, the loss curve equals the uninterrupted one."""
    from cosmofm.pretrain.train import pretrain

    dataset = sharded_dataset(tmp_path / "data")
    common = ["optim.max_steps=6", "run.save_every=3", "run.keep_last=3", "optim.global_batch=8", "model.objectives=[masked]"]
    reference = pretrain(_recipe(dataset, tmp_path / "a", *common))
    run_b = _recipe(dataset, tmp_path / "b", *common)
    pretrain(run_b)
    resumed = pretrain(run_b, resume_from=3)
    assert reference["losses"] == [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed["losses"]) == 3 and resumed["losses"] == reference["losses"][3:]
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["metadata"]["data"] == {"mode": "streaming", "batches_per_rank": 3, "samples_per_rank": 24, "world_size": 1, "num_workers": 0}
    with pytest.raises(InputError, match="num_workers"):  # another worker layout would stream other samples
        pretrain(_recipe(dataset, tmp_path / "b", *common, "data.num_workers=1"), resume_from=3)


def test_shard_with_another_schema_is_named_before_training(tmp_path):
    from cosmofm.pretrain.streaming import build_plan

    dataset = sharded_dataset(tmp_path / "data")
    table = pa.Table.from_batches(list(pa.ipc.open_stream(pa.memory_map(str(sorted(dataset.glob("data-*.arrow"))[0])))))
    shards = tmp_path / "parquet"
    shards.mkdir()
    pq.write_table(table, shards / "part-0.parquet", row_group_size=4)
    pq.write_table(table, shards / "part-1.parquet", row_group_size=4)
    # good Parquet shards stream (pieces = row groups): one epoch has every row of both once
    n_batches = 2 * table.num_rows // 8 + 2  # a batch of 8 more than one epoch
    stream = _stream_ids(_recipe(shards, tmp_path / "run", "data.mixture={}"), 0, 1, 0, n_batches)
    epoch0 = [i for ids, epochs, _ in stream for i, e in zip(ids, epochs) if e == 0]
    assert sorted(epoch0) == sorted(table.column("id").to_pylist() * 2)
    pq.write_table(table.drop_columns(["pair_id"]), shards / "part-1.parquet", row_group_size=4)
    with pytest.raises(InputError, match="part-1.parquet.*pair_id"):
        build_plan(_recipe(shards, tmp_path / "run").data, tmp_path / "run")
    pq.write_table(table.append_column("redshift", pa.array([0.1] * table.num_rows)), shards / "part-1.parquet", row_group_size=4)
    with pytest.raises(InputError, match="part-1.parquet.*another schema.*redshift"):
        build_plan(_recipe(shards, tmp_path / "run").data, tmp_path / "run")
    # and through the training entry point, before a model is built
    from cosmofm.pretrain.train import pretrain

    with pytest.raises(InputError, match="part-1.parquet"):
        pretrain(_recipe(shards, tmp_path / "run2"))
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_bad_mixture_weights_name_the_recipe_field(tmp_path):
    from cosmofm.pretrain.streaming import build_plan

    dataset = sharded_dataset(tmp_path / "data")
    with pytest.raises(InputError, match=r"recipe\.data\.mixture\.sdss-like.*negative"):
        _recipe(dataset, tmp_path, "data.mixture={sdss-like: -1, lsst-like: 1}")
    for weights, problem in (("{sdss-like: 1, cube: 1}", "neither a card nor a modality"), ("{sdss-like: 1}", "no weight to the corpus parts.*lsst-like"),
                             ("{sdss-like: 0, image: 0}", "no positive weight")):
        with pytest.raises(InputError, match=rf"recipe\.data\.mixture.*{problem}"):
            build_plan(_recipe(dataset, tmp_path, f"data.mixture={weights}").data, tmp_path)
    with pytest.raises(InputError, match=r"recipe\.data\.mixture.*streaming is false"):
        PretrainRecipe.load("tiny", ["data.mixture={sdss-like: 1}"])
    # more readers than blocks: refused, not left waiting for data that never come
    with pytest.raises(InputError, match=r"recipe\.data\.num_workers.*64 blocks"):
        build_plan(_recipe(dataset, tmp_path).data, tmp_path, world_size=2, num_workers=40)


if __name__ == "__main__":  # a rank of the two-process test
    _rank_main(sys.argv[1], sys.argv[2])
