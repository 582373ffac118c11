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

Figures (defined once):
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

NAME = "bench_ebc"
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
_CHECK_RTOL = {"fp32": 1e-5, "blsgpu-pipeline-fp16": 2e-3, "blsgpu-pipeline-bf16": 1.5e-2,
               "blsgpu-pipeline-int8": 2e-2}


# --------------------------------------------------------------------------------------------------
# Workload


def _configs(cfg: dict):
    return [blsgpu.EmbeddingBagConfig(f"t{i}", cfg["rows"], cfg["dim"], [f"f{i}"])
            for i in range(cfg["tables"])]


def _batches(rank: int, cfg: dict, count: int) -> list:
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


def _plan(cfg: dict, world: int) -> dict:
    return {f"t{i}": {"table_wise": i % world} for i in range(cfg["tables"])}


# --------------------------------------------------------------------------------------------------
# TorchRec side


def _torchrec_dmp(rank: int, world: int, cfg: dict, model_wrapper: bool):
    """DistributedModelParallel over TorchRec's EBC with our placement and weights (seeded)."""
    import torchrec
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    from blsgpu.embedding._collection import init_weight

    ours = _configs(cfg)
    configs = [torchrec.EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings,
                                           embedding_dim=t.embedding_dim,
                                           feature_names=list(t.feature_names)) for t in ours]
    meta = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder()
    per_param = {name: table_wise(rank=e["table_wise"]) for name, e in _plan(cfg, world).items()}
    module_plan = construct_module_sharding_plan(meta, per_param_sharding=per_param,
                                                 local_size=world, world_size=world,
                                                 device_type="cpu", sharder=sharder)
    model = _Model(meta) if model_wrapper else meta
    plan = ShardingPlan({"ebc" if model_wrapper else "": module_plan})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                   sharders=[sharder])
    with torch.no_grad():
        for key, st in dmp.state_dict().items():
            t = int(key.split("embedding_bags.")[1].split(".")[0][1:])
            w = None
            for sh in st.local_shards():
                if w is None:
                    w = init_weight(ours[t], t, cfg["seed"], torch.float32)
                (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                sh.tensor.copy_(w[r0:r0 + nr, c0:c0 + nc])
    nbytes = sum(sh.tensor.numel() * sh.tensor.element_size()
                 for st in dmp.state_dict().values() for sh in st.local_shards())
    return dmp, nbytes


class _Model(torch.nn.Module):
    """What TorchRec's pipelines drive: model(batch) -> (loss, output)."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, batch):
        return batch.dense_features, self.ebc(batch.sparse_features)


def _tr_batches(batches: list, pipeline: bool) -> list:
    out = [b.to_torchrec() for b in batches]
    if not pipeline:
        return out
    from torchrec.datasets.utils import Batch

    return [Batch(dense_features=torch.zeros(1), sparse_features=kjt, labels=torch.zeros(1))
            for kjt in out]


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


# --------------------------------------------------------------------------------------------------
# Timed loops: each returns (seconds, per-batch checksums, first output)


def _consume(values: torch.Tensor, delay: float, checks: list) -> None:
    checks.append(float(values.sum(dtype=torch.float64)))
    if delay > 0:
        time.sleep(delay)


def _loop_dmp(dmp, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    with torch.no_grad():
        for b, d in zip(batches, delays, strict=True):
            kt = dmp(b)
            kt = kt.wait() if hasattr(kt, "wait") else kt
            v = kt.values()
            first = _table_order(kt) if first is None else first
            _consume(v, d, checks)
    return time.perf_counter() - t0, checks, first


def _table_order(kt) -> torch.Tensor:
    """TorchRec orders output keys by sharding; our order is the tables'."""
    d = kt.to_dict()
    return torch.cat([d[k] for k in sorted(d, key=lambda k: int(k[1:]))], dim=1)


def _loop_tr_pipeline(pipe, batches, delays):
    checks, first = [], None
    it = iter(batches)
    t0 = time.perf_counter()
    with torch.no_grad():
        for d in delays:
            kt = pipe.progress(it)
            kt = kt.wait() if hasattr(kt, "wait") else kt
            v = kt.values()
            first = _table_order(kt) if first is None else first
            _consume(v, d, checks)
    seconds = time.perf_counter() - t0
    pipe.reset()
    return seconds, checks, first


def _loop_bls_forward(sebc, batches, delays):
    checks, first = [], None
    t0 = time.perf_counter()
    for b, d in zip(batches, delays, strict=True):
        v = sebc(b).values()
        first = v if first is None else first
        _consume(v, d, checks)
    return time.perf_counter() - t0, checks, first


def _loop_bls_pipeline(sebc, batches, delays):
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
    """CPU seconds of this process, all threads (main, BLS progress threads, gloo's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rank_main(rank: int, world: int, cfg: dict, schedules: dict, providers: list[str]) -> dict:
    """Builds every provider once, then runs --repeats rounds; each round runs every provider
    under every delay model, in an order rotated from round to round."""
    K, warm = cfg["iters"], cfg["warmup"]
    batches = _batches(rank, cfg, K + warm)
    timed, warmup = batches[:K], batches[K:]
    zeros_w = [0.0] * warm
    runners: dict = {}
    info: dict = {"rank": rank}
    if "torchrec-dmp" in providers:
        dmp, nbytes = _torchrec_dmp(rank, world, cfg, model_wrapper=False)
        trb = _tr_batches(batches, pipeline=False)
        with _Wire(rank, world) as wire:
            _loop_dmp(dmp, trb[K:], zeros_w)
        runners["torchrec-dmp"] = (lambda b, d, dmp=dmp: _loop_dmp(dmp, b, d), trb[:K], trb[K:])
        info["torchrec-dmp"] = {"table_bytes": nbytes, "wire_bytes": wire.payload / warm,
                                "split_bytes": wire.splits / warm}
    if "torchrec-pipeline" in providers:
        try:
            from torchrec.distributed.train_pipeline import EvalPipelineSparseDist

            pdmp, nbytes = _torchrec_dmp(rank, world, cfg, model_wrapper=True)
            pipe = EvalPipelineSparseDist(pdmp, None, torch.device("cpu"))
            pb = _tr_batches(batches, pipeline=True)
            with _Wire(rank, world) as wire:
                _loop_tr_pipeline(pipe, pb[K:], zeros_w)
            runners["torchrec-pipeline"] = (
                lambda b, d, p=pipe: _loop_tr_pipeline(p, b, d), pb[:K], pb[K:])
            info["torchrec-pipeline"] = {"table_bytes": nbytes, "wire_bytes": wire.payload / warm,
                                         "split_bytes": wire.splits / warm}
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
                _configs(cfg), _plan(cfg, world), bound=cfg["bound"], seed=cfg["seed"], **kw)
        sebc = sebcs[key]
        loop = _loop_bls_forward if name == "blsgpu-forward" else _loop_bls_pipeline
        runners[name] = (lambda b, d, s=sebc, f=loop: f(s, b, d), timed, warmup)
        before = {ch: s["bytes_sent"] for ch, s in sebc.stats().items()}
        loop(sebc, warmup, zeros_w)
        after = sebc.stats()
        info[name] = {"table_bytes": sebc.table_nbytes(),
                      "wire_bytes": sum(after[ch]["bytes_sent"] - before[ch]
                                        for ch in before) / warm,
                      "wire_bytes_pooled": (after["pooled"]["bytes_sent"]
                                            - before["pooled"]) / warm,
                      "split_bytes": 2 * 128 * (world - 1)}  # the engine's headers
    names = [p for p in providers if p in runners]
    rounds = []
    firsts: dict = {}
    for i in range(cfg["repeats"]):
        order = names[i % len(names):] + names[:i % len(names)]
        runs = {}
        for spec, schedule in schedules.items():
            delays = schedule[rank].tolist()
            for name in order:
                fn, tb, wb = runners[name]
                fn(wb, zeros_w)  # warm-up: this provider's tables back in cache
                dist.barrier()
                c0 = _cpu_s()
                seconds, checks, first = fn(tb, delays)
                cpu = _cpu_s() - c0
                dist.barrier()
                runs[f"{spec}|{name}"] = {"loop_s": seconds, "cpu_s": cpu, "checks": checks}
                if spec == "none" and i == 0:
                    firsts[name] = first
        rounds.append(runs)
    # Exactness on the first timed batch: every provider against torchrec-dmp (or blsgpu-forward).
    ref = firsts.get("torchrec-dmp", firsts.get("blsgpu-forward"))
    out = {"info": info, "rounds": rounds,
           "max_abs_diff": {n: float((f.float() - ref).abs().max()) for n, f in firsts.items()}}
    if "blsgpu-forward" in firsts and "blsgpu-pipeline" in firsts:
        out["forward_equals_pipeline"] = bool(torch.equal(firsts["blsgpu-forward"],
                                                          firsts["blsgpu-pipeline"]))
    for s in sebcs.values():
        s.close()
    return out


# --------------------------------------------------------------------------------------------------
# Analysis and output


def _sources() -> dict:
    """sha256 (first 12 hex) of the files the blsgpu numbers depend on: with uncommitted work
    the commit alone does not say which engine ran."""
    root = Path(__file__).resolve().parents[1] / "blsgpu"
    files = ["_exchange.py", "_transport.py", "_counters.py", "_lookup.py",
             "embedding/_sharded.py", "embedding/_collection.py"]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files}


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _checks_match(name: str, mine: list[float], ref: list[float], scale: float) -> bool:
    rtol = _CHECK_RTOL.get(name, _CHECK_RTOL["fp32"])
    return all(abs(a - b) <= rtol * scale for a, b in zip(mine, ref, strict=True))


def _analyse(cfg: dict, world: int, ranks: list[dict], schedules: dict) -> list[dict]:
    """Per (delay, provider): medians over rounds of time, ratio to torchrec-dmp, CPU per batch.

    ceiling: the ratio a provider would reach if it hid every delay but its slowest rank's own,
    T(torchrec-dmp) / (T(provider, no delay) + max over ranks of that rank's summed delays).
    """
    K = cfg["iters"]
    rounds = len(ranks[0]["rounds"])
    names = list(dict.fromkeys(k.split("|", 1)[1] for k in ranks[0]["rounds"][0]))
    ref_name = "torchrec-dmp" if "torchrec-dmp" in names else names[0]
    rows = []
    for spec in cfg["delays"]:
        for name in names:
            key, ref_key = f"{spec}|{name}", f"{spec}|{ref_name}"
            own = float(schedules[spec].sum(axis=1).max())
            times, ratios, ceilings, cpus, ok = [], [], [], [], True
            for i in range(rounds):
                runs = [r["rounds"][i] for r in ranks]
                t = max(x[key]["loop_s"] for x in runs)
                t_ref = max(x[ref_key]["loop_s"] for x in runs)
                times.append(t)
                ratios.append(t_ref / t)
                ceilings.append(t_ref / (max(x[f"none|{name}"]["loop_s"] for x in runs) + own))
                cpus.append(sum(x[key]["cpu_s"] for x in runs) / K)
                for x in runs:
                    ref = x[ref_key]["checks"]
                    # Pooled values are O(sqrt(2L / rows)); a checksum adds N*T*D of them.
                    scale = max(abs(c) for c in ref) + cfg["batch"] * cfg["tables"] * \
                        cfg["dim"] * math.sqrt(2 * cfg["pooling"] / cfg["rows"])
                    ok &= _checks_match(name, x[key]["checks"], ref, scale)
            per_rank = [r["info"].get(name, {}) for r in ranks]
            row = {"world_size": world, "delay": spec, "provider": name,
                   "time_s": _median(times), "time_s_all": times,
                   "samples_per_s": world * cfg["batch"] * K / _median(times),
                   "ratio": _median(ratios), "ratio_all": ratios, "ceiling": _median(ceilings),
                   "cpu_ms_per_batch": 1e3 * _median(cpus), "checked": ok,
                   "table_bytes": sum(p.get("table_bytes", 0) for p in per_rank),
                   "wire_bytes": _median([p.get("wire_bytes") for p in per_rank]),
                   "split_bytes": _median([p.get("split_bytes") for p in per_rank]),
                   "max_abs_diff": max(r["max_abs_diff"].get(name, math.nan) for r in ranks)}
            if "wire_bytes_pooled" in per_rank[0]:
                row["wire_bytes_pooled"] = _median([p["wire_bytes_pooled"] for p in per_rank])
            rows.append(row)
    return rows


def _summary(rows: list[dict], ranks_by_w: dict, errors: dict) -> dict:
    def ratio(w, spec, name):
        return next((r["ratio"] for r in rows if r["world_size"] == w and r["delay"] == spec
                     and r["provider"] == name), math.nan)

    out: dict = {"forward_target": TARGET_FORWARD, "pipeline_target": TARGET_PIPELINE,
                 "forward_ratio": {}, "pipeline_ratio": {}, "pipeline_ceiling": {},
                 "errors": errors}
    for w in ranks_by_w:
        specs = sorted({r["delay"] for r in rows if r["world_size"] == w})
        out["forward_ratio"][w] = ratio(w, "none", "blsgpu-forward")
        out["pipeline_ratio"][w] = {s: ratio(w, s, "blsgpu-pipeline") for s in specs
                                    if s != "none"}
        out["pipeline_ceiling"][w] = {
            s: next(r["ceiling"] for r in rows if r["world_size"] == w and r["delay"] == s
                    and r["provider"] == "blsgpu-pipeline") for s in specs if s != "none"}
    out["forward_met"] = all(v >= TARGET_FORWARD for v in out["forward_ratio"].values())
    out["pipeline_met"] = all(v >= TARGET_PIPELINE for d in out["pipeline_ratio"].values()
                              for v in d.values())
    out["checked"] = all(r["checked"] for r in rows)
    out["forward_equals_pipeline"] = all(
        r.get("forward_equals_pipeline", True) for ranks in ranks_by_w.values() for r in ranks)
    return out


def _records(cfg: dict, rows: list[dict], machine: dict, commit: str) -> list[dict]:
    common = {k: cfg[k] for k in ("tables", "rows", "dim", "batch", "pooling", "iters", "warmup",
                                  "repeats", "bound", "seed")}
    recs = []
    for r in rows:
        config = {**common, "world_size": r["world_size"], "delay": r["delay"]}
        metrics = [("samples_per_s", "samples/s", r["samples_per_s"]), ("time_s", "s", r["time_s"]),
                   ("ratio_vs_torchrec_dmp", "x", r["ratio"]),
                   ("ceiling_vs_torchrec_dmp", "x", r["ceiling"]),
                   ("cpu_ms_per_batch", "ms", r["cpu_ms_per_batch"]),
                   ("wire_bytes_per_batch", "B", r["wire_bytes"]),
                   ("table_bytes", "B", r["table_bytes"])]
        for metric, unit, value in metrics:
            rec = {"name": NAME, "provider": r["provider"], "metric": metric, "unit": unit,
                   "x": r["world_size"], "value": None if value is None or math.isnan(value)
                   else value, "config": config, "machine": machine, "commit": commit}
            if metric == "time_s":
                ts = r["time_s_all"]
                rec["quantiles"] = {"min": min(ts), "median": r["time_s"], "max": max(ts)}
            recs.append(rec)
    return recs


def _print_table(rows: list[dict]) -> None:
    head = (f"{'W':>2} {'delay':<8} {'provider':<22} {'time_s':>7} {'samples/s':>10} "
            f"{'ratio':>6} {'ceil':>5} {'cpu ms':>7} {'wire KiB':>9} {'table MiB':>9} {'max|diff|':>9} "
            f"check")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['world_size']:>2} {r['delay']:<8} {r['provider']:<22} {r['time_s']:7.3f} "
              f"{r['samples_per_s']:10.0f} {r['ratio']:6.3f} {r['ceiling']:5.2f} "
              f"{r['cpu_ms_per_batch']:7.1f} "
              f"{r['wire_bytes'] / 1024:9.1f} "
              f"{r['table_bytes'] / 2**20:9.1f} {r['max_abs_diff']:9.2e} "
              f"{'ok' if r['checked'] else 'NO'}")
    print("ratio = T(torchrec-dmp) / T(provider) within a round, median over rounds; ceil: the "
          "ratio if every delay but the slowest rank's own were hidden; cpu: CPU time "
          "of all ranks' processes per batch; wire: payload bytes a rank sends to other ranks per "
          "batch (median over ranks); table: all ranks' shards")


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
            ys = [next((r["ratio"] for r in rows if r["world_size"] == w and r["delay"] == s
                        and r["provider"] == name), math.nan) for s in specs]
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(specs))]
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.axhline(TARGET_PIPELINE, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(specs)), specs)
        ax.set(title=f"W={w}", ylabel="throughput / torchrec-dmp", xlabel="injected delay")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(providers), fontsize=8)
    fig.suptitle(f"sharded EBC on gloo: {cfg['tables']} tables x {cfg['rows']} rows, "
                 f"D={cfg['dim']}, N={cfg['batch']}/rank, L~U[0,{2 * cfg['pooling']}], "
                 f"B={cfg['bound']}, median of {cfg['repeats']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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
    ap.add_argument("--repeats", type=int, default=10,
                    help="rounds; each runs every provider under every delay model")
    ap.add_argument("--bound", type=int, default=4, help="B of the blsgpu pipeline")
    ap.add_argument("--delays", default="none,exp:10",
                    help="comma-separated blsgpu.bench.delays specs; 'none' is always run")
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an earlier run's JSON")
    ap.add_argument("--timeout-s", type=float, default=1200.0, help="per repeat")
    args = ap.parse_args(argv)
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if any(w < 2 for w in args.world_sizes):
        ap.error("--world-sizes must be >= 2")
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(args.providers) - set(ALL_PROVIDERS))
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(ALL_PROVIDERS)}")
    try:
        names = [str(DelayModel.parse(s)) for s in args.delays.split(",") if s.strip()]
    except ValueError as e:
        ap.error(str(e))
    if any(n.startswith("skew") for n in names):
        ap.error("skew delays need a compute time; use another model")
    args.delays = ["none"] + [n for n in dict.fromkeys(names) if n != "none"]
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
    cfg = {k: getattr(args, k) for k in ("tables", "rows", "dim", "batch", "pooling", "iters",
                                         "warmup", "repeats", "bound", "delays", "seed")}
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    sources = _sources()
    rows, ranks_by_w, errors = [], {}, {}
    for world in args.world_sizes:
        schedules = {s: DelayModel.parse(s).schedule(world, args.iters, args.seed)
                     for s in args.delays}
        t0 = time.perf_counter()
        ranks = blsgpu.run_world(world, _rank_main, cfg, schedules, args.providers,
                                 timeout_s=args.timeout_s)
        load.append(os.getloadavg()[0])
        print(f"W={world}: {args.repeats} rounds in {time.perf_counter() - t0:.1f} s, "
              f"load {load[-1]:.1f}", flush=True)
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
    keys = ("forward_ratio", "forward_met", "pipeline_ratio", "pipeline_ceiling", "pipeline_met",
            "checked", "forward_equals_pipeline", "errors", "loadavg_1m")
    print(json.dumps({k: summary[k] for k in keys}, default=str))
    machine = _provenance.machine(backend="gloo", threads_per_rank=1)
    commit = _provenance.commit()
    cfg["world_sizes"] = args.world_sizes
    if _sources() != sources:
        print("warning: blsgpu sources changed during the run", file=sys.stderr)
        summary["sources_changed"] = True
    _provenance.write_report(
        args.out, NAME,
        {**summary, "config": cfg, "machine": machine, "commit": commit, "sources": sources},
        _records(cfg, rows, machine, commit), rows,
        None if args.no_plot else lambda path: _plot(cfg, rows, path),
    )
    return 0 if summary["checked"] and summary["forward_equals_pipeline"] else 1


if __name__ == "__main__":
    sys.exit(main())
