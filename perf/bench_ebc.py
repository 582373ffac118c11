"""Sharded EmbeddingBagCollection: blsgpu (forward, pipeline on BLS) against TorchRec's sharded forward.

W local gloo ranks (blsgpu.run_world, one thread each), T tables of --rows rows and dim D, sharded
table-wise (table t on rank t % W, the same placement for every provider), N samples per rank per
batch, one feature per table, bag sizes uniform in [0, 2L], ids uniform. Every provider runs the same
batches (built before timing, seeded per rank and batch) and, per batch, the same consumer: touch the
pooled [N, T*D] output (a float64 sum, kept as a checksum), then sleep the rank's injected delay for
that batch from a seeded schedule (blsgpu.bench.delays, [W, iters], the same for every provider). The sleep
stands for the dense part of the model and its jitter.

Providers:
- torchrec-dmp: TorchRec's DistributedModelParallel(EmbeddingBagCollection) forward, batch by batch
  (FBGEMM's CPU table-batched kernel; alltoalls through torch.distributed on gloo).
- torchrec-pipeline: TorchRec's EvalPipelineSparseDist over the same DMP model (input dist of batch
  k+1 overlapped with the forward of batch k), where it runs on CPU.
- blsgpu-forward: ShardedEmbeddingBagCollection(...)(kjt) batch by batch (bound 0 in effect).
- blsgpu-pipeline: ShardedEmbeddingBagCollection.pipeline(batches) with bound B (--bound).
- blsgpu-pipeline-fp16 / -bf16: the same with comm_dtype fp16 / bf16 (pooled rows at half the bytes).
- blsgpu-pipeline-int8: int8 row-wise tables (QuantizedTable), fp32 on the wire.

Figures (defined once; the workload, rounds and analysis are shared with perf/bench_torchrec.py in
perf/ebc_common.py):
- one round runs every provider once under every delay model (--warmup untimed batches, a barrier,
  then the timed loop of --iters batches); providers run in an order rotated from round to round;
  --repeats rounds, all in one world per W (providers are built once).
- time of a run: max over ranks of the timed loop. Throughput = W * N * iters / time (samples per
  second, all ranks). ratio = T(torchrec-dmp) / T(provider) of the same delay model in the same
  round; the median over rounds is reported (and the median time).
- ceiling: the ratio the provider would reach if it hid every injected delay except its slowest
  rank's own (docs/design.md's T_ideal with the provider's own no-delay time): T(torchrec-dmp) /
  (T(provider, none) + max over ranks of the rank's summed delays). A synchronous provider pays
  the per-batch maximum over ranks instead.
- cpu ms: CPU time of all ranks' processes (every thread: main, BLS progress threads, gloo's) per
  batch, median over rounds. On an oversubscribed host it is the figure least moved by other load.
- bytes on the wire: per rank per batch, payload bytes sent to other ranks, median over ranks
  (blsgpu: the channels' bytes_sent; TorchRec: counted by wrapping torch.distributed's
  all_to_all_single in an untimed pass). split bytes (TorchRec's split-count exchange, blsgpu's
  128-byte headers) are kept apart in the JSON.
- table memory: bytes of the table shards, summed over ranks.
- check: each provider's per-batch checksums equal torchrec-dmp's within float tolerance (fp16,
  bf16 and int8 within their own); max|diff| compares the first batch element by element; and
  blsgpu-forward's output equals blsgpu-pipeline's bit for bit.

Usage: python perf/bench_ebc.py [--world-sizes 2,4 --iters 40 --repeats 10 --delays none,exp:10]
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

NAME = "bench_ebc"
REF = "torchrec-dmp"
TARGET_FORWARD = 1.0  # blsgpu-forward / torchrec-dmp throughput, no delays
TARGET_PIPELINE = 1.5  # blsgpu-pipeline / torchrec-dmp throughput, under delays
BLS_PROVIDERS = {
    "blsgpu-forward": {},
    "blsgpu-pipeline": {},
    "blsgpu-pipeline-fp16": {"comm_dtype": torch.float16},
    "blsgpu-pipeline-bf16": {"comm_dtype": torch.bfloat16},
    "blsgpu-pipeline-int8": {"dtype": torch.int8},
}
TR_PROVIDERS = ("torchrec-dmp", "torchrec-pipeline")
ALL_PROVIDERS = (*TR_PROVIDERS, *BLS_PROVIDERS)
# Checksum tolerance per provider, relative to a batch's scale (see _analyse).
_CHECK_RTOL = {
    "fp32": 1e-5,
    "blsgpu-pipeline-fp16": 2e-3,
    "blsgpu-pipeline-bf16": 1.5e-2,
    "blsgpu-pipeline-int8": 2e-2,
}


class _Wire:
    """Counts bytes that torch.distributed's all_to_all_single sends to other ranks."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.payload = 0
        self.splits = 0
        self._orig = None

    def __enter__(self):
        import torch.distributed._functional_collectives as fc

        self._orig = (dist.all_to_all_single, fc.all_to_all_single)
        orig_d, orig_f = self._orig

        def count(inp, in_splits):
            nbytes = inp.numel() * inp.element_size()
            if not in_splits:
                mine = nbytes // self.world
            else:
                row = nbytes // max(inp.shape[0], 1)
                mine = row * int(in_splits[self.rank])
            # Integer messages of one entry per rank and key are split counts, not payload.
            if not inp.is_floating_point() and inp.numel() <= 4 * self.world * 64 and not in_splits:
                self.splits += nbytes - mine
            else:
                self.payload += nbytes - mine

        def wrap_d(output, input, output_split_sizes=None, input_split_sizes=None, *a, **kw):
            count(input, input_split_sizes)
            return orig_d(output, input, output_split_sizes, input_split_sizes, *a, **kw)

        def wrap_f(input, output_split_sizes, input_split_sizes, *a, **kw):
            count(input, input_split_sizes)
            return orig_f(input, output_split_sizes, input_split_sizes, *a, **kw)

        dist.all_to_all_single = wrap_d
        fc.all_to_all_single = wrap_f
        return self

    def __exit__(self, *exc):
        import torch.distributed._functional_collectives as fc

        dist.all_to_all_single, fc.all_to_all_single = self._orig


def _rank_main(rank: int, world: int, cfg: dict, schedules: dict, providers: list[str]) -> dict:
    """Builds every provider once (counting its bytes on the wire in an untimed pass), then runs
    the rounds."""
    K, warm = cfg["iters"], cfg["warmup"]
    batches = ec.batches(rank, cfg, K + warm)
    timed, warmup = batches[:K], batches[K:]
    zeros_w = [0.0] * warm
    runners: dict = {}
    info: dict = {"rank": rank}
    if "torchrec-dmp" in providers:
        dmp, nbytes = ec.torchrec_dmp(cfg, world, pipeline=False)
        trb = ec.tr_batches(batches, pipeline=False)
        with _Wire(rank, world) as wire:
            ec.loop_dmp(dmp, trb[K:], zeros_w)
        runners["torchrec-dmp"] = (lambda b, d, dmp=dmp: ec.loop_dmp(dmp, b, d), trb[:K], trb[K:])
        info["torchrec-dmp"] = {
            "table_bytes": nbytes,
            "wire_bytes": wire.payload / warm,
            "split_bytes": wire.splits / warm,
        }
    if "torchrec-pipeline" in providers:
        try:
            from torchrec.distributed.train_pipeline import EvalPipelineSparseDist

            pdmp, nbytes = ec.torchrec_dmp(cfg, world, pipeline=True)
            pipe = EvalPipelineSparseDist(pdmp, None, torch.device("cpu"))
            pb = ec.tr_batches(batches, pipeline=True)
            with _Wire(rank, world) as wire:
                ec.loop_tr_pipeline(pipe, pb[K:], zeros_w)
            runners["torchrec-pipeline"] = (lambda b, d, p=pipe: ec.loop_tr_pipeline(p, b, d), pb[:K], pb[K:])
            info["torchrec-pipeline"] = {
                "table_bytes": nbytes,
                "wire_bytes": wire.payload / warm,
                "split_bytes": wire.splits / warm,
            }
        except Exception as e:  # reported, not fatal: the other providers still run
            info["torchrec-pipeline"] = {"error": f"{type(e).__name__}: {e}"}
        dist.barrier()
    sebcs = {}
    for name, kw in BLS_PROVIDERS.items():
        if name not in providers:
            continue
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in sebcs:  # forward and pipeline share one module (and its channels)
            sebcs[key] = blsgpu.ShardedEmbeddingBagCollection(
                ec.configs(cfg), ec.plan(cfg, world), bound=cfg["bound"], seed=cfg["seed"], **kw
            )
        sebc = sebcs[key]
        loop = ec.loop_bls_forward if name == "blsgpu-forward" else ec.loop_bls_pipeline
        runners[name] = (lambda b, d, s=sebc, f=loop: f(s, b, d), timed, warmup)
        before = {ch: s["bytes_sent"] for ch, s in sebc.stats().items()}
        loop(sebc, warmup, zeros_w)
        after = sebc.stats()
        info[name] = {
            "table_bytes": sebc.table_nbytes(),
            "wire_bytes": sum(after[ch]["bytes_sent"] - before[ch] for ch in before) / warm,
            "wire_bytes_pooled": (after["pooled"]["bytes_sent"] - before["pooled"]) / warm,
            "split_bytes": 2 * 128 * (world - 1),
        }  # the engine's headers
    rounds, firsts = ec.run_rounds(rank, cfg, schedules, runners, [p for p in providers if p in runners])
    # Exactness on the first timed batch: every provider against torchrec-dmp (or blsgpu-forward).
    ref = firsts.get("torchrec-dmp", firsts.get("blsgpu-forward"))
    out = {
        "info": info,
        "rounds": rounds,
        "max_abs_diff": {n: float((f.float() - ref).abs().max()) for n, f in firsts.items()},
    }
    if "blsgpu-forward" in firsts and "blsgpu-pipeline" in firsts:
        out["forward_equals_pipeline"] = bool(
            torch.equal(firsts["blsgpu-forward"], firsts["blsgpu-pipeline"])
        )
    for s in sebcs.values():
        s.close()
    return out


def _analyse(cfg: dict, world: int, ranks: list[dict], schedules: dict) -> list[dict]:
    """ec.analyse's rows against torchrec-dmp, plus each provider's bytes on the wire and in
    tables. Checksums match within the provider's tolerance of a batch's scale."""
    # Pooled values are O(sqrt(2L / rows)); a checksum adds N*T*D of them.
    spread = cfg["batch"] * cfg["tables"] * cfg["dim"] * math.sqrt(2 * cfg["pooling"] / cfg["rows"])

    def check(name, mine, ref):
        rtol = _CHECK_RTOL.get(name, _CHECK_RTOL["fp32"])
        scale = max(abs(c) for c in ref) + spread
        return all(abs(a - b) <= rtol * scale for a, b in zip(mine, ref, strict=True))

    rows = ec.analyse(cfg, world, ranks, schedules, REF, check)
    for row in rows:
        per_rank = [r["info"].get(row["provider"], {}) for r in ranks]
        row["table_bytes"] = sum(p.get("table_bytes", 0) for p in per_rank)
        row["wire_bytes"] = ec.median([p.get("wire_bytes") for p in per_rank])
        row["split_bytes"] = ec.median([p.get("split_bytes") for p in per_rank])
        if "wire_bytes_pooled" in per_rank[0]:
            row["wire_bytes_pooled"] = ec.median([p["wire_bytes_pooled"] for p in per_rank])
    return rows


def _summary(rows: list[dict], ranks_by_w: dict, errors: dict) -> dict:
    def ratio(w, spec, name):
        return next(
            (
                r["ratio"]
                for r in rows
                if r["world_size"] == w and r["delay"] == spec and r["provider"] == name
            ),
            math.nan,
        )

    out: dict = {
        "forward_target": TARGET_FORWARD,
        "pipeline_target": TARGET_PIPELINE,
        "forward_ratio": {},
        "pipeline_ratio": {},
        "pipeline_ceiling": {},
        "errors": errors,
    }
    for w in ranks_by_w:
        specs = sorted({r["delay"] for r in rows if r["world_size"] == w})
        out["forward_ratio"][w] = ratio(w, "none", "blsgpu-forward")
        out["pipeline_ratio"][w] = {s: ratio(w, s, "blsgpu-pipeline") for s in specs if s != "none"}
        out["pipeline_ceiling"][w] = {
            s: next(
                r["ceiling"]
                for r in rows
                if r["world_size"] == w and r["delay"] == s and r["provider"] == "blsgpu-pipeline"
            )
            for s in specs
            if s != "none"
        }
    out["forward_met"] = all(v >= TARGET_FORWARD for v in out["forward_ratio"].values())
    out["pipeline_met"] = all(
        v >= TARGET_PIPELINE for d in out["pipeline_ratio"].values() for v in d.values()
    )
    out["checked"] = all(r["checked"] for r in rows)
    out["forward_equals_pipeline"] = all(
        r.get("forward_equals_pipeline", True) for ranks in ranks_by_w.values() for r in ranks
    )
    return out


def _print_table(rows: list[dict]) -> None:
    head = (
        f"{'W':>2} {'delay':<8} {'provider':<22} {'time_s':>7} {'samples/s':>10} "
        f"{'ratio':>6} {'ceil':>5} {'cpu ms':>7} {'wire KiB':>9} {'table MiB':>9} {'max|diff|':>9} "
        f"check"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['world_size']:>2} {r['delay']:<8} {r['provider']:<22} {r['time_s']:7.3f} "
            f"{r['samples_per_s']:10.0f} {r['ratio']:6.3f} {r['ceiling']:5.2f} "
            f"{r['cpu_ms_per_batch']:7.1f} "
            f"{r['wire_bytes'] / 1024:9.1f} "
            f"{r['table_bytes'] / 2**20:9.1f} {r['max_abs_diff']:9.2e} "
            f"{'ok' if r['checked'] else 'NO'}"
        )
    print(
        "ratio = T(torchrec-dmp) / T(provider) within a round, median over rounds; ceil: the "
        "ratio if every delay but the slowest rank's own were hidden; cpu: CPU time "
        "of all ranks' processes per batch; wire: payload bytes a rank sends to other ranks per "
        "batch (median over ranks); table: all ranks' shards"
    )


def _plot(cfg: dict, rows: list[dict], path: Path) -> None:
    ec.plot_bars(
        rows,
        path,
        "ratio",
        "throughput / torchrec-dmp",
        f"sharded EBC on gloo: {ec.workload_title(cfg)}",
        hlines=((1.0, ":"), (TARGET_PIPELINE, "--")),
    )


def main(argv=None) -> int:
    ap = ec.parser(
        __doc__,
        ALL_PROVIDERS,
        repeats=10,
        delays="none,exp:10",
        bound_help="B of the blsgpu pipeline",
        timeout_s=1200.0,
    )
    args = ap.parse_args(argv)
    ec.check_args(ap, args, ALL_PROVIDERS, lambda spec, world: spec)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        path = Path(args.plot_only).with_suffix(".png")
        _plot(doc["summary"]["config"], doc["rows"], path)
        print(f"wrote {path}")
        return 0
    cfg = {k: getattr(args, k) for k in (*ec.WORKLOAD, "delays")}
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    sources = ec.sources()
    rows, ranks_by_w, errors = [], {}, {}
    for world in args.world_sizes:
        schedules = {s: DelayModel.parse(s).schedule(world, args.iters, args.seed) for s in args.delays}
        t0 = time.perf_counter()
        ranks = blsgpu.run_world(world, _rank_main, cfg, schedules, args.providers, timeout_s=args.timeout_s)
        load.append(os.getloadavg()[0])
        print(
            f"W={world}: {args.repeats} rounds in {time.perf_counter() - t0:.1f} s, load {load[-1]:.1f}",
            flush=True,
        )
        for r in ranks:
            for name, inf in r["info"].items():
                if isinstance(inf, dict) and "error" in inf:
                    errors.setdefault(f"W={world} {name}", inf["error"])
        rows += _analyse(cfg, world, ranks, schedules)
        ranks_by_w[world] = ranks
    summary = _summary(rows, ranks_by_w, errors)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["loadavg_1m"] = {"min": min(load), "median": statistics.median(load), "max": max(load)}
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    _print_table(rows)
    keys = (
        "forward_ratio",
        "forward_met",
        "pipeline_ratio",
        "pipeline_ceiling",
        "pipeline_met",
        "checked",
        "forward_equals_pipeline",
        "errors",
        "loadavg_1m",
    )
    print(json.dumps({k: summary[k] for k in keys}, default=str))
    cfg["world_sizes"] = args.world_sizes
    plot = None if args.no_plot else lambda path: _plot(cfg, rows, path)
    ec.report(args.out, NAME, "gloo", cfg, rows, summary, sources, REF, plot)
    return 0 if summary["checked"] and summary["forward_equals_pipeline"] else 1


if __name__ == "__main__":
    sys.exit(main())
