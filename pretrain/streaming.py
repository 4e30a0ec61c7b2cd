"""Streaming pretraining data: sharded Arrow / Parquet read through `datasets.IterableDataset`.

The map-style path (data.py: `GlobalBatchSampler` over a memory-mapped `SampleDataset`)
needs random access; this one reads each file once per epoch, front to back, so the
resident memory is the shuffle buffer and one piece of a file, whatever the corpus size.

The pipeline, all of it `datasets`' own machinery:

    pieces of each file (row ranges; Parquet: row groups)  -> one `IterableDataset.from_generator`
        per corpus part (a card, i.e. a survey), whose shards are those pieces
    -> `interleave_datasets(probabilities=recipe.data.mixture, stopping_strategy=
        "all_exhausted_without_replacement")`: a weighted mixture that still yields every
        sample exactly once per epoch
    -> `shuffle(seed, buffer_size)` (piece order + a buffer), `set_epoch(epoch)`
    -> `split_dataset_by_node(reader, readers)`, a reader being one (process, DataLoader
        worker): the split datasets itself composes for the workers of a node, done here
        so that a resumed loader can choose which reader each worker plays.

A file is cut into pieces (`data.piece_rows` rows) rather than taking whole files as
shards, because datasets splits by shard: a corpus written as one file (the demo's)
could otherwise feed neither two processes nor two workers. When the mixture's shard
count (its smallest part's pieces) is not a multiple of processes x workers, datasets
falls back to example-level splitting (every reader reads every piece and keeps one
block in N): still exactly once, at N times the reading; a warning says so.

Exact resume. `IterableDataset.state_dict()` does not save the shuffle buffer ("examples
from shuffle buffers are lost when resuming", datasets' docs), and
`torchdata.StatefulDataLoader` is not installed here. So the position is a count: each
rank's stream is endless (each reader plays epoch after epoch of its own pieces) and fully
determined by (seed, rank, world size, reader, workers), and the DataLoader takes batch j
from worker j % num_workers. A checkpoint stores the micro-batches consumed per rank
(JSON, in trainer_state.json); on resume each reader skips its share: whole epochs by
count (their length is counted in a pass that reads no sample data), the rest by reading
through without decoding; worker 0 of the new loader plays the reader that was due next.
Resume therefore needs the same world size and worker count (refused otherwise).

Units of one example are blocks of `pair_block` consecutive rows (the mock corpus stores
a spectrum and its image side by side), so pairs stay in one batch as in the map-style
path. A block belongs to the part of its first sample's card.

Per-sample seeds (which tokens are masked) are a hash of (run seed, epoch, folder and
file name, row): the same whatever the number of processes or workers, and after a resume.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.hf_io import ARROW_SCHEMA, COLUMNS, check_columns, decode_batch, row_to_sample
from cosmofm.data_cards.sample import Sample
from cosmofm.pretrain.data import collate_samples

logger = logging.getLogger(__name__)

STOPPING = "all_exhausted_without_replacement"  # every sample once per epoch, mixed by weight
SHUFFLE_INPUT_PIECES = 2  # datasets' default, 10, held ~30 pieces open on the 10x bench corpus


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one shard file: one `datasets` shard of one part."""

    file: str
    kind: str  # "arrow" (a save_to_disk stream file) or "parquet"
    start: int
    stop: int
    blocks: int  # blocks of this piece that belong to the part


@dataclass
class StreamPlan:
    """What every process and worker streams: pieces per part and the mixture weights."""

    parts: dict[str, list[Piece]]  # part (card) name -> its pieces
    probabilities: dict[str, float]  # part -> mixture probability (sums to 1)
    modality_of: dict[str, str]  # every card in the shards (paired ones too) -> its modality
    pair_block: int

    @property
    def cards(self) -> list[str]:
        """Every card in the corpus (the model's survey names)."""
        return sorted(self.modality_of)

    @property
    def modalities(self) -> set[str]:
        return set(self.modality_of.values())

    def blocks(self, part: str) -> int:
        return sum(p.blocks for p in self.parts[part])


def shard_files(path: Path) -> list[tuple[str, str]]:
    """(file, kind) of a `datasets` folder written by write_dataset / save_to_disk, a
    .parquet file or a folder of .parquet shards."""
    if not path.exists():
        raise InputError("recipe.data.datasets", f"{path} does not exist", "make it with `cosmofm mock` or fix the path")
    if path.is_file() and path.suffix == ".parquet":
        return [(str(path), "parquet")]
    state = path / "state.json"
    if state.exists():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        return [(str(f), "arrow") for f in files]
    parquet = sorted(path.glob("*.parquet"))
    if parquet:
        return [(str(f), "parquet") for f in parquet]
    raise InputError("recipe.data.datasets", f"{path} is not a dataset folder or Parquet shards, which streaming reads",
                     "write it with `cosmofm mock` / write_dataset, or set data.streaming=false to read survey files")


def _file_schema(file: str, kind: str) -> pa.Schema:
    try:
        if kind == "parquet":
            return pq.read_schema(file)
        with pa.memory_map(file) as src:
            return pa.ipc.open_stream(src).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(file, f"is not a readable {kind} shard ({exc})", "re-write the dataset with write_dataset") from None


def check_schemas(files: list[tuple[str, str]]) -> None:
    """Every shard has the sample schema, and all have the same columns: a stray shard
    (another dataset's, a column missing) is named before any compute."""
    first = None
    for file, kind in files:
        schema = _file_schema(file, kind)
        check_columns(schema, file, exact_types=kind == "arrow")  # Parquet values are cast on read
        names = sorted(schema.names)
        if first is None:
            first = (file, names)
        elif names != first[1]:
            extra, missing = sorted(set(names) - set(first[1])), sorted(set(first[1]) - set(names))
            raise InputError(file, f"has another schema than {first[0]} (extra columns {extra}, missing {missing})",
                             "remove the stray shard, or re-write all shards with write_dataset (columns: " + ", ".join(COLUMNS) + ")")


def _file_cards(file: str, kind: str) -> list[str]:
    """The card column of a shard (only that column is read)."""
    if kind == "parquet":
        return pq.read_table(file, columns=["card"]).column("card").to_pylist()
    with pa.memory_map(file) as src:  # pages of the other columns are never touched
        return [c for rb in pa.ipc.open_stream(src) for c in rb.column("card").to_pylist()]


def _row_groups(file: str) -> list[tuple[int, int]]:
    meta = pq.ParquetFile(file).metadata
    bounds = np.concatenate([[0], np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def build_plan(data, out_dir, world_size: int = 1, num_workers: int = 0) -> StreamPlan:
    """Scan the recipe's datasets (schemas and card column only) into a `StreamPlan`;
    every bad input is an InputError here, before a model exists."""
    from cosmofm.pretrain.corpus import PAIR_BLOCK, ensure_mock_corpus

    paths, block = [Path(p) for p in data.datasets], data.pair_block
    if not paths:
        paths, block = [ensure_mock_corpus(data, out_dir)], PAIR_BLOCK
    files = [f for p in paths for f in shard_files(p)]
    check_schemas(files)
    if data.piece_rows % block:
        raise InputError("recipe.data.piece_rows", f"{data.piece_rows} is not a multiple of the pairing block {block}",
                         f"use a multiple of {block}")
    parts: dict[str, list[Piece]] = {}
    for file, kind in files:
        cards = _file_cards(file, kind)
        if len(cards) % block:
            raise InputError(file, f"has {len(cards)} rows, not whole pairing blocks of {block}", "write whole blocks per shard, or set data.pair_block")
        ranges = _row_groups(file) if kind == "parquet" else [(a, min(a + data.piece_rows, len(cards))) for a in range(0, len(cards), data.piece_rows)]
        for start, stop in ranges:
            if start % block or stop % block:
                raise InputError(file, f"has a row group [{start}, {stop}) that splits a pairing block of {block}", "write row groups of whole blocks")
            firsts = cards[start:stop:block]
            for card in sorted(set(firsts)):
                parts.setdefault(card, []).append(Piece(file, kind, start, stop, firsts.count(card)))
    modality_of = _card_modalities(files)
    plan = StreamPlan(parts, mixture_probabilities(data.mixture, parts, modality_of), modality_of, block)
    check_layout(plan, world_size, num_workers)
    return plan


def _card_modalities(files) -> dict[str, str]:
    """card -> modality, from the shards (a user's card need not be shipped)."""
    out = {}
    for file, kind in files:
        table = pq.read_table(file, columns=["card", "modality"]) if kind == "parquet" else _arrow_columns(file, ["card", "modality"])
        for c, m in zip(table.column("card").to_pylist(), table.column("modality").to_pylist()):
            out.setdefault(c, m)
    return out


def _arrow_columns(file: str, columns: list[str]) -> pa.Table:
    with pa.memory_map(file) as src:
        return pa.Table.from_batches([rb.select(columns) for rb in pa.ipc.open_stream(src)]).combine_chunks()


def mixture_probabilities(weights: dict[str, float], parts: dict[str, list[Piece]], modality_of: dict[str, str]) -> dict[str, float]:
    """Each part's share of the mixture: its card's weight, else its modality's; without
    weights, the parts' sizes (the corpus as it is)."""
    if not weights:
        sizes = {p: sum(x.blocks for x in pieces) for p, pieces in parts.items()}
        return {p: n / sum(sizes.values()) for p, n in sizes.items()}
    names = sorted(parts) + sorted({modality_of[p] for p in parts})
    paired = sorted(set(weights) & set(modality_of) - set(parts))
    if paired:
        raise InputError("recipe.data.mixture", f"weights {paired}, whose samples are stored in pairing blocks led by another card's",
                         f"weight the part that leads the block instead (parts: {sorted(parts)})")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise InputError("recipe.data.mixture", f"names {unknown}, which are neither a card nor a modality of the corpus", f"use card names {sorted(parts)} or modalities {sorted(set(modality_of.values()))}")
    bad = {k: w for k, w in weights.items() if not w >= 0}
    if bad:
        raise InputError("recipe.data.mixture", f"has negative weights {bad}", "give every part a weight >= 0")
    out = {p: weights.get(p, weights.get(modality_of[p])) for p in parts}
    missing = sorted(p for p, w in out.items() if w is None)
    if missing:
        raise InputError("recipe.data.mixture", f"gives no weight to the corpus parts {missing}", "add their card or modality to data.mixture (weight 0 leaves a part out)")
    total = sum(out.values())
    if total <= 0:
        raise InputError("recipe.data.mixture", "has no positive weight", "give at least one part a weight > 0")
    return {p: w / total for p, w in out.items()}


def check_layout(plan: StreamPlan, world_size: int, num_workers: int) -> None:
    """Say how the stream is split over processes x workers; refuse a corpus too small to
    give every reader a block."""
    readers = world_size * max(num_workers, 1)
    blocks = sum(plan.blocks(p) for p in plan.parts if plan.probabilities[p] > 0)
    if blocks < readers:
        raise InputError("recipe.data.num_workers", f"{blocks} blocks cannot feed {world_size} process(es) x {max(num_workers, 1)} worker(s)",
                         "use fewer workers or processes, or more data")
    if readers > 1 and split_mode(plan, readers) == "examples":
        logger.warning("streaming: the smallest corpus part has %d pieces, not a multiple of the %d readers (processes x workers); "
                       "falling back to example-level splitting: every reader reads every piece and keeps one block in %d. "
                       "Lower data.piece_rows or write more shards to split by shard.",
                       min(len(plan.parts[p]) for p in plan.parts), readers, readers)


# ---------------------------------------------------------------------------- reading pieces


def _piece_batches(piece: Piece, src) -> list[pa.RecordBatch]:
    """Rows [start, stop) of the piece's file, with the sample schema (views into `src`)."""
    if piece.kind == "parquet":
        pf = pq.ParquetFile(src)
        groups = [i for i, (a, b) in enumerate(_row_groups(piece.file)) if a < piece.stop and b > piece.start]
        return pf.read_row_groups(groups, columns=list(COLUMNS)).cast(ARROW_SCHEMA).combine_chunks().to_batches()
    out, offset = [], 0
    for rb in pa.ipc.open_stream(src):
        n = rb.num_rows
        if offset + n > piece.start and offset < piece.stop:
            out.append(rb.slice(max(piece.start - offset, 0), min(piece.stop, offset + n) - max(piece.start, offset)))
        offset += n
        if offset >= piece.stop:
            break
    return out


# One example of the part datasets: a block of rows as an Arrow IPC stream (bytes, a data
# format, not a pickle). datasets needs typed examples (it infers or encodes features), and
# bytes pass its encoder untouched, so the shuffle buffer holds compact Arrow rows and the
# Samples are decoded only after it, in the worker, when they are batched.
def _block_features():
    from datasets import Features, List, Value

    return Features({"file": Value("string"), "rows": List(Value("int64")), "arrow": Value("binary")})


def _piece_blocks(pieces: list[Piece], card: str, block: int, decode: bool) -> Iterator[dict]:
    """The generator behind one part's IterableDataset: its blocks, piece after piece.

    `pieces` is the shard list datasets splits over processes and workers. With
    decode=False the rows' data are left out, in the same order (the shuffle buffer and the
    mixture draw from their RNGs by count, never by content): used to count an epoch.

    Arrow files are memory-mapped, so skipping the record batches before a piece reads only
    their headers (an ordinary read of a stream file reads every byte before it). The
    piece's blocks are copied out as bytes and the map closed before any is yielded, so
    the pages it touched leave the resident set with it."""
    for piece in pieces:
        with (pa.memory_map(piece.file) if piece.kind == "arrow" else pa.OSFile(piece.file)) as src:
            blocks, start = collections.deque(), piece.start
            for rb in _piece_batches(piece, src):
                cards = rb.column("card").to_pylist()
                for j in range(0, rb.num_rows, block):
                    if cards[j] == card:
                        blocks.append({"file": _file_key(piece.file), "rows": list(range(start + j, start + j + block)),
                                       "arrow": _ipc_bytes(rb.slice(j, block)) if decode else b""})
                start += rb.num_rows
            del rb
        while blocks:  # let go of each block as it leaves (the shuffle reads several pieces at once)
            yield blocks.popleft()


def _file_key(file: str) -> str:
    """A shard's name in sample seeds and errors: its folder and file name (two datasets'
    `data-00000-of-00001.arrow` must not share seeds), not the absolute path (a moved
    corpus keeps its seeds)."""
    path = Path(file)
    return f"{path.parent.name}/{path.name}"


def _ipc_bytes(rb: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        writer.write_batch(rb)
    return sink.getvalue().to_pybytes()


def block_samples(block: dict) -> list[Sample]:
    """The Samples of one streamed block."""
    rb = pa.ipc.open_stream(block["arrow"]).read_next_batch()
    decoded = decode_batch(rb, Path(block["file"]), block["rows"][0])
    return [_sample(decoded, j) for j in range(rb.num_rows)]


def _sample(b, j: int) -> Sample:
    """Row j of a decoded record batch as a Sample."""
    s = b.strings
    return row_to_sample({
        "id": s["id"][j].as_py(), "modality": s["modality"][j].as_py(), "card": s["card"][j].as_py(),
        # copies: the block's bytes are read-only, and torch wants writable arrays
        "values": np.array(b.values[b.values_offsets[j]:b.values_offsets[j + 1]]),
        "ivar": np.array(b.ivar[b.ivar_offsets[j]:b.ivar_offsets[j + 1]]),
        "shape": b.shape[b.shape_offsets[j]:b.shape_offsets[j + 1]],
        "coords": [np.array(b.coords_flat[b.axis_offsets[k]:b.axis_offsets[k + 1]]) for k in range(b.coords_offsets[j], b.coords_offsets[j + 1])],
        "pair_id": s["pair_id"][j].as_py(), "meta": s["meta"][j].as_py(),
    })


def reader_stream(plan: StreamPlan, reader: int, readers: int, seed: int, buffer_size: int, decode: bool = True):
    """One reader's `datasets.IterableDataset` of blocks: mixture -> shuffle -> split_dataset_by_node.

    A reader is one (process, DataLoader worker): reader = rank x workers + worker of
    world_size x workers, the split datasets itself composes for a worker of a node. We
    split over workers here rather than letting datasets do it inside the worker (it
    would use the worker's id), so that a resumed DataLoader, which always starts at
    worker 0, can give worker 0 the reader that was due next. Iterate it with
    `.iter(batch_size=1)`, which does not split again."""
    from datasets import IterableDataset, interleave_datasets
    from datasets.distributed import split_dataset_by_node

    names = [p for p in sorted(plan.parts) if plan.probabilities[p] > 0]
    parts = [IterableDataset.from_generator(_piece_blocks, features=_block_features(),
                                            gen_kwargs={"pieces": plan.parts[p], "card": p, "block": plan.pair_block, "decode": decode})
             for p in names]
    mixed = interleave_datasets(parts, probabilities=[plan.probabilities[p] for p in names], seed=seed, stopping_strategy=STOPPING)
    if buffer_size > 0:
        # the same seed for every reader: the shard order must be one permutation for all,
        # or the split below would not be a partition
        # shuffle fills its buffer from up to SHUFFLE_INPUT_PIECES pieces of each part at a
        # time, each an open piece: memory is the buffer plus parts x that many pieces
        mixed = mixed.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=SHUFFLE_INPUT_PIECES)
    return split_dataset_by_node(mixed, rank=reader, world_size=readers) if readers > 1 else mixed


def split_mode(plan: StreamPlan, readers: int) -> str:
    """How datasets splits the stream over `readers`: "shards" (each reads its own pieces)
    when the mixture's shard count (its smallest part's pieces) divides by them, else
    "examples" (each reads every piece and keeps one block in `readers`)."""
    shards = min(len(plan.parts[p]) for p in plan.parts if plan.probabilities[p] > 0)
    return "shards" if shards % readers == 0 else "examples"


def sample_seed(seed: int, epoch: int, file: str, row: int) -> int:
    """The masking seed of one sample: layout-independent (no rank, worker or position in it)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{file}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


def worker_share(consumed: int, worker: int, workers: int) -> int:
    """How many of the first `consumed` batches of a rank came from `worker` (round robin)."""
    return max(0, (consumed - worker + workers - 1) // workers)


class StreamingSamples(torch.utils.data.IterableDataset):
    """This rank's endless stream of collated batches, starting after `consumed` batches.

    Each worker plays one reader's pieces epoch after epoch (set_epoch reshuffles); the
    DataLoader takes batch j from worker j % W, so skipping each reader's share resumes
    exactly. Each yielded batch also carries `epochs` (the epoch of every sample), which
    the tests read to check "once per epoch"."""

    def __init__(self, plan: StreamPlan, rank: int, world_size: int, local_batch: int, seed: int, buffer_size: int,
                 consumed: int = 0, survey_names=()):
        if local_batch % plan.pair_block:
            raise InputError("recipe.optim.global_batch", f"the per-process batch {local_batch} is not whole pairing blocks of {plan.pair_block}",
                             f"use a global batch that is a multiple of {plan.pair_block} x the process count")
        self.plan, self.rank, self.world, self.batch = plan, rank, world_size, local_batch
        self.seed, self.buffer, self.consumed, self.survey_names = seed, buffer_size, consumed, list(survey_names)

    def _blocks(self, worker: int, workers: int) -> Iterator[tuple[int, dict]]:
        """(epoch, block) of this worker, endlessly, from its skipped position on."""
        # batch j of the rank came from reader j % workers; a resumed DataLoader starts at
        # worker 0, which must play the reader that is due next
        role = (worker + self.consumed) % workers
        reader, readers = self.rank * workers + role, self.world * workers
        skip = worker_share(self.consumed, role, workers) * (self.batch // self.plan.pair_block)
        light = reader_stream(self.plan, reader, readers, self.seed, self.buffer, decode=False)
        epoch_length = sum(1 for _ in light.iter(batch_size=1))
        if epoch_length == 0:
            raise InputError("recipe.data.piece_rows", f"rank {self.rank} worker {role} got no data ({readers} readers)",
                             "lower data.piece_rows, write more shards, or use fewer workers")
        stream = reader_stream(self.plan, reader, readers, self.seed, self.buffer)
        epoch, skip = divmod(skip, epoch_length)  # whole epochs need no reading
        while True:
            stream.set_epoch(epoch)
            for row in itertools.islice(stream.iter(batch_size=1), skip, None):
                yield epoch, {k: v[0] for k, v in row.items()}
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples, seeds, epochs = [], [], []
        for epoch, block in self._blocks(worker, workers):
            samples += block_samples(block)
            seeds += [sample_seed(self.seed, epoch, block["file"], r) for r in block["rows"]]
            epochs += [epoch] * len(block["rows"])
            if len(samples) == self.batch:
                batch = collate_samples(samples, self.survey_names, seeds)
                batch.epochs = epochs
                yield batch
                samples, seeds, epochs = [], [], []


def streaming_loader(plan: StreamPlan, recipe, rank: int, world_size: int, consumed: int, survey_names):
    """The DataLoader of a streaming run (batches come collated from the workers)."""
    o, d = recipe.optim, recipe.data
    dataset = StreamingSamples(plan, rank, world_size, o.global_batch // world_size, recipe.run.seed, d.shuffle_buffer, consumed, survey_names)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=d.num_workers, persistent_workers=False)


def data_position(recipe, step: int, world_size: int) -> dict:
    """The data position saved in a checkpoint's trainer_state.json (JSON, no pickle)."""
    micro = step * recipe.optim.grad_accum
    return {"mode": "streaming", "batches_per_rank": micro, "samples_per_rank": micro * recipe.optim.global_batch // world_size,
            "world_size": world_size, "num_workers": recipe.data.num_workers}


def resume_position(meta: dict, recipe, world_size: int, step: int) -> int:
    """Batches per rank to skip on resume; refuses a layout the stream cannot continue."""
    saved = meta.get("data")
    if not isinstance(saved, dict) or saved.get("mode") != "streaming":
        raise InputError("recipe.data.streaming", "is true but the checkpoint was written by a map-style run", "resume with data.streaming=false")
    for key, now in (("world_size", world_size), ("num_workers", recipe.data.num_workers)):
        if saved.get(key) != now:
            raise InputError("recipe.data.num_workers" if key == "num_workers" else "--num_processes",
                             f"is {now} but the streaming run was checkpointed with {saved.get(key)}: each worker's stream depends on it",
                             "resume with the same process and worker counts")
    if saved["batches_per_rank"] != step * recipe.optim.grad_accum:
        raise InputError("checkpoint", f"data position {saved['batches_per_rank']} does not match step {step}", "the checkpoint is inconsistent; resume from another")
    return int(saved["batches_per_rank"])
