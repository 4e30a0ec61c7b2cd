"""Save on a signal: SIGUSR1 writes a checkpoint at the next step boundary and trains on;
SIGTERM writes one and stops the run cleanly.

Clusters warn before they take a job away: SLURM sends a signal some time before the time
limit (`#SBATCH --signal=USR1@300`) and SIGTERM on preemption or `scancel` (SIGKILL follows
KillWait seconds later); torchrun passes SIGTERM on to its workers. The handler only notes
the request: the loop (train.py) reads it after each optimizer step, and the requests of
all ranks travel in the same all-reduce as that step's metrics, so every rank sees the same
requests at the same step and saves at it (a checkpoint needs every rank; one rank signalled
alone still makes all of them save). The checkpoint is the loop's usual one (manifest,
RNG states, data position), so a resume from it continues the run exactly.

Handlers are installed only in the main thread (Python's rule) and the previous ones are
put back when the run ends, so a notebook or the demo running several jobs keeps its own.
"""

from __future__ import annotations

import collections
import signal
import threading

SAVE, STOP = "save", "stop"
ACTIONS = {signal.SIGUSR1: SAVE, signal.SIGTERM: STOP} if hasattr(signal, "SIGUSR1") else {signal.SIGTERM: STOP}


class SaveOnSignal:
    """A context manager that notes SIGUSR1 / SIGTERM while the loop runs.

    `take()` on each rank gives [save requested, stop requested] (0.0 or 1.0) since the last
    call, to be summed over ranks; a request is never lost (a deque, appended to by the
    handler and drained here, both atomic under the GIL)."""

    def __init__(self, actions: dict | None = None):
        self.actions = dict(ACTIONS if actions is None else actions)
        self._pending: collections.deque = collections.deque()
        self._previous: dict = {}
        self.received: list[str] = []  # names of the signals seen, for the run's summary

    def _handle(self, signum, frame):
        self._pending.append(signum)

    def __enter__(self) -> "SaveOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.actions:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def take(self) -> list[float]:
        """[save, stop] requested on this rank since the last call."""
        wanted = set()
        while self._pending:
            signum = self._pending.popleft()
            wanted.add(self.actions[signum])
            self.received.append(signal.Signals(signum).name)
        return [float(SAVE in wanted or STOP in wanted), float(STOP in wanted)]
