"""Launch commands for pretraining: one process, `accelerate launch`, elastic `torchrun`, SLURM.

`launch_commands` only builds argument lists (no side effects), so that `cosmofm launch
... --dry-run` prints exactly what a real launch runs and tests check the strings;
`run_commands` is the one function that starts anything. Every
launcher starts `cosmofm pretrain --resume-if-possible`: a torchrun restart after a
failed process, a requeued SLURM job or a relaunch by hand continues from the run's newest
verified checkpoint instead of refusing the folder (`auto_resume`).

The accelerate configs and the sbatch script are package data in `cosmofm/launch/`
(scripts/launch/ in the source tree). The c10d rendezvous follows torchrun's elastic
launch (https://pytorch.org/docs/stable/elastic/run.html); the sbatch script requeues on
preemption as in SLURM's `--requeue` / `--signal` documentation.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cosmofm.data_cards.errors import InputError

LAUNCHERS = ("local", "accelerate", "torchrun", "slurm")
DEFAULT_PORT = 29500  # torchrun's and accelerate's default rendezvous / master port
DEFAULT_RESTARTS = 3  # torchrun / slurm: a few failed processes (a lost node, an OOM) per allocation
MODULE = ["-m", "cosmofm.cli", "pretrain"]  # how launchers start the CLI in each process
RESUME_FLAG = "--resume-if-possible"
# torchrun shares its rendezvous TCPStore with the workers by default, and a restarted group
# then reads the dead group's process-group keys (its gloo / NCCL addresses) from it and fails
# to connect (pytorch issues 135712, 167288; seen here with torch 2.13 on gloo). A store per
# attempt makes restarts work.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch_file(name: str) -> Path:
    """A shipped launch file (`accelerate_one_node.yaml`, `accelerate_multi_node.yaml`, `slurm.sbatch`)."""
    return Path(str(resources.files("cosmofm") / "launch" / name))


@dataclass(frozen=True)
class LaunchPlan:
    """What to launch and where.

    pretrain_args: the arguments after `cosmofm pretrain` (`--config NAME`, `--set ...`,
        `--output DIR`, `--backend B`); the launcher adds `--resume-if-possible`.
    nodes, gpus_per_node: machines, and processes per machine (GPUs; on a CPU machine, gloo
        processes).
    max_restarts: torchrun's elastic restarts of the whole group after a failed process
        (torchrun and slurm only; None: DEFAULT_RESTARTS).
    main_address, main_port: the rank-0 machine (accelerate) or rendezvous host (torchrun)
        of a multi-node launch; SLURM finds its own (the job's first node).
    machine_rank: accelerate on several nodes: the one machine to start (None: print all).
    rdzv_id: torchrun's rendezvous id, the same on every node of one job.
    time, partition: SLURM's --time and --partition (None: the script's / the cluster's default).
    run_dir: the run folder, for the sbatch script to watch its checkpoints.
    """

    launcher: str
    pretrain_args: tuple[str, ...]
    nodes: int = 1
    gpus_per_node: int = 1
    max_restarts: int | None = None
    main_address: str | None = None
    main_port: int = DEFAULT_PORT
    machine_rank: int | None = None
    rdzv_id: str = "cosmofm"
    time: str | None = None
    partition: str | None = None
    run_dir: str | None = None

    def check(self) -> None:
        """Refuse a plan that cannot start, before anything is launched."""
        if self.launcher not in LAUNCHERS:
            raise InputError("launcher", f"{self.launcher!r} is not a launcher", f"use one of {list(LAUNCHERS)}")
        for name, value, least in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 1), ("--max-restarts", self.max_restarts, 0)):
            if value is not None and value < least:
                raise InputError(name, f"must be at least {least}, got {value}", f"give {name} {max(least, 1)} or more")
        if not 0 < self.main_port < 65536:
            raise InputError("--main-port", f"{self.main_port} is not a TCP port", "give a port between 1 and 65535 (default 29500)")
        if self.launcher == "local" and (self.nodes, self.gpus_per_node) != (1, 1):
            raise InputError("--nodes/--gpus-per-node", "the local launcher starts one process",
                             "use torchrun or accelerate for several processes, slurm for several nodes")
        if self.launcher in ("accelerate", "torchrun") and self.nodes > 1 and not self.main_address:
            raise InputError("--main-address", f"a {self.nodes}-node {self.launcher} launch needs the address of its first node",
                             "give --main-address HOST (the node of rank 0; reachable from every node), or use the slurm launcher")
        if self.machine_rank is not None and not 0 <= self.machine_rank < self.nodes:
            raise InputError("--machine-rank", f"must be in 0..{self.nodes - 1}, got {self.machine_rank}", "give the rank of this node")
        if self.launcher == "slurm" and "," in (self.run_dir or ""):
            raise InputError("--output", f"{self.run_dir!r} has a comma, which sbatch --export would split", "give a run folder without commas")
        for name, value in (("--time", self.time), ("--partition", self.partition)):
            if value is not None and self.launcher != "slurm":
                raise InputError(name, f"applies to the slurm launcher, not {self.launcher}", f"drop {name}")
        if self.max_restarts is not None and self.launcher in ("local", "accelerate"):
            raise InputError("--max-restarts", f"the {self.launcher} launcher does not restart failed processes",
                             "use the torchrun launcher for elastic restarts, or drop --max-restarts")

    @property
    def restarts(self) -> int:
        return DEFAULT_RESTARTS if self.max_restarts is None else self.max_restarts


@dataclass(frozen=True)
class Command:
    """One command line: where it runs (a comment for the dry run) and its arguments."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for this command only

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])


def launch_commands(plan: LaunchPlan) -> list[Command]:
    """The command(s) that start `plan`: one, or one per machine for multi-node accelerate."""
    plan.check()
    pretrain = [*MODULE, RESUME_FLAG, *plan.pretrain_args]
    return _BUILDERS[plan.launcher](plan, pretrain)


def _local(plan: LaunchPlan, pretrain: list[str]) -> list[Command]:
    return [Command("this machine, one process", ["cosmofm", *pretrain[2:]])]


def _accelerate(plan: LaunchPlan, pretrain: list[str]) -> list[Command]:
    if plan.nodes == 1:
        head = ["accelerate", "launch", "--config_file", str(launch_file("accelerate_one_node.yaml")), "--num_processes", str(plan.gpus_per_node)]
        return [Command(f"this machine, {plan.gpus_per_node} process(es)", head + pretrain)]
    ranks = range(plan.nodes) if plan.machine_rank is None else [plan.machine_rank]
    return [Command(f"machine {rank} of {plan.nodes}", [
        "accelerate", "launch", "--config_file", str(launch_file("accelerate_multi_node.yaml")),
        "--num_processes", str(plan.nodes * plan.gpus_per_node), "--num_machines", str(plan.nodes), "--machine_rank", str(rank),
        "--main_process_ip", plan.main_address, "--main_process_port", str(plan.main_port), *pretrain]) for rank in ranks]


def _torchrun(plan: LaunchPlan, pretrain: list[str]) -> list[Command]:
    head = ["torchrun", "--nnodes", str(plan.nodes), "--nproc-per-node", str(plan.gpus_per_node), "--max-restarts", str(plan.restarts)]
    if plan.nodes == 1:
        # --standalone: a c10d rendezvous on localhost with a free port, so two runs on one machine never collide
        return [Command(f"this machine, {plan.gpus_per_node} process(es)", head + ["--standalone", *pretrain], ELASTIC_ENV)]
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{plan.main_address}:{plan.main_port}", "--rdzv-id", plan.rdzv_id]
    return [Command(f"every one of the {plan.nodes} machines (the same command)", head + rdzv + pretrain, ELASTIC_ENV)]


def _slurm(plan: LaunchPlan, pretrain: list[str]) -> list[Command]:
    export = {"COSMOFM_GPUS_PER_NODE": plan.gpus_per_node, "COSMOFM_MAX_RESTARTS": plan.restarts, "COSMOFM_RDZV_PORT": plan.main_port,
              **({"COSMOFM_RUN_DIR": plan.run_dir} if plan.run_dir else {})}
    argv = ["sbatch", "--nodes", str(plan.nodes), "--gpus-per-node", str(plan.gpus_per_node)]
    argv += [a for flag, v in (("--time", plan.time), ("--partition", plan.partition)) if v is not None for a in (flag, v)]
    # the script adds --resume-if-possible itself; it gets only the run's own arguments
    argv += ["--export", ",".join(["ALL", *(f"{k}={v}" for k, v in export.items())]), str(launch_file("slurm.sbatch")), *plan.pretrain_args]
    return [Command(f"a login node; each of the {plan.nodes} node(s) then runs: srun torchrun --nnodes $SLURM_NNODES "
                    f"--nproc-per-node {plan.gpus_per_node} --max-restarts {plan.restarts} --rdzv-backend c10d "
                    f"--rdzv-endpoint $HEAD:{plan.main_port} --rdzv-id $SLURM_JOB_ID {shlex.join(pretrain)}", argv)]


_BUILDERS = {"local": _local, "accelerate": _accelerate, "torchrun": _torchrun, "slurm": _slurm}


def dry_run_text(commands: list[Command]) -> str:
    """What `--dry-run` prints: each command after a comment naming where it runs."""
    return "\n".join(f"# {c.where}\n{c.shell()}" for c in commands)


def auto_resume(run_dir: str | Path) -> tuple[bool, bool, str]:
    """`cosmofm pretrain --resume-if-possible`: (resume, overwrite, message) for the run folder.

    Resume when the folder has a checkpoint (the claim then takes the newest that verifies,
    `checkpoint.resume_checkpoint`). Without one, start fresh; a run killed before its first
    checkpoint left only its recipe, logs and metrics, which are replaced, since nothing can
    continue from them. A folder with a released model but no checkpoint is not such a
    run: it is left for the usual refusal.
    """
    from cosmofm.pretrain.checkpoint import latest_checkpoint
    from cosmofm.pretrain.run_folder import RUN_OUTPUTS

    run_dir = Path(run_dir)
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return True, False, f"{run_dir}: resuming from the newest checkpoint that verifies (latest: {newest.name})"
    left = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if left and "model" not in left:
        return False, True, f"{run_dir}: no checkpoint; starting fresh, replacing a run stopped before its first checkpoint ({', '.join(left)})"
    return False, False, f"{run_dir}: no checkpoint; starting fresh"


def run_commands(commands: list[Command]) -> int:
    """Start the one command of a launch on this machine and wait for it; its exit status.

    Run in this interpreter's environment: its bin folder goes first on PATH, so that
    `torchrun`, `accelerate` and `cosmofm` are the ones installed beside this cosmofm.
    """
    if len(commands) != 1:
        raise InputError("--machine-rank", f"this launch has {len(commands)} commands, one per machine",
                         "give --machine-rank R to start this machine's, or --dry-run to print them all")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **commands[0].env)
    argv = commands[0].argv
    if shutil.which(argv[0], path=env["PATH"]) is None:
        raise InputError(argv[0], "is not on PATH here", "run this launcher where it is installed (a SLURM login node for sbatch), "
                         "or print the command with --dry-run")
    return subprocess.run(argv, env=env).returncode
