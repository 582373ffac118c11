"""TorchRec's own sharded EmbeddingBagCollection on backend "bls" against the same on gloo, per batch.

What a TorchRec user gets from the one-line opt-in, ``dist.init_process_group("bls")``, with no other
change: TorchRec's DistributedModelParallel(EmbeddingBagCollection) forward and its
EvalPipelineSparseDist, batch by batch, on a "bls" group and on a gloo group of the same ranks, with no
delays and with injected delays. blsgpu's own pipelined sharded collection runs beside them: what a
TorchRec user switches to to get the lag.

W local ranks (blsgpu.run_world, one thread each), default group "bls"; the gloo group is
dist.new_group(backend="gloo") over every rank, so both backends run in the same world, interleaved.
T tables of --rows rows and dim D, table-wise (table t on rank t % W, the same placement and the same
seeded weights for every provider), one feature per table, N samples per rank per batch, bag sizes
uniform in [0, 2L], ids uniform (the workload of perf/bench_ebc.py). Per batch every provider runs the
same consumer: a float64 sum of the pooled [N, T*D] output (kept as a checksum), then the rank's
injected delay for that batch from a seeded schedule (blsgpu.bench.delays, [W, iters], the same for every
provider). The sleep stands for the dense part of the model and its jitter.

Providers:
- gloo-forward: DMP forward on the gloo group (the reference every ratio is against).
- gloo-pipeline: EvalPipelineSparseDist over a DMP on the gloo group.
- bls-forward: DMP forward on the "bls" group (its alltoalls through the backend's BLS channel).
- bls-pipeline: EvalPipelineSparseDist over a DMP on the "bls" group.
- blsgpu-pipeline: blsgpu.ShardedEmbeddingBagCollection.pipeline(batches), bound --bound, on the
  "bls" world (its own channels; up to B+1 batches in flight).

Delays (--delays, blsgpu.bench.delays specs; "none" always runs): "straggler:last:MS" is the last rank
slow by MS in every batch (one slow rank), "exp:MS" i.i.d. exponential per rank and batch.

Figures (as in perf/bench_ebc.py):
- one round runs every provider once under every delay model (--warmup untimed batches, a barrier,
  the timed loop of --iters batches, a barrier); providers in an order rotated from round to round;
  --repeats rounds, one world per W (providers built once).
- time of a run: max over ranks of the timed loop; ms per batch = time / iters. ratio =
  T(gloo-forward) / T(provider) of the same delay model in the same round, median over rounds.
- ceiling: T(gloo-forward) / (T(provider, none) + max over ranks of the rank's summed delays): the
  ratio if every delay but the slowest rank's own were hidden.
- cpu ms: CPU time of all ranks' processes (every thread) per batch, median over rounds.
- lag, wait: for the providers on the "bls" backend's channel, the channel's max_lag (in channel
  iterations: TorchRec posts several alltoalls per batch, each one iteration) and its
  waiting_for_data_s per batch (median over ranks and rounds), as the engine reports them.
- check: every TorchRec provider's per-batch checksums equal gloo-forward's exactly, and its first
  output equals gloo-forward's bit for bit; blsgpu-pipeline's within float tolerance (FBGEMM and
  blsgpu add in their own order).

Usage: python perf/bench_torchrec.py [--world-sizes 2,4 --iters 40 --repeats 8
       --delays none,straggler:last:10,exp:10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import blsgpu
from blsgpu import _provenance
from blsgpu.bench.delays import DelayModel

NAME = "bench_torchrec"
REF = "gloo-forward"
TR_PROVIDERS = ("gloo-forward", "gloo-pipeline", "bls-forward", "bls-pipeline")
ALL_PROVIDERS = (*TR_PROVIDERS, "blsgpu-pipeline")
_RTOL = 1e-5  # blsgpu-pipeline's checksums against FBGEMM's, relative to a batch's scale


# --------------------------------------------------------------------------------------------------
# Workload


def _spec_for(spec: str, world: int) -> str:
    """A delay spec for this world size: straggler:last:MS names the last rank."""
    return spec.replace("straggler:last:", f"straggler:{world - 1}:")


def _configs(cfg: dict):
    return [
        blsgpu.EmbeddingBagConfig(f"t{i}", cfg["rows"], cfg["dim"], [f"f{i}"]) for i in range(cfg["tables"])
    ]


def _kjts(rank: int, cfg: dict, count: int) -> list:
    """Rank r's batches (blsgpu KJTs): N bags per feature, sizes uniform in [0, 2L], ids uniform."""
    T, N, L, R = cfg["tables"], cfg["batch"], cfg["pooling"], cfg["rows"]
    keys = [f"f{i}" for i in range(T)]
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + rank * 10_007 + k)
        lengths = torch.randint(0, 2 * L + 1, (T * N,), generator=g)
        values = torch.randint(0, R, (int(lengths.sum()),), generator=g)
        out.append(blsgpu.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths))
    return out


def _plan(cfg: dict, world: int) -> dict:
    return {f"t{i}": {"table_wise": i % world} for i in range(cfg["tables"])}


class _Model(torch.nn.Module):
    """What TorchRec's pipelines drive: model(batch) -> (loss, output)."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, batch):
        return batch.dense_features, self.ebc(batch.sparse_features)


def _dmp(group, cfg: dict):
    """DMP over TorchRec's EBC on `group`: our placement, blsgpu's seeded weights."""
    import torchrec
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from blsgpu.embedding._collection import init_weight

    world = dist.get_world_size(group)
    ours = _configs(cfg)
    configs = [
        torchrec.EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
        )
        for t in ours
    ]
    meta = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder()
    per_param = {name: table_wise(rank=e["table_wise"]) for name, e in _plan(cfg, world).items()}
    module_plan = construct_module_sharding_plan(
        meta,
        per_param_sharding=per_param,
        local_size=world,
        world_size=world,
        device_type="cpu",
        sharder=sharder,
    )
    dmp = DistributedModelParallel(
        _Model(meta),
        env=ShardingEnv.from_process_group(group),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=[sharder],
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
    return dmp


def _tr_batches(kjts: list) -> list:
    from torchrec.datasets.utils import Batch

    return [
        Batch(dense_features=torch.zeros(1), sparse_features=k.to_torchrec(), labels=torch.zeros(1))
        for k in kjts
    ]


def _table_order(kt) -> torch.Tensor:
    """TorchRec orders output keys by owner rank; blsgpu's order is the tables'."""
    d = kt.to_dict()
    return torch.cat([d[k] for k in sorted(d, key=lambda k: int(k[1:]))], dim=1)


# --------------------------------------------------------------------------------------------------
# Timed loops: each returns (seconds, per-batch checksums, first output in table order)


def _consume(values: torch.Tensor, delay: float, checks: list) -> None:
    checks.append(float(values.sum(dtype=torch.float64)))
    if delay > 0:
        time.sleep(delay)


def _loop_forward(dmp, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    with torch.no_grad():
        for b, d in zip(batches, delays, strict=True):
            kt = dmp(b)[1]
            kt = kt.wait() if hasattr(kt, "wait") else kt
            first = _table_order(kt) if first is None else first
            _consume(kt.values(), d, checks)
    return time.perf_counter() - t0, checks, first


def _loop_pipeline(pipe, batches, delays):
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


def _loop_blsgpu(sebc, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    for kt, d in zip(sebc.pipeline(batches), delays, strict=True):
        v = kt.values()
        first = v if first is None else first
        _consume(v, d, checks)
    return time.perf_counter() - t0, checks, first


# --------------------------------------------------------------------------------------------------
# One world: every round, on one rank


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bls_channel(pg) -> dict:
    """The "bls" backend's CPU channel stats (empty before its first async alltoall)."""
    stats = getattr(pg, "channel_stats", None)
    return {} if stats is None else stats().get("cpu", {})


def _rank_main(rank: int, world: int, cfg: dict, schedules: dict, providers: list[str]) -> dict:
    from torchrec.distributed.train_pipeline import EvalPipelineSparseDist

    K, warm = cfg["iters"], cfg["warmup"]
    kjts = _kjts(rank, cfg, K + warm)
    trb = _tr_batches(kjts)
    bls = dist.group.WORLD
    gloo = dist.new_group(backend="gloo")
    runners: dict = {}
    to_close = []
    for name in providers:
        group = gloo if name.startswith("gloo") else bls
        if name == "blsgpu-pipeline":
            sebc = blsgpu.ShardedEmbeddingBagCollection(
                _configs(cfg), _plan(cfg, world), bound=cfg["bound"], seed=cfg["seed"]
            )
            to_close.append(sebc)
            runners[name] = (lambda b, d, s=sebc: _loop_blsgpu(s, b, d), kjts[:K], kjts[K:])
        elif name.endswith("-forward"):
            dmp = _dmp(group, cfg)
            runners[name] = (lambda b, d, m=dmp: _loop_forward(m, b, d), trb[:K], trb[K:])
        else:
            pipe = EvalPipelineSparseDist(_dmp(group, cfg), None, torch.device("cpu"))
            runners[name] = (lambda b, d, p=pipe: _loop_pipeline(p, b, d), trb[:K], trb[K:])
    dist.barrier()
    zeros_w = [0.0] * warm
    rounds, firsts = [], {}
    for i in range(cfg["repeats"]):
        order = providers[i % len(providers) :] + providers[: i % len(providers)]
        runs = {}
        for spec, schedule in schedules.items():
            delays = schedule[rank].tolist()
            for name in order:
                fn, timed, warmup = runners[name]
                fn(warmup, zeros_w)
                dist.barrier()
                before = _bls_channel(bls) if name.startswith("bls-") else {}
                c0 = _cpu_s()
                seconds, checks, first = fn(timed, delays)
                cpu = _cpu_s() - c0
                after = _bls_channel(bls) if name.startswith("bls-") else {}
                dist.barrier()
                run = {"loop_s": seconds, "cpu_s": cpu, "checks": checks}
                if after:
                    run["max_lag"] = after.get("max_lag")
                    wait = after.get("waiting_for_data_s")
                    if wait is not None:
                        run["wait_s"] = wait - before.get("waiting_for_data_s", 0.0)
                runs[f"{spec}|{name}"] = run
                if spec == "none" and i == 0:
                    firsts[name] = first
        rounds.append(runs)
    ref = firsts[REF] if REF in firsts else next(iter(firsts.values()))
    out = {
        "rounds": rounds,
        "max_abs_diff": {n: float((f.float() - ref).abs().max()) for n, f in firsts.items()},
        "bit_equal": {n: bool(torch.equal(f, ref)) for n, f in firsts.items()},
    }
    for sebc in to_close:
        sebc.close()
    return out


# --------------------------------------------------------------------------------------------------
# Analysis and output


def _sources() -> dict:
    """sha256 (first 12 hex) of the files the "bls" numbers depend on (the engine may be dirty)."""
    root = Path(__file__).resolve().parents[1] / "blsgpu"
    files = ["_backend.py", "_exchange.py", "_transport.py", "_counters.py", "embedding/_sharded.py"]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files}


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _analyse(cfg: dict, world: int, ranks: list[dict], schedules: dict) -> list[dict]:
    K = cfg["iters"]
    n_rounds = len(ranks[0]["rounds"])
    names = list(dict.fromkeys(k.split("|", 1)[1] for k in ranks[0]["rounds"][0]))
    ref_name = REF if REF in names else names[0]
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
                for x in runs:
                    mine, ref = x[key]["checks"], x[ref_key]["checks"]
                    if name in TR_PROVIDERS:
                        ok &= mine == ref
                    else:
                        scale = max(abs(c) for c in ref) + 1.0
                        ok &= all(abs(a - b) <= _RTOL * scale for a, b in zip(mine, ref, strict=True))
            if name in TR_PROVIDERS:
                ok &= all(r["bit_equal"].get(name, True) for r in ranks)
            t_med = _median(times)
            rows.append(
                {
                    "world_size": world,
                    "delay": spec,
                    "provider": name,
                    "time_s": t_med,
                    "time_s_all": times,
                    "ms_per_batch": 1e3 * t_med / K,
                    "samples_per_s": world * cfg["batch"] * K / t_med,
                    "ratio": _median(ratios),
                    "ratio_all": ratios,
                    "ceiling": _median(ceilings),
                    "cpu_ms_per_batch": 1e3 * _median(cpus),
                    "max_lag": max(lags) if lags else None,
                    "wait_ms_per_batch": 1e3 * _median(waits) if waits else None,
                    "checked": ok,
                    "max_abs_diff": max(r["max_abs_diff"].get(name, math.nan) for r in ranks),
                }
            )
    return rows


def _summary(rows: list[dict]) -> dict:
    def ratio(w, spec, name):
        return next(
            (r["ratio"] for r in rows if (r["world_size"], r["delay"], r["provider"]) == (w, spec, name)),
            math.nan,
        )

    out: dict = {"bls_vs_gloo": {}}
    for w in sorted({r["world_size"] for r in rows}):
        specs = list(dict.fromkeys(r["delay"] for r in rows if r["world_size"] == w))
        out["bls_vs_gloo"][w] = {
            s: {
                mode: ratio(w, s, f"bls-{mode}") / ratio(w, s, f"gloo-{mode}")
                for mode in ("forward", "pipeline")
            }
            for s in specs
        }
    out["checked"] = all(r["checked"] for r in rows)
    return out


def _records(cfg: dict, rows: list[dict], machine: dict, commit: str) -> list[dict]:
    common = {
        k: cfg[k]
        for k in ("tables", "rows", "dim", "batch", "pooling", "iters", "warmup", "repeats", "bound", "seed")
    }
    recs = []
    for r in rows:
        config = {**common, "world_size": r["world_size"], "delay": r["delay"]}
        metrics = [
            ("ms_per_batch", "ms", r["ms_per_batch"]),
            ("samples_per_s", "samples/s", r["samples_per_s"]),
            ("time_s", "s", r["time_s"]),
            ("ratio_vs_gloo_forward", "x", r["ratio"]),
            ("ceiling_vs_gloo_forward", "x", r["ceiling"]),
            ("cpu_ms_per_batch", "ms", r["cpu_ms_per_batch"]),
        ]
        for metric, unit, value in metrics:
            rec = {
                "name": NAME,
                "provider": r["provider"],
                "metric": metric,
                "unit": unit,
                "x": r["world_size"],
                "value": None if value is None or math.isnan(value) else value,
                "config": config,
                "machine": machine,
                "commit": commit,
            }
            if metric == "time_s":
                ts = r["time_s_all"]
                rec["quantiles"] = {"min": min(ts), "median": r["time_s"], "max": max(ts)}
            recs.append(rec)
    return recs


def _print_table(rows: list[dict]) -> None:
    head = (
        f"{'W':>2} {'delay':<20} {'provider':<16} {'ms/batch':>9} {'samples/s':>10} {'ratio':>6} "
        f"{'ceil':>5} {'cpu ms':>7} {'lag':>4} {'wait ms':>8} check"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        lag = "-" if r["max_lag"] is None else str(r["max_lag"])
        wait = "-" if r["wait_ms_per_batch"] is None else f"{r['wait_ms_per_batch']:8.2f}"
        print(
            f"{r['world_size']:>2} {r['delay']:<20} {r['provider']:<16} {r['ms_per_batch']:9.2f} "
            f"{r['samples_per_s']:10.0f} {r['ratio']:6.3f} {r['ceiling']:5.2f} "
            f"{r['cpu_ms_per_batch']:7.1f} {lag:>4} {wait:>8} {'ok' if r['checked'] else 'NO'}"
        )
    print(
        f"ratio = T({REF}) / T(provider) within a round, median over rounds; ceil: the ratio if "
        "every delay but the slowest rank's own were hidden; cpu: CPU time of all ranks' processes "
        "per batch; lag, wait: the 'bls' backend channel's max_lag and waiting_for_data per batch"
    )


def _plot(cfg: dict, rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (plotting is optional)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    worlds = sorted({r["world_size"] for r in rows})
    specs = list(dict.fromkeys(r["delay"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.4), squeeze=False)
    width = 0.8 / len(providers)
    for ax, w in zip(axes[0], worlds, strict=True):
        for j, name in enumerate(providers):
            ys = [
                next(
                    (
                        r["ms_per_batch"]
                        for r in rows
                        if (r["world_size"], r["delay"], r["provider"]) == (w, s, name)
                    ),
                    math.nan,
                )
                for s in specs
            ]
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(specs))]
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.set_xticks(range(len(specs)), specs, fontsize=8)
        ax.set(title=f"W={w}", ylabel="ms per batch (lower is better)", xlabel="injected delay")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(providers), fontsize=8)
    fig.suptitle(
        f"TorchRec DMP on 'bls' vs gloo\n{cfg['tables']} tables x {cfg['rows']} rows, "
        f"D={cfg['dim']}, N={cfg['batch']}/rank, L~U[0,{2 * cfg['pooling']}], "
        f"B={cfg['bound']}, median of {cfg['repeats']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512, help="N, samples per rank per batch")
    ap.add_argument("--pooling", type=int, default=20, help="L: bag sizes uniform in [0, 2L]")
    ap.add_argument("--iters", type=int, default=40, help="timed batches per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches before each run")
    ap.add_argument("--repeats", type=int, default=8, help="rounds; each runs every provider and delay")
    ap.add_argument(
        "--bound",
        type=int,
        default=4,
        help="B: the 'bls' backend's (BLSGPU_BOUND) and blsgpu-pipeline's",
    )
    ap.add_argument(
        "--delays",
        default="none,straggler:last:10,exp:10",
        help="comma-separated delay specs, straggler:last:MS for the last rank; 'none' always runs",
    )
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an earlier run's JSON")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per world size")
    args = ap.parse_args(argv)
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if not args.world_sizes or any(w < 2 for w in args.world_sizes):
        ap.error("--world-sizes must be >= 2")
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(args.providers) - set(ALL_PROVIDERS))
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(ALL_PROVIDERS)}")
    if REF not in args.providers:
        args.providers.insert(0, REF)  # every ratio is against it
    specs = [s.strip() for s in args.delays.split(",") if s.strip()]
    try:
        for s in specs:
            for w in args.world_sizes:
                DelayModel.parse(_spec_for(s, w)).schedule(w, 1)
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
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        path = Path(args.plot_only).with_suffix(".png")
        _plot(doc["summary"]["config"], doc["rows"], path)
        print(f"wrote {path}")
        return 0
    keys = ("tables", "rows", "dim", "batch", "pooling", "iters", "warmup", "repeats", "bound", "delays")
    cfg = {k: getattr(args, k) for k in (*keys, "seed")}
    os.environ["BLSGPU_BOUND"] = str(args.bound)  # the "bls" backend's bound; the ranks inherit it
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    sources = _sources()
    rows = []
    for world in args.world_sizes:
        schedules = {
            s: DelayModel.parse(_spec_for(s, world)).schedule(world, args.iters, args.seed)
            for s in args.delays
        }
        t0 = time.perf_counter()
        ranks = blsgpu.run_world(
            world, _rank_main, cfg, schedules, args.providers, backend="bls", timeout_s=args.timeout_s
        )
        load.append(os.getloadavg()[0])
        print(
            f"W={world}: {args.repeats} rounds in {time.perf_counter() - t0:.1f} s, load {load[-1]:.1f}",
            flush=True,
        )
        rows += _analyse(cfg, world, ranks, schedules)
    summary = _summary(rows)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["loadavg_1m"] = {"min": min(load), "median": statistics.median(load), "max": max(load)}
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    _print_table(rows)
    print(json.dumps({k: summary[k] for k in ("bls_vs_gloo", "checked", "loadavg_1m")}, default=str))
    machine = _provenance.machine(backend="bls+gloo", threads_per_rank=1)
    commit = _provenance.commit()
    cfg["world_sizes"] = args.world_sizes
    if _sources() != sources:
        print("warning: blsgpu sources changed during the run", file=sys.stderr)
        summary["sources_changed"] = True
    _provenance.write_report(
        args.out,
        NAME,
        {**summary, "config": cfg, "machine": machine, "commit": commit, "sources": sources},
        _records(cfg, rows, machine, commit),
        rows,
        None if args.no_plot else lambda path: _plot(cfg, rows, path),
    )
    return 0 if summary["checked"] else 1


if __name__ == "__main__":
    sys.exit(main())
