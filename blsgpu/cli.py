"""The `blsgpu` command: `run` one configuration, `bench` a sweep of bounds, `simulate` projections.

`run` and `bench` launch a local world of CPU processes on gloo (default 4), or, under torchrun,
run as one rank per process (``--device cuda``: one GPU each). Every run times a synchronous
baseline (the same sharded model with both exchanges at bound 0 and a blocking driver) and BLS at
each bound on the same batches and delays, checks that every run's predictions equal the
synchronous run's bit for bit, and prints throughput, latency, masking, speedup and the
simulator's prediction side by side. perf/README.md documents the defaults and the --json schema.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from blsgpu._env import MAX_TIMEOUT_S
from blsgpu.bench.delays import ACCEPTED as DELAY_FORMS
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.runner import BenchConfig

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
    from blsgpu.dlrm.model import parse_arch  # noqa: PLC0415

    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_arch(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


# ------------------------------------------------------------------------------ the parser


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from blsgpu.exchange.channel import MAX_BOUND  # noqa: PLC0415

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
    from blsgpu.exchange.channel import MAX_BOUND  # noqa: PLC0415

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

_RANK_BASE_BYTES = 300 << 20  # a rank with torch, gloo and the channels' threads, before data


def _available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def memory_estimate(cfg: BenchConfig, ranks_here: int, launcher: bool) -> tuple[int, dict]:
    """Bytes a run of cfg needs on this machine (ranks_here ranks, plus the launcher of a local
    world), and the per-rank parts by name. An estimate from above of what grows with the flags."""
    sizes = cfg.embedding_sizes
    arch = cfg.arch
    W, T, D, N = cfg.world_size, len(sizes), arch.sparse_feature_size, cfg.batch
    K = cfg.iterations
    L = cfg.pooling + 4 * math.sqrt(cfg.pooling) + 1  # Poisson lengths, with their tail
    B = max(cfg.bounds)
    runs = len(cfg.labels()) * cfg.repeats
    tables = [n * D * 4 for n in sizes]
    ids = N * T * (L + 1) * 8  # one batch's ids and lengths (int64)
    pooled = N * T * D * 4  # its pooled embeddings (float32)

    def mlp(widths):
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True)) * 4

    parts = {
        "the process (torch, gloo, threads)": _RANK_BASE_BYTES,
        "the id generator (8 bytes per row of every table, --rows)": (
            8 * sum(sizes) if cfg.alpha > 0 else 0),
        # A table is built whole on its owner, then copied: twice its share, at least the largest.
        "the embedding tables (--rows x --arch-sparse-feature-size)": 2 * max(
            max(tables), sum(tables) / W),
        "the dense MLPs (--arch-mlp-bot, --arch-mlp-top, --tables)": mlp(arch.bottom) + mlp(
            arch.top),
        "the batches in flight (--batch, --tables, --pooling, --bound)": (B + 3) * 4 * (
            ids + pooled),
        "predictions, timings and delays (--iterations, --warmup, --repeats)": (
            3 * (K + cfg.warmup) * N * 4 + runs * K * 200 + 2 * W * K * 8),
    }
    total = ranks_here * sum(parts.values())
    if launcher:  # the launcher holds every rank's timings
        total += _RANK_BASE_BYTES + W * runs * K * 200
    return int(total), parts


def _check_memory(parser, cfg: BenchConfig, ranks_here: int, launcher: bool) -> None:
    avail = _available_memory()
    need, parts = memory_estimate(cfg, ranks_here, launcher)
    if avail is not None and need > avail:
        name, biggest = max(parts.items(), key=lambda kv: kv[1])
        parser.error(
            f"this configuration needs about {_gib(need)} of memory on this machine "
            f"({ranks_here} rank(s) of about {_gib(sum(parts.values()))}, most of it "
            f"{_gib(biggest)} for {name}), more than the {_gib(avail)} available")


def _check_delays(parser, cfg: BenchConfig, world_deadline_s: float | None) -> None:
    """Refuse delays that would make the peers of a sleeping rank time out, or the world."""
    import numpy as np  # noqa: PLC0415

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


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    return None


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


class _Bar:
    """tqdm over every rank's iterations; polls the shared counters from a thread."""

    def __init__(self, progress, total: int, labels: list[str], enabled: bool):
        self._progress, self._labels = progress, labels
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total, unit="it", desc="starting", dynamic_ncols=True,
                             file=sys.stderr)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self._refresh()

    def _refresh(self) -> None:
        done, run = self._progress.read()
        self._bar.set_description(self._labels[run % len(self._labels)], refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            self._thread.join()
            self._refresh()
            self._bar.close()


class _RankBar:
    """The progress bar of rank 0 under torchrun (one process per rank, no launcher)."""

    def __init__(self, total: int, labels: list[str], enabled: bool):
        from tqdm import tqdm  # noqa: PLC0415

        self._labels = labels
        self._bar = tqdm(total=total, unit="it", file=sys.stderr, disable=not enabled)

    def advance(self, rank: int, run: int) -> None:
        self._bar.set_description(self._labels[run % len(self._labels)], refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _cmd_run(args, parser) -> int:
    from blsgpu.bench import analysis, runner  # noqa: PLC0415

    env = _torchrun_env()
    if args.device == "cuda" and env is None:
        parser.error("--device cuda runs one rank per GPU under torchrun, e.g. "
                     "`torchrun --nproc-per-node 8 -m blsgpu bench --device cuda`")
    if env is not None:
        rank, world, local = env
        if args.world_size is not None and args.world_size != world:
            parser.error(f"--world-size {args.world_size} but torchrun started {world} ranks")
    else:
        rank, world, local = 0, args.world_size or DEFAULTS["world_size"], 0
    cfg = _config(args, parser, world)
    if env is None:
        _check_memory(parser, cfg, world, launcher=True)
    else:
        _check_memory(parser, cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), launcher=False)
    _check_delays(parser, cfg, args.timeout_s if env is None else None)
    # Only rank 0 writes them (every rank its own trace).
    _check_out_paths(parser, ("--json", args.json), ("--plot", args.plot), probe=rank == 0)
    _check_out_dir(parser, "--trace", args.trace, keep=env is not None)
    total = cfg.repeats * len(cfg.labels()) * cfg.iterations
    labels = cfg.labels()
    t0 = time.perf_counter()
    if env is None:
        import blsgpu  # noqa: PLC0415

        progress = runner.Progress(world)
        bar = _Bar(progress, total, labels, not args.no_progress)
        try:
            results = blsgpu.run_world(world, runner.run_rank, cfg, progress,
                                       timeout_s=args.timeout_s)
        finally:
            bar.close()
    else:
        results = _run_torchrun(cfg, rank, world, local, total, labels, not args.no_progress,
                                args.timeout_s)
        if results is None:
            return 0
    doc = analysis.analyse(cfg, results, flags=_flags(args))
    doc["wall_s"] = time.perf_counter() - t0
    print(format_table(doc))
    if args.json:
        _write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    if args.trace:
        print(f"wrote torch.profiler traces to {args.trace}/ (open in chrome://tracing or Perfetto)")
    if args.device == "cuda":
        staged = sorted({t for r in doc["runs"] for t in r["transport"] if t != "nccl"})
        if staged:
            print(f"the channels ran over {', '.join(staged)}, not NCCL: the GPU path was not "
                  f"used (install CuPy with NCCL: pip install 'blsgpu[cuda12]' or "
                  f"'blsgpu[cuda13]')", file=sys.stderr)
            return 1
    return 0 if doc["exact"] else 1


def _run_torchrun(cfg, rank: int, world: int, local: int, total: int, labels, show: bool,
                  timeout_s: float):
    """One rank of a torchrun job: init, run, gather every rank's result once on rank 0.

    Every blocking step is bounded: the process group has the user's timeout, and the start, the
    barriers between runs and the final gather go through the rendezvous store (served by the
    launcher) with the channels' timeout, so a rank that died or fell silent there is named on
    every rank that waits for it (PeerError), as a silent peer of an exchange is.
    """
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from blsgpu import world as _world  # noqa: PLC0415
    from blsgpu.bench import runner  # noqa: PLC0415

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("blsgpu: --device cuda but no CUDA device is visible")
        # Launchers that give each process only its own GPU make LOCAL_RANK exceed the count.
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    backend = "cpu:gloo,cuda:nccl" if cfg.device == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # The rendezvous init_process_group would do, kept in hand for the control collectives.
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    _world.set_control_store(store, rank, world)
    _world.barrier("start", cfg.timeout_s)  # names a rank that never came
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world, timeout=timeout)
    try:
        bar = _RankBar(total, labels, show and rank == 0)
        try:
            result = runner.run_rank(rank, world, cfg, bar if rank == 0 else None)
        finally:
            bar.close()
        gathered = _world.gather_object("results", result, cfg.timeout_s, dst=0)
    finally:
        dist.destroy_process_group()
        _world.set_control_store(None)
    return gathered if rank == 0 else None


def _finite(x):
    """The document with NaN / inf floats as null, so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_json(path: str, doc: dict) -> None:
    text = json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False)
    Path(path).write_text(text + "\n")


def _json_default(x):
    import numpy as np  # noqa: PLC0415

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _f(x, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def format_table(doc: dict) -> str:
    """The final table of a run/bench: one line per run, then T_none / T_ideal and exactness."""
    c = doc["config"]
    m = doc["machine"]
    W, N, K = c["world_size"], c["batch"], c["iterations"]
    arch = c["arch"]
    lines = [
        f"blsgpu {c.get('command', 'bench')}: W={W} N={N} K={K} T={len(arch['embedding_sizes'])} "
        f"D={arch['bottom'][-1]} delay={c['delay']} seed={c['seed']} "
        f"({m['device']}, {m['backend']}, {m['cores']} cores)",
    ]
    head = (f"{'run':<5} {'B':>3} {'it/s':>8} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'masking':>7} {'sim mask':>8} {'speedup':>7} {'sim it/s':>8} {'sim err':>7} "
            f"{'lag':>4} exact")
    lines += [head, "-" * len(head)]
    for r in doc["runs"]:
        lines.append(
            f"{r['mode']:<5} {_f(r['bound'], 'd'):>3} {_f(r['throughput_it_s'], '.1f'):>8} "
            f"{_f(r['samples_per_s'], ',.0f'):>10} {_f(r['p50_ms'], '.2f'):>7} "
            f"{_f(r['p99_ms'], '.2f'):>7} {_f(r['masking'], '.3f'):>7} "
            f"{_f(r.get('predicted_masking'), '.3f'):>8} "
            f"{_f(r['speedup'], '.2f') + 'x':>7} {_f(r['simulated_throughput_it_s'], '.1f'):>8} "
            f"{_f(100 * r['sim_error'], '+.0f') + '%':>7} {_f(r['max_lag'], 'd'):>4} "
            f"{'yes' if r['exact'] else 'NO'}")
    if W > m["cores"]:
        lines.append(
            f"OVERSUBSCRIBED: {W} ranks on {m['cores']} cores: a sleeping rank frees a core for the "
            "others, so measured masking can exceed 1; read the simulator's masking (sim mask)")
    none = doc["none_run"]
    lines.append(
        f"T_none {doc['t_none_s']:.3f} s"
        + (f" ({none['throughput_it_s']:.1f} it/s without delays)" if none else "")
        + f", T_ideal {doc['t_ideal_s']:.3f} s ({K / doc['t_ideal_s']:.1f} it/s); "
        f"compute {doc['base_ms']:.2f} ms/it, exchange fit {1e3 * doc['comm_s']:.3f} ms/it")
    lines.append(
        "exact: yes, predictions of sync and every bound identical bit for bit" if doc["exact"]
        else "exact: NO, some run's predictions differ from the synchronous run's")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """PNG: throughput (measured, simulated, sync, ideal) and masking against the bound."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    c = doc["config"]
    K = c["iterations"]
    bls = [r for r in doc["runs"] if r["mode"] == "bls"]
    sync = next(r for r in doc["runs"] if r["mode"] == "sync")
    xs = list(range(len(bls)))
    labels = [str(r["bound"]) for r in bls]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["throughput_it_s"] for r in bls], "o-", label="BLS measured")
    ax1.plot(xs, [r["simulated_throughput_it_s"] for r in bls], "x--",
             label="BLS simulated (replay of busy times)")
    ax1.plot(xs, [r["predicted_throughput_it_s"] for r in bls], "+:",
             label="BLS predicted (delay model)")
    ax1.axhline(sync["throughput_it_s"], color="C3", label="synchronous")
    ax1.axhline(K / doc["t_ideal_s"], color="C2", ls=":", label="ideal (T_ideal)")
    ax1.set_xticks(xs, labels)
    ax1.set_xlabel("bound B")
    ax1.set_ylabel("iterations / s")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput")
    ax2.plot(xs, [r["masking"] if r["masking"] is not None else math.nan for r in bls], "o-",
             label="measured")
    ax2.plot(xs, [r["predicted_masking"] if r["predicted_masking"] is not None else math.nan
                  for r in bls], "+:", color="C2", label="predicted (delay model)")
    ax2.axhline(1.0, color="grey", ls=":")
    ax2.set_xticks(xs, labels)
    ax2.set_xlabel("bound B")
    ax2.set_ylabel("delay masking")
    ax2.set_title("masking = (T_sync - T_bls) / (T_sync - T_ideal)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"blsgpu DLRM inference: W={c['world_size']} N={c['batch']} K={K} "
                 f"delay={c['delay']} ({doc['machine']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ simulate


def _cmd_simulate(args, parser) -> int:
    from blsgpu.bench import sim  # noqa: PLC0415

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
            sim.load_work(record, mode="sync")  # checks the record has what a replay needs
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
    avail = _available_memory()
    need = 12 * 8 * max(worlds) * K  # a projection's [W, K] arrays (delays, work, schedule)
    if avail is not None and need > avail:
        parser.error(f"--world-size {max(worlds)} x --iterations {K} needs about {_gib(need)} of "
                     f"memory, more than the {_gib(avail)} available")
    if model.kind == "straggler" and int(model.params[0]) >= min(worlds):
        parser.error(f"--delay {delay}: straggler rank {int(model.params[0])} is not < every "
                     f"--world-size ({min(worlds)})")
    out: dict = {"delay": delay, "iterations": K, "base_ms": base_ms, "comm_s": comm_s,
                 "seed": seed, "bounds": list(bounds), "replay": None, "projections": []}
    if record:
        # Replay: each recorded run's own per-rank busy times (compute + delay) through the
        # schedule of its mode, beside what was measured.
        rows = []
        t_sync = None
        for r in [x for x in record["runs"] if x.get("per_rank_iter_s")]:
            work = sim.load_work(r)
            if r["mode"] == "sync":
                t = sim.simulate_sync(work, comm_s).total_s
                t_sync = t
            else:
                t = sim.simulate_bls(work, r["bound"], comm_s).total_s
            rows.append({"mode": r["mode"], "bound": r["bound"],
                         "simulated_throughput_it_s": work.shape[1] / t,
                         "measured_throughput_it_s": r["throughput_it_s"],
                         "error": r["throughput_it_s"] and work.shape[1] / t /
                         r["throughput_it_s"] - 1.0,
                         "simulated_speedup": t_sync / t if t_sync else None})
        out["replay"] = {"world_size": work.shape[0], "iterations": work.shape[1], "rows": rows}
    t0 = time.perf_counter()
    for W in worlds:
        for b in bounds:
            p = sim.project(model, W, K, b, base_ms, seed=seed, comm_s=comm_s)
            out["projections"].append({
                "world_size": W, "bound": b, "sync_throughput_it_s": p.sync_throughput_it_s,
                "bls_throughput_it_s": p.bls_throughput_it_s, "speedup": p.speedup,
                "masking": None if math.isnan(p.masking) else p.masking,
                "t_sync_s": p.t_sync_s, "t_bls_s": p.t_bls_s, "t_ideal_s": p.t_ideal_s})
    out["elapsed_s"] = time.perf_counter() - t0
    print(format_simulation(out))
    if args.json:
        _write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def format_simulation(out: dict) -> str:
    lines = []
    if out["replay"]:
        r = out["replay"]
        lines.append(f"replay of the record's per-rank busy times: W={r['world_size']} "
                     f"K={r['iterations']} exchange {1e3 * out['comm_s']:.3f} ms")
        head = f"{'run':<5} {'B':>5} {'sim it/s':>9} {'measured':>9} {'error':>6} {'speedup':>8}"
        lines += [head, "-" * len(head)]
        for x in r["rows"]:
            lines.append(f"{x['mode']:<5} {_f(x['bound'], 'd'):>5} "
                         f"{x['simulated_throughput_it_s']:>9.1f} "
                         f"{_f(x['measured_throughput_it_s'], '.1f'):>9} "
                         f"{_f(100 * x['error'], '+.0f') + '%':>6} "
                         f"{_f(x['simulated_speedup'], '.2f') + 'x':>8}")
        lines.append("")
    lines.append(f"projection: delay={out['delay']} K={out['iterations']} compute "
                 f"{out['base_ms']:.3f} ms/it, exchange {1e3 * out['comm_s']:.3f} ms, "
                 f"seed={out['seed']}")
    head = (f"{'W':>6} {'B':>5} {'sync it/s':>10} {'bls it/s':>10} {'speedup':>8} "
            f"{'masking':>8}")
    lines += [head, "-" * len(head)]
    for p in out["projections"]:
        lines.append(f"{p['world_size']:>6} {p['bound']:>5} {p['sync_throughput_it_s']:>10.1f} "
                     f"{p['bls_throughput_it_s']:>10.1f} {p['speedup']:>7.2f}x "
                     f"{_f(p['masking'], '.3f'):>8}")
    lines.append(f"({len(out['projections'])} projections in {out['elapsed_s']:.2f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


__all__ = ["build_parser", "format_simulation", "format_table", "main", "plot"]
