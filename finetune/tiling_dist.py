"""Tiles shared by the processes of a launch (accelerate launch, torchrun): ranks, collectives, the merge.

    accelerate launch --num_processes 8 -m cosmofm.cli detect cube.fits --model M --output sources.fits
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m cosmofm.cli detect cube.fits ...

`finetune.tiling.run_tiled` and the verbs around it (`finetune.detect.detect_cube`,
`finetune.deblend.deblend_image`) ask `launched_ranks()` which process they are. Alone (no
process group and no WORLD_SIZE > 1 in the environment) the answer is None and nothing here
runs: no process group is formed, torch is not imported, the one-process path of
`finetune.tiling` is the whole story. Launched, the process group is formed through
accelerate's `PartialState` (gloo on CPU; nccl on CUDA, the rank's device cuda:LOCAL_RANK)
and `run_shard` takes over the tiler's writing:

1. Every rank runs the plan's tiles with index % world == rank (round-robin, so that a
   cluster of sources, or a blank region, spreads over the ranks) in its own workers, as one
   process runs all of them, and spools its rows (ids counted from 0 on the rank) and stamps
   into part files beside the output: the output folder (and the input) must be shared by
   every node, a cluster's shared filesystem.
2. Each rank's outcome (rows per tile, skipped tiles, the stamps' byte ranges, or its error)
   goes to every rank (`Ranks.gather`, the barrier): one rank's failure makes every rank
   raise, so none waits for it until the process group's timeout.
3. Rank 0 reads the parts and writes THE catalogue: tiles in plan order, ids 0..n-1 as one
   process numbers them, each stamp renamed SRC<id>, the same primary keywords; the result is
   the one-process catalogue row for row (rank 0 holds the catalogue's rows while merging,
   never the cube). Its outcome goes to every rank; every rank returns
   the same summary, plus "rank", "world_size" and "tiles_per_rank" (tiles each rank ran).

The verbs' quantities over the whole input follow the same rule (`Ranks.from_main`: the
cube's noise per channel and each kernel's clip rms, measured on rank 0 and sent to all;
`Ranks.sum`: the head's flipped-block counter; `Ranks.on_main`: the reliability cut and the
merge over the whole catalogue, on rank 0, their answer sent to all). Objects travel as JSON
in byte tensors (no pickle): numbers, strings, lists, dicts; arrays as nested lists.

Workers per rank: the rank's share of the node's cores (`Ranks.cores`: torch's threads, at
most the node's cores over its ranks; accelerate sets the threads so on CPU, torchrun sets
OMP_NUM_THREADS=1). Forked workers compose with the process group as a DataLoader's do under
DDP: the children run tiles and never touch the group (a model on CUDA runs in threads).
A rank waits for the others at most `GROUP_TIMEOUT` (torch's default, 10-30 min, is shorter
than rank 0's noise pass over an SDC2-size cube).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from cosmofm.data_cards.errors import InputError

GROUP_TIMEOUT = timedelta(hours=6)  # the longest a rank waits for the others: rank 0's pass over the cube, the slowest rank's tiles
_RANKS: list = []  # the Ranks of this process once formed (one process group per process)


def launched() -> bool:
    """Whether this process is one of several started by a launcher: a torch.distributed
    process group exists, or WORLD_SIZE > 1 in the environment (accelerate launch, torchrun)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise InputError("WORLD_SIZE", f"is {os.environ['WORLD_SIZE']!r}", "start the run with accelerate launch / torchrun, or unset it") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch and the collectives the tiled verbs use."""

    rank: int
    world: int
    local_world: int  # ranks on this node
    device: object  # torch.device: the network's (PartialState().device)
    wire: object  # torch.device the collectives' tensors live on (cpu for gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def tiles(self, plan) -> list:
        """This rank's share of the plan's tiles: round-robin over the ranks."""
        return [t for t in plan if t.index % self.world == self.rank]

    @property
    def cores(self) -> int:
        """This rank's cores: torch's threads, at most the node's physical cores over its ranks."""
        from cosmofm.data_cards.workers import cores, physical_cores

        return max(1, min(cores(), physical_cores() // max(1, self.local_world)))

    def workers(self, requested: int | None, n_tiles: int) -> int:
        """Workers for this rank's `n_tiles` tiles: `requested`, else one per core of the rank's share."""
        from cosmofm.data_cards.workers import n_workers

        n = n_workers(requested) if requested else self.cores
        return min(n, max(1, n_tiles))  # a rank without tiles still runs the (empty) loop

    # ------------------------------------------------------------------ collectives (JSON in byte tensors)

    def gather(self, obj) -> list:
        """`obj` of every rank, by rank, on every rank."""
        import torch
        import torch.distributed as dist

        data = _encode(obj, self.wire)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.wire)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8, device=self.wire)
        padded[: data.numel()] = data
        out = [torch.empty(width, dtype=torch.uint8, device=self.wire) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return [_decode(o[: int(s.item())]) for o, s in zip(out, sizes)]

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        import torch
        import torch.distributed as dist

        data = _encode(obj, self.wire) if self.main else None
        size = torch.tensor([data.numel() if self.main else 0], dtype=torch.int64, device=self.wire)
        dist.broadcast(size, 0)
        buf = data if self.main else torch.empty(int(size.item()), dtype=torch.uint8, device=self.wire)
        dist.broadcast(buf, 0)
        return obj if self.main else _decode(buf)

    def sum(self, value):
        """A number, or a dict of numbers, summed over the ranks."""
        values = self.gather(value)
        if isinstance(value, dict):
            return {k: sum(v[k] for v in values) for k in value}
        return sum(values)

    def on_main(self, fn, *args):
        """fn(*args) on rank 0, its (JSON-able) answer on every rank; its error raised on every rank."""
        answer, error = None, None
        if self.main:
            try:
                answer = {"ok": fn(*args)}
            except Exception as e:  # every rank must reach the broadcast, or the others wait for it
                answer, error = {"error": f"{type(e).__name__}: {e}"}, e
        answer = self.broadcast(answer)
        if error is not None:
            raise error
        if "error" in answer:
            raise RuntimeError(f"rank 0 failed: {answer['error']}")
        return answer["ok"]

    def from_main(self, fn) -> np.ndarray:
        """The float64 array fn() computes on rank 0 (a pass over the input), on every rank."""
        return np.asarray(self.on_main(lambda: np.asarray(fn(), np.float64).tolist()), np.float64)


def launched_ranks() -> Ranks | None:
    """None for one process (no launcher); launched, this process's `Ranks`, the process group
    formed on first call (accelerate's PartialState: gloo on CPU, nccl on CUDA)."""
    if not launched():
        return None
    import torch.distributed as dist

    if _RANKS and not dist.is_initialized():  # torn down since (`pretrain.backend.close_process_group`): form it again
        from accelerate import PartialState

        PartialState._reset_state()
        _RANKS.clear()
    if not _RANKS:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=GROUP_TIMEOUT)  # cpu: accelerate's gloo (MULTI_CPU) set-up
        if not dist.is_initialized():
            raise InputError("launch", f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but no process group formed",
                             "start the run with accelerate launch or torchrun (they set RANK, MASTER_ADDR, MASTER_PORT)")
        wire = torch.device("cpu") if dist.get_backend() == "gloo" else state.device
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        _RANKS.append(Ranks(state.process_index, state.num_processes, local, state.device, wire))
    return _RANKS[0]


def on_main(ranks: Ranks | None, fn, *args):
    """fn(*args) here (one process: `ranks` None), or on rank 0 with its answer on every rank (launched)."""
    return fn(*args) if ranks is None else ranks.on_main(fn, *args)


def from_main(ranks: Ranks | None, fn):
    """fn() here (one process), or its float64 array from rank 0 on every rank (launched)."""
    return fn() if ranks is None else ranks.from_main(fn)


def _encode(obj, device):
    import torch

    raw = json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def _decode(tensor):
    return json.loads(bytes(tensor.cpu().numpy()).decode())


# ---------------------------------------------------------------------------- the sharded run


def run_shard(ranks: Ranks, results, output: Path, fmt: str, plan, template, id_column: str, stamps: bool, keywords: dict | None,
              files: list, overwrite: bool) -> dict:
    """`run_tiled`'s writing when launched: spool this rank's `results` into its parts, gather,
    rank 0 merges (module docstring). Returns the summary's counts (same on every rank)."""
    import uuid

    from cosmofm.finetune.tiling import _spool

    part = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.rank{ranks.rank}"
    mine = {"catalogue": f"{part}.catalogue.fits", "stamps": f"{part}.stamps" if stamps else None}
    error = None
    try:
        try:
            spooled = _spool(results, Path(mine["catalogue"]), mine["stamps"] and Path(mine["stamps"]), template, id_column, True)
            outcome = {**mine, "rows": spooled["rows"], "skipped": dict(spooled["skipped"]), "stamp_index": spooled["stamps"],
                       "tiles": spooled["tiles"]}
        except Exception as e:  # every rank must reach the gather (the barrier), or the others wait for it
            outcome, error = {"error": f"{type(e).__name__}: {e}"}, e
        outcomes = ranks.gather(outcome)
        if error is not None:
            raise error
        failed = [f"rank {r}: {o['error']}" for r, o in enumerate(outcomes) if "error" in o]
        if failed:
            raise RuntimeError("another process of the launch failed; " + "; ".join(failed))
        skipped = sum((Counter(o["skipped"]) for o in outcomes), Counter())
        if sum(skipped.values()) == len(plan):
            from cosmofm.finetune.tiling import _nothing_usable

            raise _nothing_usable(files, len(plan))
        n_sources = ranks.on_main(_merge, outcomes, output, fmt, plan, template, id_column, keywords, skipped, overwrite)
    finally:
        for p in mine.values():
            if p is not None:
                Path(p).unlink(missing_ok=True)
    return {"n_sources": n_sources, "skipped": dict(skipped), "rank": ranks.rank, "world_size": ranks.world,
            "tiles_per_rank": [o["tiles"] for o in outcomes]}


def _merge(outcomes: list, output: Path, fmt: str, plan, template, id_column: str, keywords, skipped: Counter, overwrite: bool) -> int:
    """Rank 0: every rank's part, tiles in plan order, into the one catalogue (and stamps); its row count."""
    import contextlib
    import uuid

    from astropy.io import fits

    from cosmofm.data_cards.io.catalogue import CatalogueWriter, read_catalogue
    from cosmofm.finetune.tiling import _assemble_fits, _primary_keywords

    world = len(outcomes)
    parts = [read_catalogue(o["catalogue"]) for o in outcomes]  # the catalogue's rows in memory (the cube never is)
    rows = [dict(o["rows"]) for o in outcomes]  # tile index -> its rows, per rank
    owner_of = {tile: r for r, ran in enumerate(rows) for tile in ran}  # the rank that ran each tile (skipped tiles: none)
    index = [iter(o["stamp_index"] or ()) for o in outcomes]
    pending = [next(i, None) for i in index]
    at = [0] * world
    work = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}"
    catalogue_path = Path(f"{work}.catalogue.fits") if fmt == "fits" else output
    stamp_path = Path(f"{work}.stamps") if outcomes[0]["stamps"] else None
    sources = [open(o["stamps"], "rb") for o in outcomes] if stamp_path else []
    n = 0
    try:
        with CatalogueWriter(catalogue_path, order=list(template.colnames), overwrite=True if fmt == "fits" else overwrite) as catalogue, \
                (open(stamp_path, "wb") if stamp_path else contextlib.nullcontext()) as stamp_out:
            catalogue.add(template[:0])
            for tile in sorted(owner_of):  # plan order
                owner = owner_of[tile]
                k = rows[owner][tile]
                piece = parts[owner][at[owner]: at[owner] + k]
                local = np.asarray(piece[id_column], np.int64).copy()
                piece[id_column] = np.arange(n, n + k, dtype=np.int64)
                for sid, lid in zip(range(n, n + k), local):
                    if pending[owner] is not None and pending[owner][0] == lid:
                        _, offset, head, length = pending[owner]
                        sources[owner].seek(offset)
                        raw = sources[owner].read(length)
                        header = fits.Header.fromstring(raw[:head].decode("ascii"))
                        header["EXTNAME"], header["ID"] = f"SRC{sid}", sid
                        stamp_out.write(header.tostring().encode("ascii") + raw[head:])
                        pending[owner] = next(index[owner], None)
                at[owner] += k
                n += k
                catalogue.add(piece)
        if fmt == "fits":
            _assemble_fits(output, catalogue_path, stamp_path, _primary_keywords(plan, sum(skipped.values()), n, keywords))
    finally:
        for f in sources:
            f.close()
        for p in (catalogue_path if fmt == "fits" else None, stamp_path):
            if p is not None:
                p.unlink(missing_ok=True)
    return n


__all__ = ["GROUP_TIMEOUT", "Ranks", "from_main", "launched", "launched_ranks", "on_main", "run_shard"]
