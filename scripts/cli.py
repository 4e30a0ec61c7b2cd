"""`cosmofm <verb>`: the one command-line entry point.

Verbs stay thin: each parses its arguments and calls one library function. Bad input
surfaces as a one-line `error: <field>: <problem> -- <fix>` and exit status 2, never a
traceback (set COSMOFM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import sys

from cosmofm.cli_mock import MOCK_KINDS, run_mock


def _cmd_demo(args):
    from cosmofm.demo import run_demo

    run_demo(output=args.output, steps=args.steps, hub_endpoint=args.hub_endpoint, repo_id=args.repo_id)


def _cmd_pretrain(args):
    from cosmofm.pretrain.backend import load_backend, resolved_config
    from cosmofm.pretrain.recipe import PretrainRecipe
    from cosmofm.pretrain.train import pretrain

    recipe = PretrainRecipe.load(args.config, args.set or [])
    if args.output:
        recipe.run.output_dir = args.output  # as given: read as YAML, `yes` or `[a]` would not be a path
    if args.backend:
        load_backend(args.backend, "--backend")
        recipe.run.backend = args.backend
    if args.print_config:
        import yaml

        world = int(os.environ.get("WORLD_SIZE", "1"))
        resolved = resolved_config(recipe, world)
        print(f"# cosmofm pretrain --config {args.config}: the resolved recipe and backend for {world} process(es)")
        print(yaml.safe_dump(resolved, sort_keys=False).rstrip("\n"))
        return
    resume, overwrite = _resume_if_possible(args, recipe.run.output_dir) if args.resume_if_possible else (args.resume, args.overwrite)
    summary = pretrain(recipe, resume=resume, overwrite=overwrite, resume_from=args.resume_from)
    if summary.get("stopped"):  # SIGTERM: saved and stopped cleanly, no model released yet
        print(f"stopped by {summary['stopped']}: {summary['checkpoint']}\nmetrics: {summary['metrics']}")
        return
    print(f"model: {summary['model_dir']}\nmetrics: {summary['metrics']}")


def _resume_if_possible(args, run_dir) -> tuple[bool, bool]:
    """`--resume-if-possible`: what a launcher's restart needs (pretrain/launch.py `auto_resume`)."""
    from cosmofm.data_cards.errors import InputError
    from cosmofm.pretrain.launch import auto_resume

    for flag, given in (("--resume", args.resume), ("--resume-from", args.resume_from is not None), ("--overwrite", args.overwrite)):
        if given:
            raise InputError(flag, "does not go with --resume-if-possible (which resumes when there is a checkpoint)", f"drop {flag} or --resume-if-possible")
    resume, overwrite, message = auto_resume(run_dir)
    if os.environ.get("RANK", "0") == "0":  # every process decides alike; one says so
        print(message, flush=True)
    return resume, overwrite


def _cmd_launch(args):
    from cosmofm.data_cards.errors import InputError
    from cosmofm.pretrain.backend import load_backend
    from cosmofm.pretrain.launch import LaunchPlan, dry_run_text, launch_commands, run_commands
    from cosmofm.pretrain.recipe import PretrainRecipe

    # the recipe and backend are checked here, before any process or job starts
    recipe = PretrainRecipe.load(args.config, args.set or [])
    if args.backend:
        load_backend(args.backend, "--backend")
    pretrain_args = ["--config", args.config, *(a for kv in args.set or [] for a in ("--set", kv))]
    pretrain_args += [a for flag, v in (("--output", args.output), ("--backend", args.backend)) if v for a in (flag, v)]
    plan = LaunchPlan(args.launcher, tuple(pretrain_args), nodes=args.nodes, gpus_per_node=args.gpus_per_node, max_restarts=args.max_restarts,
                      main_address=args.main_address, main_port=args.main_port, machine_rank=args.machine_rank, rdzv_id=args.rdzv_id,
                      time=args.time, partition=args.partition, run_dir=args.output or recipe.run.output_dir)
    commands = launch_commands(plan)
    if args.dry_run:
        print(dry_run_text(commands))
        return
    status = run_commands(commands)
    if status != 0:
        raise InputError(commands[0].argv[0], f"exited with status {status}", "see its output above")


def _cmd_inspect(args):
    from cosmofm.inspect import NotVerified, describe

    try:
        print(describe(args.path))
    except NotVerified as e:
        print(e.description)  # what could be read; main prints the error line and exits 2
        raise


def _cmd_push(args):
    from cosmofm.finetune.hub import push

    result = push(args.path, args.repo_id, hub_endpoint=args.hub_endpoint, revision=args.revision, tag=args.tag,
                  private=args.private, eval_results=args.eval, max_shard_size=args.max_shard_size,
                  commit_message=args.message)
    where = f" --hub-endpoint {args.hub_endpoint}" if args.hub_endpoint else ""
    print(f"pushed {result}\nload it: cosmofm pull {result.repo_id} --revision {result.commit}{where}")


def _cmd_pull(args):
    from cosmofm.finetune.hub import pull

    print(pull(args.repo_id, revision=args.revision, hub_endpoint=args.hub_endpoint, force_download=args.force_download))


def _cmd_finetune(args):
    from cosmofm.data_cards.errors import InputError
    from cosmofm.finetune.recipe import FinetuneRecipe, run_recipe
    from cosmofm.heads.base import task_model_class

    if args.task:
        task_model_class(args.task)  # an unregistered task: named, with the known ones
    recipe = FinetuneRecipe.load(args.config or args.task or "spectral-classification", _finetune_overrides(args), _finetune_entries(args))
    if args.task and recipe.task != args.task:
        raise InputError("--task", f"is {args.task!r} but the recipe {args.config} is for {recipe.task!r}",
                         f"drop --task, or give a recipe for {args.task!r} (shipped: --config {args.task})")
    result = run_recipe(recipe, workers=args.workers, progress=True)
    if "model_dir" not in result:  # another process of a multi-process run: the main one saves and reports
        return
    print("  ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float)))
    print(f"model: {result['model_dir']}\neval: {result['eval_results']}")


def _finetune_entries(args) -> dict:
    """The recipe entries the `finetune` flags for names and paths set, as given (through
    --set, YAML would read `yes` or `2024` as no string)."""
    entries = {k: v for k, v in (("finetune.output_dir", args.output), ("card", args.card), ("finetune.teacher", args.teacher)) if v is not None}
    if args.backbone is not None:  # a given backbone, or a fresh one's shape, replaces the recipe's starting point
        entries.update(backbone=None if args.backbone.lower() == "none" else args.backbone, backbone_recipe=None)
    if args.recipe is not None:
        entries.update(backbone_recipe=args.recipe, backbone=entries.get("backbone"))
    return entries


def _finetune_overrides(args) -> list[str]:
    """The numeric recipe entries the `finetune` flags set (each flag only when given), then --set's."""
    flags = {"n_labelled": args.n_train, "mock_seed": args.seed, "finetune.seed": args.seed,
             "finetune.strategy": args.strategy, "finetune.n_blocks": args.n_blocks, "finetune.layer_decay": args.layer_decay,
             "finetune.epochs": args.epochs, "finetune.batch_size": args.batch_size, "finetune.lr": args.lr,
             "finetune.label_fraction": args.label_fraction, "finetune.grad_accum": args.grad_accum,
             "finetune.checkpoint_every": args.checkpoint_every, "finetune.mixed_precision": "bf16" if args.bf16 else None,
             "finetune.resume": True if args.resume else None}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.set or [])


def _cmd_classify(args):
    from cosmofm.finetune.classify import classify

    summary = classify(args.input, args.model, args.output, batch_size=args.batch_size, card=args.card,
                       redshift=args.redshift, mc_samples=args.mc_dropout, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
                       dust_map=args.dust_map)
    print(f"classified {summary['n_classified']} spectra ({summary['n_rows']} rows; redshifts: {summary['redshift']}) -> {summary['output']}")
    if summary["flags"]:
        print("flagged rows (FLAGS column): " + ", ".join(f"{n} {code}" for code, n in summary["flags"].items()), file=sys.stderr)


def _cmd_predict(args):
    from cosmofm.finetune.task_predict import predict_task

    summary = predict_task(args.input, args.model, args.output, batch_size=args.batch_size, card=args.card, chunk_rows=args.chunk_rows,
                           overwrite=args.overwrite, expect_task=args.task)
    print(f"predicted {summary['n_predicted']} objects ({summary['n_rows']} rows) -> {summary['output']}")
    if summary["flags"]:
        print("flagged rows (FLAGS column): " + ", ".join(f"{n} {code}" for code, n in summary["flags"].items()), file=sys.stderr)


def _cmd_score(args):
    import json

    from cosmofm.heads.sdc2_score import read_catalogue, score_catalogue
    from cosmofm.pretrain.checkpoint import atomic_write_bytes

    result = score_catalogue(read_catalogue(args.catalogue, "catalogue"), read_catalogue(args.truth, "truth"), beam_arcsec=args.beam_arcsec)
    summary = result.as_dict()
    print(json.dumps(summary, indent=1))
    if args.output:
        atomic_write_bytes(args.output, json.dumps(summary, indent=1).encode())


def _cmd_deblend(args):
    from cosmofm.finetune.deblend import deblend_image
    from cosmofm.finetune.tiling import cli_shape

    summary = deblend_image(args.image, args.output, model=args.model, method=args.method, tile=cli_shape(args.tile, 2, "tile"),
                            overlap=cli_shape(args.overlap, 2, "overlap"), workers=args.workers, write_stamps=args.write_stamps,
                            overwrite=args.overwrite, bands=args.bands.split(",") if args.bands else None, fwhm_pixels=args.fwhm_pixels,
                            thresh=args.thresh, bf16=args.bf16, student=args.student)
    if summary.get("rank", 0):  # launched: rank 0 wrote the catalogue and reports it
        return
    print(f"deblended {summary['n_sources']} sources ({summary['method']}, bands {','.join(summary['bands'])}, "
          f"{summary['n_tiles']} tiles{_per_rank(summary)}) -> {summary['output']}")
    if summary["flags"] or summary["n_skipped_tiles"]:
        print("input problems: " + "; ".join([*summary["flags"].values()] + ([f"{summary['n_skipped_tiles']} tiles without a usable pixel"]
                                                                              if summary["n_skipped_tiles"] else [])), file=sys.stderr)


def _cmd_detect(args):
    from cosmofm.finetune.detect import detect_cube
    from cosmofm.finetune.tiling import cli_shape

    kwargs = {k: cli_shape(v, 3, k) for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    if args.sofia_defaults:
        from cosmofm.heads.sofia_baseline import SofiaConfig

        kwargs["config"] = SofiaConfig()  # SoFiA's own defaults instead of the tuned SOFIA_TUNED
    if args.head_block is not None:
        kwargs["head_block"] = None if args.head_block == "none" else cli_shape(args.head_block, 3, "head-block")
    if args.prefilter is not None:
        kwargs["prefilter"] = args.prefilter or None  # 0: every block
    if args.bf16 is not None:
        kwargs["bf16"] = args.bf16
    if args.reliability is not None:
        kwargs["reliability"] = args.reliability
    summary = detect_cube(args.cube, args.output, model=args.model, method=args.method, workers=args.workers, overwrite=args.overwrite,
                          card=args.card, noise=args.noise, **kwargs)
    if summary.get("rank", 0):  # launched: rank 0 wrote the catalogue and reports it
        return
    print(f"detected {summary['n_sources']} sources ({summary['method']}, {summary['n_tiles']} tiles{_per_rank(summary)}) -> {summary['output']}")
    if "head_options" in summary:
        o = summary["head_options"]
        blocks = f"blocks of {'x'.join(map(str, o['head_block']))} overlapping {'x'.join(map(str, o['block_overlap']))}" if o["head_block"] else "whole tiles"
        print(f"head: {blocks}, "
              f"{'prefilter ' + format(o['prefilter'], 'g') + ' rms' if o['prefilter'] else 'every block'}, {'bf16' if o['bf16'] else 'float32'}")
    pattern = summary["noise_pattern"]
    if pattern["spread"] is not None:
        print(f"noise across the field: p90/p10 {pattern['spread']:.2f}, {'divided out (local noise scaling)' if pattern['applied'] else 'per channel only'}")
    for note in summary["notes"] + ([f"{summary['n_skipped_tiles']} tiles without a usable voxel"] if summary["n_skipped_tiles"] else []):
        print(f"note: {note}", file=sys.stderr)


def _per_rank(summary: dict) -> str:  # ", 5+4 over 2 processes" when launched (finetune.tiling_dist)
    return f", {'+'.join(map(str, summary['tiles_per_rank']))} over {summary['world_size']} processes" if "tiles_per_rank" in summary else ""


LAUNCHED_TILES = ("Several processes share the tiles when started by a launcher, one per GPU: accelerate launch --num_processes N -m cosmofm.cli "
                  "%s (or torchrun --nproc_per_node N [--nnodes K]; the output folder shared); rank 0 writes the one-process catalogue.")


def _cmd_bench(args):
    from cosmofm.bench.pretrain_throughput import main as bench_main

    bench_main(["--out", args.out] + (["--quick"] if args.quick else []) + (["--force-bf16"] if args.force_bf16 else []))


def _predict_path_arguments(p: argparse.ArgumentParser, model: str) -> None:
    """The arguments of every verb on the predict path (`finetune/predict.py`): files in, catalogue out."""
    p.add_argument("input", nargs="+", help="survey file(s), folder(s) of them, or a datasets folder")
    p.add_argument("--model", required=True, help=f"{model} folder or repo id")
    p.add_argument("--output", required=True, help="catalogue path (.fits or .parquet); never one of the inputs, nor in an input folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --output")
    p.add_argument("--card", help="data card of the input (default: inferred from each file)")
    p.add_argument("--batch-size", type=int, default=256, help="objects per forward pass")
    p.add_argument("--chunk-rows", type=int, default=1024,
                   help="objects read at a time from one big file (bounds the memory; pieces under ~30 MB per array stay fastest)")


def build_parser() -> argparse.ArgumentParser:
    from cosmofm.finetune.strategies import STRATEGIES
    from cosmofm.heads.template_fit import REDSHIFT_METHODS

    p = argparse.ArgumentParser(prog="cosmofm", description="A foundation model for astronomical spectra, images, cubes and simulations.")
    sub = p.add_subparsers(dest="verb", required=True)

    d = sub.add_parser("demo", help="generate mocks, pretrain a small backbone, save and reload it")
    d.add_argument("--output", default="outputs/demo", help="folder for everything the demo writes")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    d.add_argument("--hub-endpoint", help="hub to publish to: http(s) URL, file:///dir or folder (default: OUTPUT/hub)")
    d.add_argument("--repo-id", default="cosmofm/demo", help="repo id to publish the demo model as")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("pretrain", help="self-supervised pretraining from a recipe")
    t.add_argument("--config", default="demo", help="recipe YAML path or shipped name (demo, tiny)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe entry, e.g. optim.lr=3e-4")
    t.add_argument("--output", help="run folder (overrides run.output_dir)")
    t.add_argument("--resume", action="store_true", help="continue exactly from the run's newest checkpoint that verifies")
    t.add_argument("--resume-from", type=int, metavar="STEP", help="continue exactly from the checkpoint of this step")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in the folder (its model, checkpoints, metrics, logs)")
    t.add_argument("--backend", help="how processes share the model: ddp, fsdp2, zero1, zero2, zero3 or a backend YAML (overrides run.backend)")
    t.add_argument("--print-config", action="store_true", help="print the resolved recipe and backend (YAML) and exit without training")
    t.add_argument("--resume-if-possible", action="store_true",
                   help="resume from the newest checkpoint that verifies if there is one, else start fresh (what launchers' restarts run)")
    t.set_defaults(func=_cmd_pretrain)

    la = sub.add_parser("launch", help="start pretraining with a launcher (one process, accelerate, elastic torchrun, SLURM), or print the commands",
                        description="Build the command(s) that start `cosmofm pretrain --resume-if-possible` under a launcher, and run "
                                    "them here or print them (--dry-run). Launch files: scripts/launch/ (package data cosmofm/launch/).")
    la.add_argument("launcher", choices=["local", "accelerate", "torchrun", "slurm"])
    la.add_argument("--config", default="demo", help="recipe YAML path or shipped name")
    la.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe entry (passed to cosmofm pretrain)")
    la.add_argument("--output", help="run folder (overrides run.output_dir)")
    la.add_argument("--backend", help="ddp, fsdp2, zero1, zero2, zero3 or a backend YAML")
    la.add_argument("--nodes", type=int, default=1, help="machines")
    la.add_argument("--gpus-per-node", type=int, default=1, help="processes per machine (one per GPU; gloo processes on CPUs)")
    la.add_argument("--max-restarts", type=int, help="torchrun / slurm: elastic restarts of the group after a failed process (default 3)")
    la.add_argument("--main-address", help="multi-node accelerate / torchrun: the host of rank 0 (the rendezvous)")
    la.add_argument("--main-port", type=int, default=29500, help="rendezvous / master port")
    la.add_argument("--machine-rank", type=int, help="multi-node accelerate: start this machine's command only")
    la.add_argument("--rdzv-id", default="cosmofm", help="multi-node torchrun: rendezvous id, the same on every node")
    la.add_argument("--time", help="slurm: time limit (e.g. 24:00:00)")
    la.add_argument("--partition", help="slurm: partition")
    la.add_argument("--dry-run", action="store_true", help="print the exact command(s) and start nothing")
    la.set_defaults(func=_cmd_launch)

    m = sub.add_parser("mock", help="generate mock observations as a datasets folder or FITS")
    m.add_argument("kind", choices=sorted(MOCK_KINDS))
    m.add_argument("--card", help="data card name or YAML path (default per kind)")
    m.add_argument("--n", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    m.add_argument("--format", choices=["datasets", "fits"], default="datasets")
    m.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator processes (output is the same for any number)")
    m.add_argument("--prior", help="lightcones only: a prior YAML (card, sampling, parameters) -> a sharded, resumable simulation "
                                   "bank of --n whole lightcones in --out (docs/simulation_bank.md)")
    m.add_argument("--shard-size", type=int, help="with --prior: lightcones per shard (default: ~256 MB shards)")
    m.add_argument("--simulator", choices=["cosmofm", "21cmfast"], help="with --prior: the embedded model (default) or 21cmFAST (extra '21cmfast')")
    m.add_argument("--overwrite", action="store_true", help="with --prior: replace a bank of another prior / seed / n in --out")
    m.add_argument("--size", type=int, help="mosaic and survey-cube only: pixels on a side (mosaic default 1024)")
    m.add_argument("--bands", help="mosaic only: comma-separated subset of the card's bands (default all)")
    m.add_argument("--mag-limit", type=float, help="mosaic only: faintest AB magnitude drawn (default 5-sigma depth + 1)")
    m.add_argument("--channels", type=int, help="survey-cube only: channels of the cube (with --size: pixels on a side)")
    m.add_argument("--density", type=float, help="survey-cube only: galaxies per deg^2 (default: the HI mass function's number)")
    m.add_argument("--log-mhi-min", type=float, help="survey-cube only: lightest HI mass drawn, log10 Msun (default 8)")
    m.add_argument("--plain", action="store_true", help="survey-cube only: no clustering, primary beam, flagged channels or continuum residuals")
    m.set_defaults(func=run_mock)

    i = sub.add_parser("inspect", help="describe a FITS file, dataset folder, data card or model folder",
                       description="Describe PATH. Exit status 2 when it cannot be used: unreadable data, or a model "
                                   "folder that fails verification (printed as NOT VERIFIED, then the error line).")
    i.add_argument("path")
    i.set_defaults(func=_cmd_inspect)

    hub_help = "HTTP(S) hub URL, file:///dir or a folder (local-directory hub); default: HF_ENDPOINT"
    u = sub.add_parser("push", help="publish a run or release folder to a model hub (safetensors, model card, manifest)")
    u.add_argument("path", help="training run folder (with model/) or release folder")
    u.add_argument("--repo-id", required=True, help="ORG/NAME on the hub")
    u.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    u.add_argument("--tag", help="tag the new commit (tags never move)")
    u.add_argument("--hub-endpoint", help=hub_help)
    u.add_argument("--private", action="store_true", help="create the repo as private")
    u.add_argument("--eval", help="evaluation JSON for the model card (default: eval_results.json in PATH)")
    u.add_argument("--max-shard-size", default="5GB", help="split weights above this size into shards + index")
    u.add_argument("--message", help="commit message")
    u.set_defaults(func=_cmd_push)

    g = sub.add_parser("pull", help="download a release from a model hub, verify it, print its local folder")
    g.add_argument("repo_id", help="ORG/NAME on the hub")
    g.add_argument("--revision", default="main", help="branch, tag or commit id")
    g.add_argument("--hub-endpoint", help=hub_help)
    g.add_argument("--force-download", action="store_true", help="download again instead of using the cache")
    g.set_defaults(func=_cmd_pull)

    f = sub.add_parser("finetune", help="fine-tune a task head from a recipe (mocks of a card as labelled data), calibrate, evaluate",
                       description="Fine-tune a registered task (photoz, spectral-classification, ...) from a fine-tune recipe; "
                                   "the flags below override the recipe's entries, --set any other.")
    f.add_argument("--task", help="registered task; without --config its shipped recipe (default spectral-classification)")
    f.add_argument("--config", help="fine-tune recipe: YAML path or shipped name (photoz, spectral-classification)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe entry, e.g. finetune.lr=3e-4 or n_labelled=500")
    f.add_argument("--output", required=True, help="run folder: model/, eval_results.json, finetune_recipe.yaml, checkpoints/")
    f.add_argument("--backbone", help="pretrained backbone release folder or repo id ('none' for a fresh backbone); "
                        "with --strategy student, the fine-tuned release whose head is distilled")
    f.add_argument("--recipe", help="a fresh backbone's shape, from a pretraining recipe (e.g. spectra-fast); not with --backbone")
    f.add_argument("--teacher", help="spectral-classification: a fine-tuned model (folder or repo id) to distil from")
    f.add_argument("--card", help="data card whose mocks (and label schema) are the labelled data")
    f.add_argument("--n-train", type=int, help="labelled mocks (split into train / calibration / test)")
    f.add_argument("--strategy", choices=STRATEGIES, help="frozen backbone (a probe), the last --n-blocks blocks, LoRA adapters, full fine-tune, or student: "
                        "only the head's fast path trains, distilled from the fine-tuned release given as --backbone "
                        "(deblending: --set finetune.head.student_widths=[16,32,48,64])")
    f.add_argument("--n-blocks", type=int, help="with --strategy last-n: trailing transformer blocks that train")
    f.add_argument("--layer-decay", type=float, help="layer-wise LR decay: LR factor per block below the last (1 = none)")
    f.add_argument("--epochs", type=int)
    f.add_argument("--batch-size", type=int, help="samples per optimizer step, over all processes")
    f.add_argument("--lr", type=float)
    f.add_argument("--label-fraction", type=float, help="fraction of the training block's labels to use")
    f.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (memory, not maths)")
    f.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, or CPUs with native bf16)")
    f.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every STEPS optimizer steps into OUTPUT/checkpoints")
    f.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --output")
    f.add_argument("--seed", type=int, help="mock universe and training seed")
    f.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="mock generator processes")
    f.set_defaults(func=_cmd_finetune)

    c = sub.add_parser("classify", help="classify spectra in survey files with a fine-tuned model; write a catalogue")
    _predict_path_arguments(c, "classification model")
    c.add_argument("--redshift", choices=REDSHIFT_METHODS, default=None,
                   help="where Z comes from: network (default when the model carries a redshift network, trained with "
                        "redshift_net_steps: p(z) from the spectrum alone, fewer catastrophic redshifts than the scan on survey-grade "
                        "mocks for ~15 %% more CPU per run; without one, the head's own regression, poor for galaxies and QSOs), "
                        "scan (the default otherwise: the predicted class's eigenspectra scanned over its redshift range, thousands "
                        "of spectra/s) or template (the full template fit of the predicted class, ~50 spectra/s)")
    c.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                   help="N Monte-Carlo-dropout passes of the head: adds EPISTEMIC (mutual information, nats)")
    c.add_argument("--dust-map", metavar="DIR",
                   help="folder with the SFD98 maps (SFD_dust_4096_ngp.fits, _sgp.fits; nothing is downloaded): for a model that "
                        "de-reddens, the E(B-V) at each target's RA/Dec where its file records none")
    c.set_defaults(func=_cmd_classify)

    r = sub.add_parser("predict", help="run any fine-tuned task (photoz, ...) on survey files; write a catalogue")
    _predict_path_arguments(r, "fine-tuned task model")
    r.add_argument("--task", help="refuse a model of another task (e.g. photoz, spectral-classification)")
    r.set_defaults(func=_cmd_predict)

    sc = sub.add_parser("score", help="score a source catalogue against a truth catalogue by SKA SDC2's rules (heads/sdc2_score.py)")
    sc.add_argument("catalogue", help="the finder's catalogue (FITS, ECSV, CSV, Parquet; SDC2 columns: ra dec central_freq "
                    "line_flux_integral hi_size w20 pa i, in the SDC2 units unless the columns carry units)")
    sc.add_argument("truth", help="the truth catalogue, same columns")
    sc.add_argument("--beam-arcsec", type=float, default=7.0, help="beam FWHM in arcsec (SDC2: 7)")
    sc.add_argument("--output", help="also write the score summary as JSON here")
    sc.set_defaults(func=_cmd_score)

    db = sub.add_parser("deblend", help="detect and deblend the sources of a multi-band FITS mosaic, tile by tile; write a catalogue",
                        description=LAUNCHED_TILES % "deblend IMAGE.fits --output CAT.fits")
    db.add_argument("image", help="the mosaic FITS (one ImageHDU per band, EXTNAME = band; optional IVAR_<band>)")
    db.add_argument("--output", required=True, help="catalogue (.fits, or .parquet without stamps)")
    db.add_argument("--model", help="a fine-tuned deblending model folder or repo id (default: a classical --method)")
    db.add_argument("--method", choices=["sep", "photutils"], help="classical deblender when no --model (default sep)")
    db.add_argument("--tile", help="tile size in pixels: N, or ROWS,COLS (default 512 for sep / photutils, 128 for a --model)")
    db.add_argument("--overlap", help="tile overlap in pixels, over twice the largest source radius (default 64; 32 for a --model)")
    db.add_argument("--workers", type=int, help="worker processes (default one per core; launched: per process, its share of the cores)")
    db.add_argument("--write-stamps", action="store_true", help="add one isolated cut-out ImageHDU per source (EXTNAME SRC<ID>)")
    db.add_argument("--bands", help="comma-separated bands to use (default all)")
    db.add_argument("--fwhm-pixels", type=float, help="PSF FWHM in pixels for the classical apertures (default: the mosaic's PSFFWHM, else 4.5)")
    db.add_argument("--thresh", type=float, help="classical detection threshold in sigma (default 1.5)")
    db.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="--model: bfloat16 autocast of the network (1.2-1.6x faster per core, fluxes within ~0.1 %% of float32's); "
                         "default: on where the device computes bfloat16 natively (CUDA, CPUs with AVX512-BF16 / AMX)")
    db.add_argument("--student", action="store_true",
                    help="--model: its distilled convolutional student in place of the backbone and decoder (faster; figures in docs/benchmarks.md)")
    db.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --output")
    db.set_defaults(func=_cmd_deblend)

    dt = sub.add_parser("detect", help="find HI sources in a spectral cube, tile by tile; write an SDC2 catalogue (cosmofm score reads it)",
                        description=LAUNCHED_TILES % "detect CUBE.fits --model M --output CAT.fits")
    dt.add_argument("cube", help="the cube FITS (RA, Dec and a FREQ or VRAD/VOPT axis with RESTFRQ; BMAJ/BMIN)")
    dt.add_argument("--output", required=True, help="catalogue (.fits or .parquet)")
    dt.add_argument("--model", help="a fine-tuned detection3d model folder or repo id (default: the classical --method); it runs with the "
                    "options its threshold was calibrated with (its config's task.inference), unless the three below say otherwise")
    dt.add_argument("--method", choices=["sofia"], help="classical finder when no --model (default sofia)")
    dt.add_argument("--sofia-defaults", action="store_true", help="sofia with SoFiA's default settings (default: SOFIA_TUNED, tuned on training survey cubes)")
    dt.add_argument("--tile", help="tile size: N or CHANNELS,ROWS,COLS (default 256,256,256)")
    dt.add_argument("--overlap", help="tile overlap: N or CHANNELS,ROWS,COLS (default 64,24,24)")
    dt.add_argument("--workers", type=int, help="worker processes (default one per core; launched: per process, its share of the cores)")
    dt.add_argument("--card", help="data card of the cube (default from the header: ska-hi-like)")
    dt.add_argument("--head-block", help="--model: run the network on blocks CHANNELS,ROWS,COLS of each tile (e.g. 64,32,32; none: the whole tile; default: the model's, its training tile)")
    dt.add_argument("--prefilter", type=float, help="--model: run only blocks with a smooth-and-clip voxel above this many rms (e.g. 5; 0: every block; default: the model's)")
    dt.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="--model: bfloat16 autocast or not (default: the model's, where the CPU or GPU computes bf16 natively; catalogue within a tolerance of float32)")
    dt.add_argument("--reliability", type=float, help="--model: run the head on the sign-flipped cube too and keep the detections above the lowest threshold whose purity, estimated from it, reaches this (e.g. 0.9; 0 = off; default: the model's own)")
    dt.add_argument("--noise", choices=["auto", "channel", "local"], default="auto",
                    help="noise scaling: per channel over the whole cube, or also across the field (a primary-beam corrected cube: "
                         "its pattern divided out, fluxes scaled back); auto (default): local where the noise varies across the field")
    dt.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --output")
    dt.set_defaults(func=_cmd_detect)

    b = sub.add_parser("bench", help="pretraining throughput benchmark (CPU MFU, loader ratio)")
    b.add_argument("--out", default="bench_results")
    b.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    b.add_argument("--force-bf16", action="store_true", help="time bf16 even without native bf16 matmul")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cosmofm.data_cards.errors import InputError

    try:
        args.func(args)
    except InputError as e:
        if os.environ.get("COSMOFM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down the torch.distributed process group a launched command formed (accelerate
    launch, torchrun) before the interpreter exits: left to interpreter shutdown, the comm
    threads of gloo and DeepSpeed can be destroyed while running ("terminate called without
    an active exception", SIGABRT after a complete run, ~1 in 8 ZeRO-3 runs on 2 CPU processes).
    destroy_process_group alone leaves the groups FSDP2 and DeepSpeed hold alive: pretrain.backend.close_process_group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from cosmofm.pretrain.backend import close_process_group

        left = close_process_group()
        if left:
            print(f"warning: {len(left)} communication threads still alive after the process group was destroyed "
                  f"({', '.join(left)}); the process may abort at exit", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
