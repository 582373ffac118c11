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

Figures (as in perf/bench_ebc.py; the workload, rounds and analysis are shared with it in
perf/ebc_common.py):
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

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import ebc_common as ec
import torch
import torch.distributed as dist

import blsgpu
from blsgpu.bench.delays import DelayModel

NAME = "bench_torchrec"
REF = "gloo-forward"
TR_PROVIDERS = ("gloo-forward", "gloo-pipeline", "bls-forward", "bls-pipeline")
ALL_PROVIDERS = (*TR_PROVIDERS, "blsgpu-pipeline")
_RTOL = 1e-5  # blsgpu-pipeline's checksums against FBGEMM's, relative to a batch's scale


def _spec_for(spec: str, world: int) -> str:
    """A delay spec for this world size: straggler:last:MS names the last rank."""
    return spec.replace("straggler:last:", f"straggler:{world - 1}:")


def _bls_channel(pg) -> dict:
    """The "bls" backend's CPU channel stats (empty before its first async alltoall)."""
    stats = getattr(pg, "channel_stats", None)
    return {} if stats is None else stats().get("cpu", {})


def _rank_main(rank: int, world: int, cfg: dict, schedules: dict, providers: list[str]) -> dict:
    from torchrec.distributed.train_pipeline import EvalPipelineSparseDist

    K, warm = cfg["iters"], cfg["warmup"]
    kjts = ec.batches(rank, cfg, K + warm)
    trb = ec.tr_batches(kjts, pipeline=False)
    pb = ec.tr_batches(kjts, pipeline=True)
    bls = dist.group.WORLD
    gloo = dist.new_group(backend="gloo")
    runners: dict = {}
    to_close = []
    for name in providers:
        group = gloo if name.startswith("gloo") else bls
        if name == "blsgpu-pipeline":
            sebc = blsgpu.ShardedEmbeddingBagCollection(
                ec.configs(cfg), ec.plan(cfg, world), bound=cfg["bound"], seed=cfg["seed"]
            )
            to_close.append(sebc)
            runners[name] = (lambda b, d, s=sebc: ec.loop_bls_pipeline(s, b, d), kjts[:K], kjts[K:])
        elif name.endswith("-forward"):
            dmp, _ = ec.torchrec_dmp(cfg, world, pipeline=False, group=group)
            runners[name] = (lambda b, d, m=dmp: ec.loop_dmp(m, b, d), trb[:K], trb[K:])
        else:
            dmp, _ = ec.torchrec_dmp(cfg, world, pipeline=True, group=group)
            pipe = EvalPipelineSparseDist(dmp, None, torch.device("cpu"))
            runners[name] = (lambda b, d, p=pipe: ec.loop_tr_pipeline(p, b, d), pb[:K], pb[K:])
    dist.barrier()
    rounds, firsts = ec.run_rounds(
        rank,
        cfg,
        schedules,
        runners,
        providers,
        channel=lambda name: _bls_channel(bls) if name.startswith("bls-") else {},
    )
    ref = firsts[REF] if REF in firsts else next(iter(firsts.values()))
    out = {
        "rounds": rounds,
        "max_abs_diff": {n: float((f.float() - ref).abs().max()) for n, f in firsts.items()},
        "bit_equal": {n: bool(torch.equal(f, ref)) for n, f in firsts.items()},
    }
    for sebc in to_close:
        sebc.close()
    return out


def _analyse(cfg: dict, world: int, ranks: list[dict], schedules: dict) -> list[dict]:
    """ec.analyse's rows against gloo-forward: TorchRec's providers must match it exactly (every
    checksum, and the first output bit for bit), blsgpu's within float tolerance."""

    def check(name, mine, ref):
        if name in TR_PROVIDERS:
            return mine == ref
        scale = max(abs(c) for c in ref) + 1.0
        return all(abs(a - b) <= _RTOL * scale for a, b in zip(mine, ref, strict=True))

    rows = ec.analyse(cfg, world, ranks, schedules, REF, check)
    for row in rows:
        if row["provider"] in TR_PROVIDERS:
            row["checked"] &= all(r["bit_equal"].get(row["provider"], True) for r in ranks)
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
    ec.plot_bars(
        rows,
        path,
        "ms_per_batch",
        "ms per batch (lower is better)",
        f"TorchRec DMP on 'bls' vs gloo\n{ec.workload_title(cfg)}",
    )


def main(argv=None) -> int:
    ap = ec.parser(
        __doc__,
        ALL_PROVIDERS,
        repeats=8,
        delays="none,straggler:last:10,exp:10",
        bound_help="B: the 'bls' backend's (BLSGPU_BOUND) and blsgpu-pipeline's",
        timeout_s=1800.0,
    )
    args = ap.parse_args(argv)
    ec.check_args(ap, args, ALL_PROVIDERS, _spec_for)
    if REF not in args.providers:
        args.providers.insert(0, REF)  # every ratio is against it
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        path = Path(args.plot_only).with_suffix(".png")
        _plot(doc["summary"]["config"], doc["rows"], path)
        print(f"wrote {path}")
        return 0
    cfg = {k: getattr(args, k) for k in (*ec.WORKLOAD, "delays")}
    os.environ["BLSGPU_BOUND"] = str(args.bound)  # the "bls" backend's bound; the ranks inherit it
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    sources = ec.sources()
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
    cfg["world_sizes"] = args.world_sizes
    plot = None if args.no_plot else lambda path: _plot(cfg, rows, path)
    ec.report(args.out, NAME, "bls+gloo", cfg, rows, summary, sources, REF, plot)
    return 0 if summary["checked"] else 1


if __name__ == "__main__":
    sys.exit(main())
