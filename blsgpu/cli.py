"""The `blsgpu` command: `run` one configuration, `bench` a sweep of bounds, `simulate` projections.

`run` and `bench` launch a local world of CPU processes on gloo (default 4), or, under torchrun,
run as one rank per process (``--device cuda``: one GPU each). Every run times a synchronous
baseline (the same sharded model with both exchanges at bound 0 and a blocking driver) and BLS at
each bound on the same batches and delays, checks that every run's predictions equal the
synchronous run's bit for bit, and prints throughput, latency, masking, speedup and the
simulator's prediction side by side. perf/README.md documents the defaults and the --json schema.

This module is the command line only: the flags, their types and the checks that refuse a bad
command before any work starts. What the commands do is in blsgpu/bench/commands.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from blsgpu._env import MAX_TIMEOUT_S
from blsgpu.bench import commands
from blsgpu.bench.delays import ACCEPTED as DELAY_FORMS
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.memory import available_memory, gib, memory_estimate
from blsgpu.bench.runner import BenchConfig
from blsgpu.bench.sim import load_work

# Defaults of `blsgpu bench` with no arguments (BenchConfig's): small tables and MLPs, so that on a
# 2-core machine the injected delays dominate an iteration, and the whole sweep takes < 3 min.
_B = BenchConfig()
DEFAULTS = dict(
    world_size=_B.world_size, bounds=",".join(map(str, _B.bounds)), bound=4,
    iterations=_B.iterations, warmup=_B.warmup, batch=_B.batch, tables=len(_B.embedding_sizes),
    rows=_B.embedding_sizes[0], sparse_feature_size=_B.mlp_bot[-1],
    mlp_bot_hidden=_B.mlp_bot[1:-1], mlp_top="-".join(map(str, _B.mlp_top)),
    pooling=_B.pooling, alpha=_B.alpha, delay=_B.delay, seed=_B.seed, repeats=_B.repeats,
)
SIM_DEFAULTS = dict(world_size="4,64,1024,4096", iterations=100, base_ms=10.0, comm_ms=0.1)
MAX_SIM_WORLD = 1 << 16
# Upper bounds of the flags. Beyond them a number is a typo, not a job; below them, the memory the
# configuration needs is estimated and checked against what this machine has (_check_memory).
MAX_PEER_TIMEOUT_S = 300  # a channel's (and a barrier's) timeout: min(--timeout-s, this)
MAX_DELAY_MS = MAX_PEER_TIMEOUT_S * 1e3  # an injected delay per iteration, at most
MAX_LOCAL_WORLD = 1024
MAX_SEED = 2**32 - 1  # table t's generator is seeded with seed * 1_000_003 + t: stays < 2**64
MAX_ROWS = 2**31  # the synthetic data's row permutation stays inside int64
MAX_ITERATIONS = 10**9
MAX_TIME_MS = 1e9  # simulate's --base-ms / --comm-ms: finite arithmetic


# ------------------------------------------------------------------------------ argument types


def _int_at_least(lo: int, what: str, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{what} must be <= {hi}, got {v}")
        return v

    return parse


def _probe_file(path: Path) -> None:
    """Create and remove path (an existing file is opened for appending, not truncated)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if not path.is_file():
            raise IsADirectoryError(21, "it is not a regular file") from None
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        return
    os.close(fd)
    os.unlink(path)


def _check_out_paths(parser: argparse.ArgumentParser, *flags: tuple[str, str | None],
                     probe: bool = True) -> None:
    """Refuse, before any work, an output file (flag, path) that cannot be written: the file is
    created and removed (an existing one is opened for appending; probe=False: not touched)."""
    for flag, path in flags:
        if path is None:
            continue
        if not path.strip():
            parser.error(f"{flag} needs a path, got {path!r}")
        if Path(path).is_dir():
            parser.error(f"cannot write {path}: it is a folder")
        if not Path(path).resolve().parent.is_dir():
            parser.error(f"cannot write {path}: its folder does not exist")
        if not probe:
            continue
        try:
            _probe_file(Path(path))
        except OSError as e:
            parser.error(f"cannot write {path} ({flag}): {e.strerror or e}")


def _check_out_dir(parser: argparse.ArgumentParser, flag: str, path: str | None,
                   keep: bool = False) -> None:
    """Refuse a folder (e.g. --trace) in which no file can be written: folders that are missing
    are created, a file is created and removed in it, and the folders created are removed (kept
    with keep=True: other processes may be probing them at the same time)."""
    if path is None:
        return
    if not path.strip():
        parser.error(f"{flag} needs a folder, got {path!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        parser.error(f"cannot write into {path} ({flag}): it is not a folder")
    created = []
    try:
        for d in reversed([folder, *folder.parents]):
            if not d.exists():
                try:
                    d.mkdir()
                except FileExistsError:  # made by another rank meanwhile
                    continue
                created.append(d)
        _probe_file(folder / f".blsgpu-probe-{os.getpid()}")
    except OSError as e:
        parser.error(f"cannot write into {path} ({flag}): {e.strerror or e}")
    finally:
        for d in [] if keep else reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _nonneg_float(what: str, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{what} must be finite and >= 0, got {text!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{what} must be <= {hi:g}, got {text!r}")
        return v

    return parse


def _int_list(what: str, lo: int, hi: int):
    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be comma-separated integers like 0,1,2,4,8, got {text!r}") from None
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise argparse.ArgumentTypeError(f"{what} must lie in [{lo}, {hi}], got {bad}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{what} has repeated values: {text!r}")
        return values

    return parse


def _delay(text: str) -> str:
    try:
        model = DelayModel.parse(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    times = {"exp": (0,), "straggler": (1,), "rotate": (0,), "spikes": (1,)}.get(model.kind, ())
    for i in times:
        if model.params[i] > MAX_DELAY_MS:
            raise argparse.ArgumentTypeError(
                f"--delay {text}: {model.params[i]:g} ms per iteration is more than "
                f"{MAX_DELAY_MS:g} ms, longer than any peer waits (a channel's timeout is at "
                f"most {MAX_PEER_TIMEOUT_S} s)")
    return str(model)


def _arch(what: str):
    from blsgpu.dlrm.model import parse_arch

    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_arch(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


# ------------------------------------------------------------------------------ the parser


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from blsgpu.exchange import MAX_BOUND

    d = DEFAULTS
    g = p.add_argument_group("world")
    g.add_argument("--world-size", type=_int_at_least(1, "--world-size", MAX_LOCAL_WORLD),
                   default=None,
                   help=f"W, local CPU processes (default {d['world_size']}; under torchrun: "
                        "its WORLD_SIZE)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: a local world on gloo; cuda: one GPU per rank, run under torchrun")
    g.add_argument("--seed", type=_int_at_least(0, "--seed", MAX_SEED), default=d["seed"],
                   help="seed of the weights, the batches and the delays")
    g.add_argument("--timeout-s", type=_int_at_least(1, "--timeout-s", int(MAX_TIMEOUT_S)),
                   default=900,
                   help="give up on a local world that has not finished after this long "
                        "(under torchrun: the process group's timeout); a peer silent for "
                        "min(this, 300) s fails its exchange or barrier, naming it")
    if p.prog.endswith("bench"):
        g.add_argument("--bounds", type=_int_list("--bounds", 0, MAX_BOUND), default=d["bounds"],
                       help=f"one BLS run per bound B (default {d['bounds']})")
    else:
        g.add_argument("--bound", type=_int_at_least(0, "--bound", MAX_BOUND), default=d["bound"],
                       help=f"the BLS bound B (default {d['bound']})")
    g = p.add_argument_group("work")
    g.add_argument("--iterations", type=_int_at_least(1, "--iterations", MAX_ITERATIONS),
                   default=d["iterations"], help="K, timed iterations per run")
    g.add_argument("--warmup", type=_int_at_least(0, "--warmup", MAX_ITERATIONS),
                   default=d["warmup"],
                   help="untimed iterations before each run")
    g.add_argument("--repeats", type=_int_at_least(1, "--repeats", 1000), default=d["repeats"],
                   help="repeat every run; times are medians")
    g.add_argument("--batch", type=_int_at_least(1, "--batch", 2**31), default=d["batch"],
                   help="N, samples per rank per iteration")
    g.add_argument("--delay", type=_delay, default=d["delay"],
                   help=f"injected per-rank, per-iteration delays: {DELAY_FORMS} (default "
                        f"{d['delay']})")
    g = p.add_argument_group("model (the reference DLRM's flags)")
    g.add_argument("--tables", type=_int_at_least(1, "--tables", 2**20), default=None,
                   help=f"T tables of --rows rows (default {d['tables']})")
    g.add_argument("--rows", type=_int_at_least(1, "--rows", MAX_ROWS), default=None,
                   help=f"rows per table with --tables (default {d['rows']})")
    g.add_argument("--arch-embedding-size", type=_arch("--arch-embedding-size"), default=None,
                   metavar="N1-N2-...", help="rows of each table (instead of --tables/--rows)")
    g.add_argument("--arch-sparse-feature-size",
                   type=_int_at_least(1, "--arch-sparse-feature-size", 2**20), default=None,
                   metavar="D",
                   help=f"embedding dim D (default {d['sparse_feature_size']}, or the end of "
                        "--arch-mlp-bot)")
    g.add_argument("--arch-mlp-bot", type=_arch("--arch-mlp-bot"), default=None,
                   metavar="13-...-D", help="bottom MLP widths (default 13-64-D)")
    g.add_argument("--arch-mlp-top", type=_arch("--arch-mlp-top"), default=None,
                   metavar="...-1",
                   help=f"top MLP widths after the interaction (default {d['mlp_top']})")
    g.add_argument("--pooling", type=_nonneg_float("--pooling"), default=d["pooling"],
                   metavar="L", help="mean ids per sample and table (Poisson)")
    g.add_argument("--alpha", type=_nonneg_float("--alpha"), default=d["alpha"],
                   help="Zipf exponent of the ids (0: uniform)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the results as JSON (perf/README.md)")
    g.add_argument("--plot", metavar="PATH", help="write a PNG of throughput and masking vs B")
    g.add_argument("--trace", metavar="DIR",
                   help="write a torch.profiler trace per rank and run (blsgpu.* ranges)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blsgpu",
        description="Bounded-lag synchronous (BLS) alltoallv for distributed DLRM inference.",
        epilog="torchrun --nproc-per-node 8 -m blsgpu bench --device cuda  runs on 8 GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,bench,simulate}")
    sub.required = True
    p = sub.add_parser("run", help="one configuration: sync vs BLS at --bound",
                       description="Run the DLRM inference once synchronously and once with BLS "
                                   "at --bound, on the same batches and delays.")
    _add_model_flags(p)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("bench", help="a sweep of bounds: sync vs BLS at each of --bounds",
                       description="Run the DLRM inference synchronously and with BLS at every "
                                   "bound of --bounds, on the same batches and delays.")
    _add_model_flags(p)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("simulate", help="simulate sync and BLS schedules, up to thousands of ranks",
                       description="Discrete-event simulation of the synchronous and BLS "
                                   "schedules, from a delay model or from a --json record.")
    _add_sim_flags(p)
    p.set_defaults(func=_cmd_simulate)
    return parser


def _add_sim_flags(p: argparse.ArgumentParser) -> None:
    from blsgpu.exchange import MAX_BOUND

    s = SIM_DEFAULTS
    p.add_argument("--from-json", metavar="PATH",
                   help="a `blsgpu bench --json` record: replay its measured per-rank busy times "
                        "and project its delay model, base compute and exchange time")
    p.add_argument("--delay", type=_delay, default=None,
                   help=f"delay model: {DELAY_FORMS} (default {DEFAULTS['delay']}, or the record's)")
    p.add_argument("--world-size", type=_int_list("--world-size", 1, MAX_SIM_WORLD), default=None,
                   help=f"W to project, comma-separated (default {s['world_size']})")
    p.add_argument("--bounds", type=_int_list("--bounds", 0, MAX_BOUND), default=None,
                   help=f"bounds B (default {DEFAULTS['bounds']}, or the record's)")
    p.add_argument("--iterations", type=_int_at_least(1, "--iterations", MAX_ITERATIONS),
                   default=None,
                   help=f"K (default {s['iterations']}, or the record's)")
    p.add_argument("--base-ms", type=_nonneg_float("--base-ms", MAX_TIME_MS), default=None,
                   help=f"each rank's compute per iteration (default {s['base_ms']}, or the "
                        "record's mean busy time without delays)")
    p.add_argument("--comm-ms", type=_nonneg_float("--comm-ms", MAX_TIME_MS), default=None,
                   help=f"time of one exchange (default {s['comm_ms']}, or the record's fitted "
                        "value)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed", MAX_SEED), default=None,
                   help="seed of the delay schedule (default 0, or the record's)")
    p.add_argument("--json", metavar="PATH", help="write the projections as JSON")


# ------------------------------------------------------------------------------ up-front checks


def _check_memory(parser, cfg: BenchConfig, ranks_here: int, launcher: bool) -> None:
    avail = available_memory()
    need, parts = memory_estimate(cfg, ranks_here, launcher)
    if avail is not None and need > avail:
        name, biggest = max(parts.items(), key=lambda kv: kv[1])
        parser.error(
            f"this configuration needs about {gib(need)} of memory on this machine "
            f"({ranks_here} rank(s) of about {gib(sum(parts.values()))}, most of it "
            f"{gib(biggest)} for {name}), more than the {gib(avail)} available")


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
            f"{MAX_PEER_TIMEOUT_S})): its peers would give up on it while it sleeps")
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
                f"world would time out")


# ------------------------------------------------------------------------------ run / bench


def _config(args, parser: argparse.ArgumentParser, world_size: int):
    """BenchConfig from the flags; flag conflicts become argparse errors."""
    d = DEFAULTS
    if args.arch_embedding_size is not None:
        if args.rows is not None:
            parser.error("--rows and --arch-embedding-size both set the table sizes; give one")
        if args.tables is not None and args.tables != len(args.arch_embedding_size):
            parser.error(f"--tables {args.tables} but --arch-embedding-size lists "
                         f"{len(args.arch_embedding_size)} tables")
        sizes = args.arch_embedding_size
        if max(sizes) > MAX_ROWS:
            parser.error(f"--arch-embedding-size: a table of {max(sizes)} rows; at most "
                         f"{MAX_ROWS} rows per table")
    else:
        sizes = (args.rows or d["rows"],) * (args.tables or d["tables"])
    D = args.arch_sparse_feature_size
    bot = args.arch_mlp_bot
    if bot is None:
        bot = (13, *d["mlp_bot_hidden"], D or d["sparse_feature_size"])
    top = args.arch_mlp_top or tuple(int(x) for x in d["mlp_top"].split("-"))
    if D is not None and bot[-1] != D:
        parser.error(f"--arch-mlp-bot {'-'.join(map(str, bot))} ends in {bot[-1]} but "
                     f"--arch-sparse-feature-size is {D}: the bottom MLP's output is one more "
                     f"vector of the dot interaction, so it must be D wide")
    bounds = args.bounds if hasattr(args, "bounds") else (args.bound,)
    try:
        return BenchConfig(
            world_size=world_size, bounds=tuple(bounds), iterations=args.iterations,
            warmup=args.warmup, batch=args.batch, embedding_sizes=tuple(sizes),
            mlp_bot=tuple(bot), mlp_top=tuple(top), delay=args.delay, seed=args.seed,
            alpha=args.alpha, pooling=args.pooling, device=args.device, repeats=args.repeats,
            trace_dir=args.trace, timeout_s=float(min(args.timeout_s, MAX_PEER_TIMEOUT_S)),
        )
    except ValueError as e:
        parser.error(str(e))


def _flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}



def _cmd_run(args, parser) -> int:
    env = commands.torchrun_env()
    if args.device == "cuda" and env is None:
        parser.error("--device cuda runs one rank per GPU under torchrun, e.g. "
                     "`torchrun --nproc-per-node 8 -m blsgpu bench --device cuda`")
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
    _check_out_paths(parser, ("--json", args.json), ("--plot", args.plot), probe=rank == 0)
    _check_out_dir(parser, "--trace", args.trace, keep=env is not None)
    return commands.bench(cfg, _flags(args), env, args.timeout_s, args.json, args.plot,
                          progress=not args.no_progress)


# ------------------------------------------------------------------------------ simulate


def _cmd_simulate(args, parser) -> int:
    s = SIM_DEFAULTS
    record = None
    _check_out_paths(parser, ("--json", args.json))
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
    bounds = args.bounds or (tuple(rc["bounds"]) if record else
                             tuple(int(b) for b in DEFAULTS["bounds"].split(",")))
    K = args.iterations or (rc["iterations"] if record else s["iterations"])
    base_ms = args.base_ms if args.base_ms is not None else (
        record["base_ms"] if record else s["base_ms"])
    comm_s = args.comm_ms / 1e3 if args.comm_ms is not None else (
        record["comm_s"] if record else s["comm_ms"] / 1e3)
    seed = args.seed if args.seed is not None else (rc["seed"] if record else 0)
    worlds = args.world_size or tuple(int(w) for w in s["world_size"].split(","))
    model = DelayModel.parse(delay)
    avail = available_memory()
    need = 12 * 8 * max(worlds) * K  # a projection's [W, K] arrays (delays, work, schedule)
    if avail is not None and need > avail:
        parser.error(f"--world-size {max(worlds)} x --iterations {K} needs about {gib(need)} of "
                     f"memory, more than the {gib(avail)} available")
    if model.kind == "straggler" and int(model.params[0]) >= min(worlds):
        parser.error(f"--delay {delay}: straggler rank {int(model.params[0])} is not < every "
                     f"--world-size ({min(worlds)})")
    return commands.simulate(delay, worlds, bounds, K, base_ms, comm_s, seed, record, args.json)




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


__all__ = ["build_parser", "main"]
