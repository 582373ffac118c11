"""What the runner's per-rank results say: throughput, latency, masking, and the simulator's view.

``analyse`` turns the ranks' results of one ``run_rank`` world into one report.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np

from blsgpu.bench import sim
from blsgpu.bench.record import Provenance, Record, provenance
from blsgpu.bench.runner import BenchConfig

__all__ = ["analyse"]

# The figures of a run that go into its record, and their units; speedup and masking are its
# ratios to the synchronous run of the same world.
_UNITS = {
    "time_s": "s",
    "throughput_it_s": "it/s",
    "samples_per_s": "samples/s",
    "p50_ms": "ms",
    "p99_ms": "ms",
    "latency_p50_ms": "ms",
    "latency_p99_ms": "ms",
    "simulated_time_s": "s",
    "simulated_throughput_it_s": "it/s",
    "sim_error": "ratio",
    "predicted_throughput_it_s": "it/s",
    "max_lag": "iterations",
}
_RATIOS = ("speedup", "masking", "predicted_masking")


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


def _median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _none_if_nan(x: float | None):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _record(cfg: BenchConfig, run: dict, prov: Provenance) -> Record:
    config = {
        "world_size": cfg.world_size,
        "batch": cfg.batch,
        "iterations": cfg.iterations,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "device": cfg.device,
        "seed": cfg.seed,
        "delay": run["delay"],
        "bound": run["bound"],
    }
    ts = run["time_s_repeats"]
    return Record.from_row(
        "blsgpu_bench",
        run["mode"],
        config,
        run,
        _UNITS,
        prov,
        _RATIOS,
        baseline="sync",
        quantiles={"time_s": {"min": min(ts), "median": run["time_s"], "max": max(ts)}},
    )


def analyse(cfg: BenchConfig, results: list[dict], flags: dict | None = None) -> dict:
    """The JSON document of a bench from every rank's run_rank result (schema: perf/README.md).

    Throughput = K / T with T the slowest rank's timed loop; ratios are taken within a repeat,
    then the median over repeats. Two simulations of each run, with the exchange time fitted to
    T_none (blsgpu.bench.sim.fit_comm_s):

    - ``simulated_*`` replays the run's own per-rank, per-iteration busy times through the
      schedule of its mode (sync, or BLS at its bound): does the schedule explain the time?
    - ``predicted_*`` forecasts it from the delay schedule plus the busy times of the run
      without delays, as ``blsgpu simulate`` projects to other W.

    Args:
        flags: the command line's flags, recorded in ``config`` beside the resolved values.
    """
    W, K, N = cfg.world_size, cfg.iterations, cfg.batch
    labels = cfg.labels()
    R = cfg.repeats
    schedule = np.asarray(results[0]["schedule"], dtype=np.float64)
    ideal_extra = float(schedule.sum(axis=1).max())
    # Delay a synchronous run pays beyond the slowest rank's own, the most BLS can hide. None
    # (none, straggler, skew): masking is undefined, whatever noise T_sync - T_ideal shows.
    hideable = float(schedule.max(axis=0).sum()) - ideal_extra > 1e-9
    none_label = labels[0]  # "none", or "sync" when there are no delays

    def T(rep: int, label: str) -> float:
        return max(r["repeats"][rep][label]["loop_s"] for r in results)

    def busy(rep: int, label: str) -> np.ndarray:
        return np.array([r["repeats"][rep][label]["busy_s"] for r in results])

    def schedule_time(work: np.ndarray, label: str, comm_s: float) -> float:
        if label in ("none", "sync"):
            return sim.simulate_sync(work, comm_s).total_s
        return sim.simulate_bls(work, int(label[3:]), comm_s).total_s

    per: dict[str, dict[str, list]] = {lb: collections.defaultdict(list) for lb in labels}
    t_none_l, t_ideal_l, comm_l, base_l = [], [], [], []
    for rep in range(R):
        t_none = T(rep, none_label)
        t_sync = T(rep, "sync")
        t_ideal = t_none + ideal_extra
        # The no-delay run's busy time is the base work (its schedule row is zeros if "sync").
        base = np.clip(busy(rep, none_label) - (schedule if none_label == "sync" else 0.0), 0.0, None)
        comm_s = sim.fit_comm_s(t_none, base)
        pred_work = base + schedule
        pred_sync = sim.simulate_sync(pred_work, comm_s).total_s
        t_none_l.append(t_none)
        t_ideal_l.append(t_ideal)
        comm_l.append(comm_s)
        base_l.append(float(base.mean()))
        for label in labels:
            t = T(rep, label)
            d = per[label]
            d["time_s"].append(t)
            d["speedup"].append(t_sync / t)
            d["masking"].append(sim.masking(t_sync, t, t_ideal) if hideable and label != "none" else math.nan)
            d["exact"].append(all(r["repeats"][rep][label]["exact"] for r in results))
            d["sim_s"].append(schedule_time(busy(rep, label), label, comm_s))
            pred = schedule_time(base if label == "none" else pred_work, label, comm_s)
            d["pred_s"].append(pred)
            d["pred_masking"].append(
                sim.masking(pred_sync, pred, t_ideal) if hideable and label != "none" else math.nan
            )

    runs = []
    none_run = None
    last = R - 1
    for label in labels:
        d = per[label]
        steps = [x for r in results for x in r["repeats"][last][label]["step_s"]]
        lat = [x for r in results for x in r["repeats"][last][label]["latency_s"]]
        t = _median(d["time_s"])
        t_sim = _median(d["sim_s"])
        t_pred = _median(d["pred_s"])
        entry = {
            "mode": "bls" if label.startswith("bls") else "sync",
            "bound": int(label[3:]) if label.startswith("bls") else None,
            "delay": "none" if label == "none" else cfg.delay,
            "time_s": t,
            "throughput_it_s": K / t,
            "samples_per_s": K * N * W / t,
            "p50_ms": _pct(steps, 50) * 1e3,
            "p99_ms": _pct(steps, 99) * 1e3,
            "latency_p50_ms": _pct(lat, 50) * 1e3,
            "latency_p99_ms": _pct(lat, 99) * 1e3,
            "masking": _none_if_nan(_median(d["masking"])),
            "speedup": _median(d["speedup"]),
            "exact": all(d["exact"]),
            "simulated_time_s": t_sim,
            "simulated_throughput_it_s": K / t_sim if t_sim > 0 else math.inf,
            "sim_error": t / t_sim - 1.0 if t_sim > 0 else math.nan,
            "predicted_throughput_it_s": K / t_pred if t_pred > 0 else math.inf,
            "predicted_masking": _none_if_nan(_median(d["pred_masking"])),
            "max_lag": max(r["repeats"][last][label]["max_lag"] for r in results),
            "transport": sorted({t for r in results for t in r["repeats"][last][label]["transport"]}),
            "time_s_repeats": d["time_s"],
            "digest": [r["repeats"][last][label]["digest"] for r in results],
            "per_rank_iter_s": [r["repeats"][last][label]["busy_s"] for r in results],
        }
        if label == "none":
            none_run = entry
        else:
            runs.append(entry)
    arch = cfg.arch
    prov = provenance(device=cfg.device, backend="gloo" if cfg.device == "cpu" else "cpu:gloo,cuda:nccl")
    return {
        "config": {
            **(flags or {}),
            **asdict(cfg),
            "arch": {"bottom": arch.bottom, "top": arch.top, "embedding_sizes": arch.embedding_sizes},
        },
        "commit": prov.commit,
        "machine": prov.machine,
        "t_none_s": _median(t_none_l),
        "t_ideal_s": _median(t_ideal_l),
        "comm_s": _median(comm_l),
        "base_ms": _median(base_l) * 1e3,
        "skew_base_ms": results[0]["base_ms"],
        "delay_per_rank_s": schedule.sum(axis=1).tolist(),
        "exact": all(r["exact"] for r in runs) and (none_run is None or none_run["exact"]),
        # Ranks outnumber cores: measured masking can exceed 1, the simulator's is the one to read.
        "oversubscribed": cfg.world_size > (prov.machine.get("cores") or 1),
        "none_run": none_run,
        "runs": runs,
        # The same runs in the record schema every benchmark shares (blsgpu.bench.record).
        "records": [_record(cfg, r, prov) for r in ([none_run] if none_run else []) + runs],
    }
