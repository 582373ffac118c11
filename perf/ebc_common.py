"""What perf/bench_ebc.py and perf/bench_torchrec.py share: the sharded-EBC workload, TorchRec's DMP
built on it, the timed loops, the rounds, their analysis, the records and the plot.

The workload: T tables of --rows rows and dim D, table-wise (table t on rank t % W, the same
placement and the same seeded weights for every provider), one feature per table, N samples per
rank per batch, bag sizes uniform in [0, 2L], ids uniform. Per batch every provider runs the same
consumer: a float64 sum of the pooled [N, T*D] output (kept as a checksum), then the rank's
injected delay for that batch from one seeded schedule (blsgpu.bench.delays, [W, iters]). The
sleep stands for the dense part of the model and its jitter.

Rounds: one round runs every provider once under every delay model (--warmup untimed batches, a
barrier, the timed loop of --iters batches, a barrier), providers in an order rotated from round to
round; --repeats rounds in one world per W (providers are built once). The time of a run is the
slowest rank's timed loop; ratio = T(reference) / T(provider) of the same delay model in the same
round, median over rounds; ceiling = T(reference) / (T(provider, none) + max over ranks of the
rank's summed delays): the ratio if every delay but the slowest rank's own were hidden; cpu ms =
CPU time of all ranks' processes (every thread) per batch, median over rounds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import blsgpu
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.record import Record, provenance, write_report

# The figures of a row that go into its record, and their units; "ratio" and "ceiling" are its
# ratios to the reference provider.
UNITS = {
    "time_s": "s",
    "ms_per_batch": "ms",
    "samples_per_s": "samples/s",
    "cpu_ms_per_batch": "ms",
    "wire_bytes": "B",
    "split_bytes": "B",
    "table_bytes": "B",
    "max_lag": "iterations",
    "wait_ms_per_batch": "ms",
    "max_abs_diff": "abs",
}
WORKLOAD = ("tables", "rows", "dim", "batch", "pooling", "iters", "warmup", "repeats", "bound", "seed")

# ------------------------------------------------------------------------------ workload


def configs(cfg: dict) -> list:
    return [
        blsgpu.EmbeddingBagConfig(f"t{i}", cfg["rows"], cfg["dim"], [f"f{i}"]) for i in range(cfg["tables"])
    ]


def batches(rank: int, cfg: dict, count: int) -> list:
    """Rank r's batches: N bags per feature, sizes uniform in [0, 2L], ids uniform, seeded."""
    T, N, L, R = cfg["tables"], cfg["batch"], cfg["pooling"], cfg["rows"]
    keys = [f"f{i}" for i in range(T)]
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + rank * 10_007 + k)
        lengths = torch.randint(0, 2 * L + 1, (T * N,), generator=g)
        values = torch.randint(0, R, (int(lengths.sum()),), generator=g)
        out.append(blsgpu.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths))
    return out


def plan(cfg: dict, world: int) -> dict:
    return {f"t{i}": {"table_wise": i % world} for i in range(cfg["tables"])}


# ------------------------------------------------------------------------------ TorchRec


class _Model(torch.nn.Module):
    """What TorchRec's pipelines drive: model(batch) -> (loss, output)."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, batch):
        return batch.dense_features, self.ebc(batch.sparse_features)


def torchrec_dmp(cfg: dict, world: int, pipeline: bool, group=None):
    """DistributedModelParallel over TorchRec's EBC with our placement and seeded weights, on
    `group` (default: the default group); wrapped as its pipelines want it if `pipeline`.
    Returns (dmp, bytes of this rank's table shards)."""
    import torchrec
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from blsgpu.embedding._collection import init_weight

    ours = configs(cfg)
    tables = [t.to_torchrec() for t in ours]
    meta = torchrec.EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder()
    per_param = {name: table_wise(rank=e["table_wise"]) for name, e in plan(cfg, world).items()}
    module_plan = construct_module_sharding_plan(
        meta,
        per_param_sharding=per_param,
        local_size=world,
        world_size=world,
        device_type="cpu",
        sharder=sharder,
    )
    env = {} if group is None else {"env": ShardingEnv.from_process_group(group)}
    dmp = DistributedModelParallel(
        _Model(meta) if pipeline else meta,
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc" if pipeline else "": module_plan}),
        sharders=[sharder],
        **env,
    )
    with torch.no_grad():
        for key, st in dmp.state_dict().items():
            t = int(key.split("embedding_bags.")[1].split(".")[0][1:])
            w = None
            for sh in st.local_shards():
                if w is None:
                    w = init_weight(ours[t], t, cfg["seed"], torch.float32)
                (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                sh.tensor.copy_(w[r0 : r0 + nr, c0 : c0 + nc])
    dmp.eval()
    nbytes = sum(
        sh.tensor.numel() * sh.tensor.element_size()
        for st in dmp.state_dict().values()
        for sh in st.local_shards()
    )
    return dmp, nbytes


def tr_batches(kjts: list, pipeline: bool) -> list:
    """The batches as TorchRec takes them: its KJTs, wrapped in Batch for its pipelines."""
    out = [b.to_torchrec() for b in kjts]
    if not pipeline:
        return out
    from torchrec.datasets.utils import Batch

    return [Batch(dense_features=torch.zeros(1), sparse_features=kjt, labels=torch.zeros(1)) for kjt in out]


def _table_order(kt) -> torch.Tensor:
    """TorchRec orders output keys by owner rank; blsgpu's order is the tables'."""
    d = kt.to_dict()
    return torch.cat([d[k] for k in sorted(d, key=lambda k: int(k[1:]))], dim=1)


# ------------------------------------------------------------------------------ timed loops
# Each returns (seconds, per-batch checksums, first output in table order).


def _consume(values: torch.Tensor, delay: float, checks: list) -> None:
    checks.append(float(values.sum(dtype=torch.float64)))
    if delay > 0:
        time.sleep(delay)


def loop_dmp(dmp, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    with torch.no_grad():
        for b, d in zip(batches, delays, strict=True):
            kt = dmp(b)
            kt = kt.wait() if hasattr(kt, "wait") else kt
            first = _table_order(kt) if first is None else first
            _consume(kt.values(), d, checks)
    return time.perf_counter() - t0, checks, first


def loop_tr_pipeline(pipe, batches, delays):
    checks, first = [], None
    it = iter(batches)
    t0 = time.perf_counter()
    with torch.no_grad():
        for d in delays:
            kt = pipe.progress(it)
            kt = kt.wait() if hasattr(kt, "wait") else kt
            first = _table_order(kt) if first is None else first
            _consume(kt.values(), d, checks)
    seconds = time.perf_counter() - t0
    pipe.reset()
    return seconds, checks, first


def loop_bls_forward(sebc, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    for b, d in zip(batches, delays, strict=True):
        v = sebc(b).values()
        first = v if first is None else first
        _consume(v, d, checks)
    return time.perf_counter() - t0, checks, first


def loop_bls_pipeline(sebc, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    for kt, d in zip(sebc.pipeline(batches), delays, strict=True):
        v = kt.values()
        first = v if first is None else first
        _consume(v, d, checks)
    return time.perf_counter() - t0, checks, first


# ------------------------------------------------------------------------------ rounds


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (main, BLS progress threads, gloo's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_rounds(
    rank: int, cfg: dict, schedules: dict, runners: dict, names: list[str], channel=None
) -> tuple[list, dict]:
    """Every round on this rank: runners[name] = (loop(batches, delays), timed, warm-up batches).

    channel(name): the stats of the channel that provider's alltoalls go through ({} if none), read
    around the timed loop for its max_lag and waiting time. Returns (rounds, first outputs).
    """
    zeros_w = [0.0] * cfg["warmup"]
    rounds, firsts = [], {}
    for i in range(cfg["repeats"]):
        order = names[i % len(names) :] + names[: i % len(names)]
        runs = {}
        for spec, schedule in schedules.items():
            delays = schedule[rank].tolist()
            for name in order:
                fn, timed, warmup = runners[name]
                fn(warmup, zeros_w)  # this provider's tables back in cache
                gc.collect()  # a full collection pauses a rank for 100-300 ms: never inside a timed run
                dist.barrier()
                before = channel(name) if channel else {}
                c0 = _cpu_s()
                seconds, checks, first = fn(timed, delays)
                cpu = _cpu_s() - c0
                after = channel(name) if channel else {}
                dist.barrier()
                run = {"loop_s": seconds, "cpu_s": cpu, "checks": checks}
                if after:
                    run["max_lag"] = after.get("max_lag")
                    if after.get("waiting_for_data_s") is not None:
                        run["wait_s"] = after["waiting_for_data_s"] - before.get("waiting_for_data_s", 0.0)
                runs[f"{spec}|{name}"] = run
                if spec == "none" and i == 0:
                    firsts[name] = first
        rounds.append(runs)
    return rounds, firsts


def median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def analyse(cfg: dict, world: int, ranks: list[dict], schedules: dict, ref_name: str, check) -> list[dict]:
    """One row per (delay, provider): medians over rounds of time, ratio and ceiling against
    ref_name, CPU per batch, lag and waiting time where a channel reported them.
    check(name, mine, ref): whether a rank's per-batch checksums match the reference's."""
    K = cfg["iters"]
    n_rounds = len(ranks[0]["rounds"])
    names = list(dict.fromkeys(k.split("|", 1)[1] for k in ranks[0]["rounds"][0]))
    ref_name = ref_name if ref_name in names else names[0]
    rows = []
    for spec in cfg["delays"]:
        own = float(schedules[spec].sum(axis=1).max())
        for name in names:
            key, ref_key = f"{spec}|{name}", f"{spec}|{ref_name}"
            times, ratios, ceilings, cpus, lags, waits, ok = [], [], [], [], [], [], True
            for i in range(n_rounds):
                runs = [r["rounds"][i] for r in ranks]
                t = max(x[key]["loop_s"] for x in runs)
                t_ref = max(x[ref_key]["loop_s"] for x in runs)
                times.append(t)
                ratios.append(t_ref / t)
                ceilings.append(t_ref / (max(x[f"none|{name}"]["loop_s"] for x in runs) + own))
                cpus.append(sum(x[key]["cpu_s"] for x in runs) / K)
                lags += [x[key]["max_lag"] for x in runs if x[key].get("max_lag") is not None]
                waits += [x[key]["wait_s"] / K for x in runs if "wait_s" in x[key]]
                ok &= all(check(name, x[key]["checks"], x[ref_key]["checks"]) for x in runs)
            t_med = median(times)
            rows.append(
                {
                    "world_size": world,
                    "delay": spec,
                    "provider": name,
                    "time_s": t_med,
                    "time_s_all": times,
                    "ms_per_batch": 1e3 * t_med / K,
                    "samples_per_s": world * cfg["batch"] * K / t_med,
                    "ratio": median(ratios),
                    "ratio_all": ratios,
                    "ceiling": median(ceilings),
                    "cpu_ms_per_batch": 1e3 * median(cpus),
                    "max_lag": max(lags) if lags else None,
                    "wait_ms_per_batch": 1e3 * median(waits) if waits else None,
                    "checked": ok,
                    "max_abs_diff": max(r["max_abs_diff"].get(name, math.nan) for r in ranks),
                }
            )
    return rows


# ------------------------------------------------------------------------------ output


def records(benchmark: str, cfg: dict, rows: list[dict], prov, baseline: str) -> list[Record]:
    common = {k: cfg[k] for k in WORKLOAD}
    return [
        Record.from_row(
            benchmark,
            r["provider"],
            {**common, "world_size": r["world_size"], "delay": r["delay"]},
            r,
            UNITS,
            prov,
            ("ratio", "ceiling"),
            baseline,
            {"time_s": {"min": min(r["time_s_all"]), "median": r["time_s"], "max": max(r["time_s_all"])}},
        )
        for r in rows
    ]


def sources() -> dict:
    """sha256 (first 12 hex) of each subpackage the numbers depend on: with uncommitted work the
    commit alone does not say which engine ran."""
    root = Path(blsgpu.__file__).resolve().parent
    out = {}
    for pkg in ("counters", "transport", "exchange", "lookup", "embedding"):
        h = hashlib.sha256()
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.read_bytes())
        out[pkg] = h.hexdigest()[:12]
    return out


def report(
    out,
    name: str,
    backend: str,
    cfg: dict,
    rows: list[dict],
    summary: dict,
    sources_at_start: dict,
    ref: str,
    plot,
) -> None:
    """Writes the run's JSON (summary, config, provenance, records, rows) and its plot (`plot(path)`,
    None: no plot); says so when the blsgpu sources changed while it ran."""
    prov = provenance(backend=backend, threads_per_rank=1)
    if sources() != sources_at_start:
        print("warning: blsgpu sources changed during the run", file=sys.stderr)
        summary["sources_changed"] = True
    doc = {**summary, "config": cfg, "machine": prov.machine, "commit": prov.commit}
    write_report(
        out, name, {**doc, "sources": sources_at_start}, records(name, cfg, rows, prov, ref), rows, plot
    )


def plot_bars(rows: list[dict], path: Path, key: str, ylabel: str, title: str, hlines=()) -> None:
    """One panel per W: rows[key] per delay model, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world_size"] for r in rows})
    specs = list(dict.fromkeys(r["delay"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["world_size"], r["delay"], r["provider"]): r[key] for r in rows}
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.4), squeeze=False)
    width = 0.8 / len(providers)
    for ax, w in zip(axes[0], worlds, strict=True):
        for j, name in enumerate(providers):
            ys = [by.get((w, s, name), math.nan) for s in specs]
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(specs))]
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        for y, ls in hlines:
            ax.axhline(y, color="gray", ls=ls, lw=0.8)
        ax.set_xticks(range(len(specs)), specs, fontsize=8)
        ax.set(title=f"W={w}", ylabel=ylabel, xlabel="injected delay")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(providers), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def workload_title(cfg: dict) -> str:
    return (
        f"{cfg['tables']} tables x {cfg['rows']} rows, D={cfg['dim']}, N={cfg['batch']}/rank, "
        f"L~U[0,{2 * cfg['pooling']}], B={cfg['bound']}, median of {cfg['repeats']}"
    )


# ------------------------------------------------------------------------------ command line


def parser(
    doc: str, providers: tuple[str, ...], repeats: int, delays: str, bound_help: str, timeout_s: float
) -> argparse.ArgumentParser:
    """The flags both scripts take (the workload, the rounds, the outputs)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512, help="N, samples per rank per batch")
    ap.add_argument("--pooling", type=int, default=20, help="L: bag sizes uniform in [0, 2L]")
    ap.add_argument("--iters", type=int, default=40, help="timed batches per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches before each run")
    ap.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="rounds; each runs every provider under every delay model",
    )
    ap.add_argument("--bound", type=int, default=4, help=bound_help)
    ap.add_argument(
        "--delays", default=delays, help="comma-separated blsgpu.bench.delays specs; 'none' always runs"
    )
    ap.add_argument("--providers", default=",".join(providers))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an earlier run's JSON")
    ap.add_argument("--timeout-s", type=float, default=timeout_s, help="per world size")
    return ap


def check_args(ap: argparse.ArgumentParser, args, providers: tuple[str, ...], spec_for) -> None:
    """Validate and normalise the shared flags in place; spec_for(spec, W) is the delay spec a
    world of W runs (e.g. straggler:last:MS names its last rank)."""
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if not args.world_sizes or any(w < 2 for w in args.world_sizes):
        ap.error("--world-sizes must be >= 2")
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(args.providers) - set(providers))
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(providers)}")
    specs = [s.strip() for s in args.delays.split(",") if s.strip()]
    try:
        for s in specs:
            for w in args.world_sizes:
                DelayModel.parse(spec_for(s, w)).schedule(w, 1)
    except ValueError as e:
        ap.error(str(e))
    if any(s.startswith("skew") for s in specs):
        ap.error("skew delays need a compute time; use another model")
    args.delays = ["none"] + [s for s in dict.fromkeys(specs) if s != "none"]
    for name in ("tables", "rows", "dim", "batch", "pooling", "iters", "warmup", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.bound < 0:
        ap.error("--bound must be >= 0")
