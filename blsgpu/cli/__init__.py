"""The `blsgpu` command: `run` one configuration, `bench` a sweep of bounds, `simulate` projections.

`run` and `bench` launch a local world of CPU processes on gloo (default 4), or, under torchrun,
run as one rank per process (``--device cuda``: one GPU each). Every run times a synchronous
baseline (the same sharded model with both exchanges at bound 0 and a blocking driver) and BLS at
each bound on the same batches and delays, checks that every run's predictions equal the
synchronous run's bit for bit, and prints throughput, latency, masking, speedup and the
simulator's prediction side by side. perf/README.md documents the defaults and the --json schema.

This package is the command line only: the flags (parser.py), their types and limits (types.py),
and here the checks that refuse a bad command before any work starts and the dispatch. What the
commands do is in blsgpu/bench/commands.py.
"""

from __future__ import annotations

import argparse
import json
import os

from blsgpu.bench import commands
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.memory import available_memory, gib, memory_estimate
from blsgpu.bench.runner import BenchConfig
from blsgpu.bench.sim import load_work
from blsgpu.cli.parser import DEFAULTS, SIM_DEFAULTS, build_parser
from blsgpu.cli.types import MAX_PEER_TIMEOUT_S, MAX_ROWS, check_out_dir, check_out_paths

# ------------------------------------------------------------------------------ up-front checks


def _check_memory(parser, cfg: BenchConfig, ranks_here: int, launcher: bool) -> None:
    avail = available_memory()
    need, parts = memory_estimate(cfg, ranks_here, launcher)
    if avail is not None and need > avail:
        name, biggest = max(parts.items(), key=lambda kv: kv[1])
        parser.error(
            f"this configuration needs about {gib(need)} of memory on this machine "
            f"({ranks_here} rank(s) of about {gib(sum(parts.values()))}, most of it "
            f"{gib(biggest)} for {name}), more than the {gib(avail)} available"
        )


def _check_delays(parser, cfg: BenchConfig, world_deadline_s: float | None) -> None:
    """Refuse delays that would make the peers of a sleeping rank time out, or the world."""
    import numpy as np

    model = cfg.delay_model
    if model.kind in ("none", "skew"):  # skew scales the measured compute: known only at run time
        return
    sched = model.schedule(cfg.world_size, cfg.iterations, cfg.seed)
    r, k = np.unravel_index(int(sched.argmax()), sched.shape)
    worst = float(sched[r, k])
    if worst >= cfg.timeout_s / 2:
        parser.error(
            f"--delay {cfg.delay}: rank {r} would sleep {worst:.3g} s in iteration {k}, not less "
            f"than half of the {cfg.timeout_s:g} s a peer may stay silent (min(--timeout-s, "
            f"{MAX_PEER_TIMEOUT_S})): its peers would give up on it while it sleeps"
        )
    if world_deadline_s is not None:
        # Time the sleeps alone take at least: a synchronous run waits for the slowest rank in
        # every iteration; a BLS run, for the rank that sleeps most in total.
        sync_s = float(sched.max(axis=0).sum())
        bls_s = float(sched.sum(axis=1).max())
        at_least = cfg.repeats * (sync_s + len(cfg.bounds) * bls_s)
        if at_least >= world_deadline_s:
            parser.error(
                f"--delay {cfg.delay}: the injected delays alone take at least {at_least:.3g} s "
                f"({sync_s:.3g} s per synchronous run, {bls_s:.3g} s per BLS run, "
                f"{cfg.repeats} repeat(s)), not less than --timeout-s {world_deadline_s:g}: the "
                f"world would time out"
            )


# ------------------------------------------------------------------------------ run / bench


def _config(args, parser: argparse.ArgumentParser, world_size: int):
    """BenchConfig from the flags; flag conflicts become argparse errors."""
    d = DEFAULTS
    if args.arch_embedding_size is not None:
        if args.rows is not None:
            parser.error("--rows and --arch-embedding-size both set the table sizes; give one")
        if args.tables is not None and args.tables != len(args.arch_embedding_size):
            parser.error(
                f"--tables {args.tables} but --arch-embedding-size lists "
                f"{len(args.arch_embedding_size)} tables"
            )
        sizes = args.arch_embedding_size
        if max(sizes) > MAX_ROWS:
            parser.error(
                f"--arch-embedding-size: a table of {max(sizes)} rows; at most {MAX_ROWS} rows per table"
            )
    else:
        sizes = (args.rows or d["rows"],) * (args.tables or d["tables"])
    D = args.arch_sparse_feature_size
    bot = args.arch_mlp_bot
    if bot is None:
        bot = (13, *d["mlp_bot_hidden"], D or d["sparse_feature_size"])
    top = args.arch_mlp_top or tuple(int(x) for x in d["mlp_top"].split("-"))
    if D is not None and bot[-1] != D:
        parser.error(
            f"--arch-mlp-bot {'-'.join(map(str, bot))} ends in {bot[-1]} but "
            f"--arch-sparse-feature-size is {D}: the bottom MLP's output is one more "
            f"vector of the dot interaction, so it must be D wide"
        )
    bounds = args.bounds if hasattr(args, "bounds") else (args.bound,)
    try:
        return BenchConfig(
            world_size=world_size,
            bounds=tuple(bounds),
            iterations=args.iterations,
            warmup=args.warmup,
            batch=args.batch,
            embedding_sizes=tuple(sizes),
            mlp_bot=tuple(bot),
            mlp_top=tuple(top),
            delay=args.delay,
            seed=args.seed,
            alpha=args.alpha,
            pooling=args.pooling,
            device=args.device,
            repeats=args.repeats,
            trace_dir=args.trace,
            timeout_s=float(min(args.timeout_s, MAX_PEER_TIMEOUT_S)),
        )
    except ValueError as e:
        parser.error(str(e))


def _flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _cmd_run(args, parser) -> int:
    env = commands.torchrun_env()
    if args.device == "cuda" and env is None:
        parser.error(
            "--device cuda runs one rank per GPU under torchrun, e.g. "
            "`torchrun --nproc-per-node 8 -m blsgpu bench --device cuda`"
        )
    if env is not None:
        rank, world, _ = env
        if args.world_size is not None and args.world_size != world:
            parser.error(f"--world-size {args.world_size} but torchrun started {world} ranks")
    else:
        rank, world = 0, args.world_size or DEFAULTS["world_size"]
    cfg = _config(args, parser, world)
    if env is None:
        _check_memory(parser, cfg, world, launcher=True)
    else:
        _check_memory(parser, cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), launcher=False)
    _check_delays(parser, cfg, args.timeout_s if env is None else None)
    # Only rank 0 writes them (every rank its own trace).
    check_out_paths(parser, ("--json", args.json), ("--plot", args.plot), probe=rank == 0)
    check_out_dir(parser, "--trace", args.trace, keep=env is not None)
    return commands.bench(
        cfg, _flags(args), env, args.timeout_s, args.json, args.plot, progress=not args.no_progress
    )


# ------------------------------------------------------------------------------ simulate


def _cmd_simulate(args, parser) -> int:
    s = SIM_DEFAULTS
    record = None
    check_out_paths(parser, ("--json", args.json))
    if args.from_json is not None and not args.from_json.strip():
        parser.error(f"--from-json needs a path, got {args.from_json!r}")
    if args.from_json:
        try:
            with open(args.from_json) as f:
                record = json.load(f)
            rc = record["config"]
            load_work(record, mode="sync")  # checks the record has what a replay needs
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--from-json {args.from_json}: {e}")
    delay = args.delay or (rc["delay"] if record else DEFAULTS["delay"])
    bounds = args.bounds or (
        tuple(rc["bounds"]) if record else tuple(int(b) for b in DEFAULTS["bounds"].split(","))
    )
    K = args.iterations or (rc["iterations"] if record else s["iterations"])
    base_ms = args.base_ms if args.base_ms is not None else (record["base_ms"] if record else s["base_ms"])
    comm_s = (
        args.comm_ms / 1e3
        if args.comm_ms is not None
        else (record["comm_s"] if record else s["comm_ms"] / 1e3)
    )
    seed = args.seed if args.seed is not None else (rc["seed"] if record else 0)
    worlds = args.world_size or tuple(int(w) for w in s["world_size"].split(","))
    model = DelayModel.parse(delay)
    avail = available_memory()
    need = 12 * 8 * max(worlds) * K  # a projection's [W, K] arrays (delays, work, schedule)
    if avail is not None and need > avail:
        parser.error(
            f"--world-size {max(worlds)} x --iterations {K} needs about {gib(need)} of "
            f"memory, more than the {gib(avail)} available"
        )
    if model.kind == "straggler" and int(model.params[0]) >= min(worlds):
        parser.error(
            f"--delay {delay}: straggler rank {int(model.params[0])} is not < every "
            f"--world-size ({min(worlds)})"
        )
    return commands.simulate(delay, worlds, bounds, K, base_ms, comm_s, seed, record, args.json)


_COMMANDS = {"run": _cmd_run, "simulate": _cmd_simulate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _COMMANDS[args.command](args, parser)


__all__ = ["build_parser", "main"]
