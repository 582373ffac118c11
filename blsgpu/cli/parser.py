"""The `blsgpu` command's flags and defaults (argparse)."""

from __future__ import annotations

import argparse

from blsgpu._env import MAX_TIMEOUT_S
from blsgpu.bench.delays import ACCEPTED as DELAY_FORMS
from blsgpu.bench.runner import BenchConfig
from blsgpu.cli.types import (
    MAX_ITERATIONS,
    MAX_LOCAL_WORLD,
    MAX_ROWS,
    MAX_SEED,
    MAX_TIME_MS,
    arch_spec,
    delay_spec,
    int_at_least,
    int_list,
    nonneg_float,
)

# Defaults of `blsgpu bench` with no arguments (BenchConfig's): small tables and MLPs, so that on a
# 2-core machine the injected delays dominate an iteration, and the whole sweep takes < 3 min.
_B = BenchConfig()
DEFAULTS = dict(
    world_size=_B.world_size,
    bounds=",".join(map(str, _B.bounds)),
    bound=4,
    iterations=_B.iterations,
    warmup=_B.warmup,
    batch=_B.batch,
    tables=len(_B.embedding_sizes),
    rows=_B.embedding_sizes[0],
    sparse_feature_size=_B.mlp_bot[-1],
    mlp_bot_hidden=_B.mlp_bot[1:-1],
    mlp_top="-".join(map(str, _B.mlp_top)),
    pooling=_B.pooling,
    alpha=_B.alpha,
    delay=_B.delay,
    seed=_B.seed,
    repeats=_B.repeats,
)
SIM_DEFAULTS = dict(world_size="4,64,1024,4096", iterations=100, base_ms=10.0, comm_ms=0.1)
MAX_SIM_WORLD = 1 << 16


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from blsgpu.exchange import MAX_BOUND

    d = DEFAULTS
    g = p.add_argument_group("world")
    g.add_argument(
        "--world-size",
        type=int_at_least(1, "--world-size", MAX_LOCAL_WORLD),
        default=None,
        help=f"W, local CPU processes (default {d['world_size']}; under torchrun: its WORLD_SIZE)",
    )
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: a local world on gloo; cuda: one GPU per rank, run under torchrun",
    )
    g.add_argument(
        "--seed",
        type=int_at_least(0, "--seed", MAX_SEED),
        default=d["seed"],
        help="seed of the weights, the batches and the delays",
    )
    g.add_argument(
        "--timeout-s",
        type=int_at_least(1, "--timeout-s", int(MAX_TIMEOUT_S)),
        default=900,
        help="give up on a local world that has not finished after this long "
        "(under torchrun: the process group's timeout); a peer silent for "
        "min(this, 300) s fails its exchange or barrier, naming it",
    )
    if p.prog.endswith("bench"):
        g.add_argument(
            "--bounds",
            type=int_list("--bounds", 0, MAX_BOUND),
            default=d["bounds"],
            help=f"one BLS run per bound B (default {d['bounds']})",
        )
    else:
        g.add_argument(
            "--bound",
            type=int_at_least(0, "--bound", MAX_BOUND),
            default=d["bound"],
            help=f"the BLS bound B (default {d['bound']})",
        )
    g = p.add_argument_group("work")
    g.add_argument(
        "--iterations",
        type=int_at_least(1, "--iterations", MAX_ITERATIONS),
        default=d["iterations"],
        help="K, timed iterations per run",
    )
    g.add_argument(
        "--warmup",
        type=int_at_least(0, "--warmup", MAX_ITERATIONS),
        default=d["warmup"],
        help="untimed iterations before each run",
    )
    g.add_argument(
        "--repeats",
        type=int_at_least(1, "--repeats", 1000),
        default=d["repeats"],
        help="repeat every run; times are medians",
    )
    g.add_argument(
        "--batch",
        type=int_at_least(1, "--batch", 2**31),
        default=d["batch"],
        help="N, samples per rank per iteration",
    )
    g.add_argument(
        "--delay",
        type=delay_spec,
        default=d["delay"],
        help=f"injected per-rank, per-iteration delays: {DELAY_FORMS} (default {d['delay']})",
    )
    g = p.add_argument_group("model (the reference DLRM's flags)")
    g.add_argument(
        "--tables",
        type=int_at_least(1, "--tables", 2**20),
        default=None,
        help=f"T tables of --rows rows (default {d['tables']})",
    )
    g.add_argument(
        "--rows",
        type=int_at_least(1, "--rows", MAX_ROWS),
        default=None,
        help=f"rows per table with --tables (default {d['rows']})",
    )
    g.add_argument(
        "--arch-embedding-size",
        type=arch_spec("--arch-embedding-size"),
        default=None,
        metavar="N1-N2-...",
        help="rows of each table (instead of --tables/--rows)",
    )
    g.add_argument(
        "--arch-sparse-feature-size",
        type=int_at_least(1, "--arch-sparse-feature-size", 2**20),
        default=None,
        metavar="D",
        help=f"embedding dim D (default {d['sparse_feature_size']}, or the end of --arch-mlp-bot)",
    )
    g.add_argument(
        "--arch-mlp-bot",
        type=arch_spec("--arch-mlp-bot"),
        default=None,
        metavar="13-...-D",
        help="bottom MLP widths (default 13-64-D)",
    )
    g.add_argument(
        "--arch-mlp-top",
        type=arch_spec("--arch-mlp-top"),
        default=None,
        metavar="...-1",
        help=f"top MLP widths after the interaction (default {d['mlp_top']})",
    )
    g.add_argument(
        "--pooling",
        type=nonneg_float("--pooling"),
        default=d["pooling"],
        metavar="L",
        help="mean ids per sample and table (Poisson)",
    )
    g.add_argument(
        "--alpha",
        type=nonneg_float("--alpha"),
        default=d["alpha"],
        help="Zipf exponent of the ids (0: uniform)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the results as JSON (perf/README.md)")
    g.add_argument("--plot", metavar="PATH", help="write a PNG of throughput and masking vs B")
    g.add_argument(
        "--trace", metavar="DIR", help="write a torch.profiler trace per rank and run (blsgpu.* ranges)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blsgpu",
        description="Bounded-lag synchronous (BLS) alltoallv for distributed DLRM inference.",
        epilog="torchrun --nproc-per-node 8 -m blsgpu bench --device cuda  runs on 8 GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,bench,simulate}")
    sub.required = True
    p = sub.add_parser(
        "run",
        help="one configuration: sync vs BLS at --bound",
        description="Run the DLRM inference once synchronously and once with BLS "
        "at --bound, on the same batches and delays.",
    )
    _add_model_flags(p)
    p.set_defaults(command="run")
    p = sub.add_parser(
        "bench",
        help="a sweep of bounds: sync vs BLS at each of --bounds",
        description="Run the DLRM inference synchronously and with BLS at every "
        "bound of --bounds, on the same batches and delays.",
    )
    _add_model_flags(p)
    p.set_defaults(command="run")
    p = sub.add_parser(
        "simulate",
        help="simulate sync and BLS schedules, up to thousands of ranks",
        description="Discrete-event simulation of the synchronous and BLS "
        "schedules, from a delay model or from a --json record.",
    )
    _add_sim_flags(p)
    p.set_defaults(command="simulate")
    return parser


def _add_sim_flags(p: argparse.ArgumentParser) -> None:
    from blsgpu.exchange import MAX_BOUND

    s = SIM_DEFAULTS
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="a `blsgpu bench --json` record: replay its measured per-rank busy times "
        "and project its delay model, base compute and exchange time",
    )
    p.add_argument(
        "--delay",
        type=delay_spec,
        default=None,
        help=f"delay model: {DELAY_FORMS} (default {DEFAULTS['delay']}, or the record's)",
    )
    p.add_argument(
        "--world-size",
        type=int_list("--world-size", 1, MAX_SIM_WORLD),
        default=None,
        help=f"W to project, comma-separated (default {s['world_size']})",
    )
    p.add_argument(
        "--bounds",
        type=int_list("--bounds", 0, MAX_BOUND),
        default=None,
        help=f"bounds B (default {DEFAULTS['bounds']}, or the record's)",
    )
    p.add_argument(
        "--iterations",
        type=int_at_least(1, "--iterations", MAX_ITERATIONS),
        default=None,
        help=f"K (default {s['iterations']}, or the record's)",
    )
    p.add_argument(
        "--base-ms",
        type=nonneg_float("--base-ms", MAX_TIME_MS),
        default=None,
        help=f"each rank's compute per iteration (default {s['base_ms']}, or the "
        "record's mean busy time without delays)",
    )
    p.add_argument(
        "--comm-ms",
        type=nonneg_float("--comm-ms", MAX_TIME_MS),
        default=None,
        help=f"time of one exchange (default {s['comm_ms']}, or the record's fitted value)",
    )
    p.add_argument(
        "--seed",
        type=int_at_least(0, "--seed", MAX_SEED),
        default=None,
        help="seed of the delay schedule (default 0, or the record's)",
    )
    p.add_argument("--json", metavar="PATH", help="write the projections as JSON")
