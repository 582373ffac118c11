"""Synchronous all_to_all_single vs the BLS channel on W local gloo ranks, under injected delays.

Every configuration runs the same per-iteration work on every rank: exchange iteration k (random
splits around --rows rows of --dim float32 per peer), then consume it: touch the received rows, run
an optional fixed compute (--compute-ms) and sleep the rank's delay for k from a seeded schedule
(blsgpu.bench.delays), the same schedule for sync and BLS.

- sync: blocking ``dist.all_to_all_single`` into a fresh receive buffer. With --splits exchanged
  (default) the counts travel first in their own all_to_all_single, as a real alltoallv whose
  receiver does not know the splits must do; BLS then also learns them from its headers. With
  --splits known both sides are told the receive splits.
- new: the sync run again on a gloo group made for it (``dist.new_group``), as each BLS channel
  makes its own groups: on a small host the same collective runs at another speed on new
  connections and threads than on the default group, so BLS is also compared with this
  ("vs new"; perf/README.md, "Hot path, fourth pass").
- bls B: ``blsgpu.BoundedLagAllToAll(bound=B)`` driven as a pipeline: post k+B, wait k, consume k.

Time of a configuration: max over ranks of the timed loop (after --warmup untimed iterations, 1000 by
default, and a barrier); medians over --repeats. Masking (docs/design.md) = (T_sync - T_bls) /
(T_sync - T_ideal), T_ideal = T_none + max over ranks of that rank's injected delays summed,
T_none = the sync run without delays. Each ratio is
taken within one repeat, then the median over repeats is reported. blsgpu.bench.sim predicts every figure
from the same schedule and the measured T_none, with the exchange modelled either as latency ("lat")
or as each rank's busy time ("cpu"); the two bracket a small host. Every BLS run is also checked
against the sync run of the same delay model: per-iteration checksums of what each rank received.

With --pin, each rank and every thread it makes (gloo's too) is bound to one core, as a launcher that
binds ranks to cores does; without it (the default, and what the targets are read on) the scheduler
places every thread.

Usage: python perf/bench_exchange.py [--iters 100 --repeats 5 --delays none,exp:10,...] [--pin] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import blsgpu
from blsgpu.bench import sim
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.record import Record, provenance, write_report

NAME = "bench_exchange"
DEFAULT_DELAYS = "none,exp:10,straggler:1:10,rotate:10"
TARGET_MASKING = 0.9  # at the largest bound under exponential delays
# BLS / sync throughput without delays: known splits may lose 5% at B=0 (the sync exchange is one
# alltoall, BLS adds its engine); from B=1 on, and with exchanged splits at every B, BLS must not
# lose.
TARGET_NONE_RATIO = {"known": {0: 0.95}, "default": 1.0}
# The synchronous baseline run again on a gloo group made for it, the way every BLS channel makes
# its own: on a small host a new group's connections and threads run the same collective at a
# speed that differs from the default group's, and from one new group to the next (perf/README.md).
NEW_GROUP = "new-group"


def _none_target(splits: str, bound: int) -> float:
    return TARGET_NONE_RATIO.get(splits, {}).get(bound, TARGET_NONE_RATIO["default"])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _split_matrix(iters: int, world_size: int, rows: int, seed: int) -> np.ndarray:
    """S[k, src, dst]: rows src sends dst in iteration k, uniform in [rows/2, 3 rows/2]."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.integers(rows // 2, rows + rows // 2 + 1, size=(iters, world_size, world_size))


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Rank:
    """One rank's data and loops; every loop returns (loop seconds, per-iteration checksums)."""

    def __init__(self, rank: int, world_size: int, cfg: dict):
        self.rank, self.W, self.cfg = rank, world_size, cfg
        S = _split_matrix(cfg["iters"] + cfg["warmup"], world_size, cfg["rows"], cfg["seed"])
        self.send_splits = [S[k, rank].tolist() for k in range(len(S))]
        self.recv_splits = [S[k, :, rank].tolist() for k in range(len(S))]
        most = int(S[:, rank].sum(axis=1).max())
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        self.data = torch.randn(most, cfg["dim"], generator=g)
        self.known = cfg["splits"] == "known"
        self.compute_s = cfg["compute_ms"] / 1e3
        self.slept_s = 0.0  # measured time in the injected sleeps (oversleep shows a loaded host)

    def _send(self, i: int) -> torch.Tensor:
        return self.data[: sum(self.send_splits[i])]

    def _consume(self, recv: torch.Tensor, delay_s: float) -> float:
        check = float(recv.sum(dtype=torch.float64))  # touch every received row
        if self.compute_s:
            _spin(self.compute_s)
        if delay_s > 0:
            t0 = time.perf_counter()
            time.sleep(delay_s)
            self.slept_s += time.perf_counter() - t0
        return check

    def sync_loop(self, first: int, n: int, delays: list[float] | None, group=None) -> tuple[float, list]:
        W = self.W
        checks = []
        t0 = time.perf_counter()
        for j in range(n):
            i = first + j
            send, ss = self._send(i), self.send_splits[i]
            if self.known:
                rs = self.recv_splits[i]
            else:
                counts = torch.empty(W, dtype=torch.int64)
                dist.all_to_all_single(counts, torch.tensor(ss, dtype=torch.int64), group=group)
                rs = counts.tolist()
            recv = torch.empty(sum(rs), send.shape[1], dtype=send.dtype)
            dist.all_to_all_single(recv, send, rs, ss, group=group)
            checks.append(self._consume(recv, delays[j] if delays else 0.0))
        return time.perf_counter() - t0, checks

    def bls_loop(self, a2a, first: int, n: int, delays: list[float] | None) -> tuple[float, list]:
        B = a2a.bound
        checks = []
        handles: collections.deque = collections.deque()

        def post(j: int) -> None:
            i = first + j
            rs = self.recv_splits[i] if self.known else None
            handles.append(a2a.exchange(self._send(i), self.send_splits[i], rs))

        t0 = time.perf_counter()
        for j in range(min(B, n)):
            post(j)
        for j in range(n):
            if j + B < n:
                post(j + B)
            recv, _ = handles.popleft().wait()
            checks.append(self._consume(recv, delays[j] if delays else 0.0))
        return time.perf_counter() - t0, checks


def _pin(rank: int) -> None:
    """Every thread of this rank's process, and every thread it makes later (they inherit the
    affinity of the thread that makes them), on one core: rank r on core r mod cores, as a
    launcher that binds each rank to a core does."""
    cores = sorted(os.sched_getaffinity(0))
    core = {cores[rank % len(cores)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:  # the thread has exited since the listing
            pass


def _rank_main(rank: int, world_size: int, cfg: dict, schedules: dict) -> dict:
    """Runs every configuration of one repeat; returns {config: {loop_s, checks, stats}}."""
    if cfg["pin"]:
        _pin(rank)
    me = _Rank(rank, world_size, cfg)
    K, warm = cfg["iters"], cfg["warmup"]
    out: dict = {}
    for spec in cfg["delays"]:
        delays = schedules[spec][rank].tolist()
        for bound in [None, NEW_GROUP, *cfg["bounds"]]:
            key = f"{spec}|{'sync' if bound is None else bound}"
            me.slept_s = 0.0
            if bound is None or bound == NEW_GROUP:
                # The default group, or one made now, as each BLS channel makes its own (below).
                group = dist.new_group(backend="gloo") if bound == NEW_GROUP else None
                me.sync_loop(K, warm, None, group)  # warm-up on iterations past the timed ones
                gc.collect()  # a full collection pauses a rank for 100-300 ms: never inside a timed run
                dist.barrier()
                loop_s, checks = me.sync_loop(0, K, delays, group)
                stats = {}
                if group is not None:
                    dist.destroy_process_group(group)
            else:
                a2a = blsgpu.BoundedLagAllToAll(
                    bound=bound, name=f"bench-B{bound}", inline_bytes=cfg["inline_bytes"]
                )
                me.bls_loop(a2a, K, warm, None)
                gc.collect()
                dist.barrier()
                before = a2a.stats()
                loop_s, checks = me.bls_loop(a2a, 0, K, delays)
                stats = a2a.stats()
                for k in ("blocked_on_bound_s", "waiting_for_data_s"):  # timed loop only
                    stats[k] -= before[k]
                a2a.close()
            dist.barrier()
            out[key] = {"loop_s": loop_s, "checks": checks, "stats": stats, "slept_s": me.slept_s}
    return out


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _simulate(base, delay, comm_s: float, bound: int | None) -> dict[str, float]:
    """Simulated time, speedup and masking of one configuration (bound None: sync)."""
    work = base + delay
    t_sync = sim.simulate_sync(work, comm_s).total_s
    t = t_sync if bound is None else sim.simulate_bls(work, bound, comm_s).total_s
    t_ideal = sim.ideal_time(base, delay, comm_s)
    return {"time_s": t, "speedup": t_sync / t, "masking": sim.masking(t_sync, t, t_ideal)}


def _analyse(cfg: dict, schedules: dict, repeats: list[dict]) -> tuple[list[dict], dict]:
    """Per-configuration medians of times and of per-repeat ratios, measured and simulated.

    Two simulator models bracket this host: "lat" treats the measured exchange time as latency
    after the last post (it overlaps other ranks' delays), "cpu" as each rank's own busy time
    (nothing overlaps it: right when the exchange is CPU-bound on an oversubscribed host).
    """
    W, K = cfg["world_size"], cfg["iters"]
    compute = np.full((W, K), cfg["compute_ms"] / 1e3)
    rows: list[dict] = []
    for spec in cfg["delays"]:
        delay = schedules[spec]
        # Delay a synchronous run pays beyond the slowest rank's own: what BLS can hide at best.
        hideable = float(delay.max(axis=0).sum() - delay.sum(axis=1).max())
        for bound in [None, NEW_GROUP, *cfg["bounds"]]:
            key = f"{spec}|{'sync' if bound is None else bound}"
            per: dict[str, list[float]] = collections.defaultdict(list)
            for rep in repeats:
                t_none = max(r["none|sync"]["loop_s"] for r in rep)
                t_sync = max(r[f"{spec}|sync"]["loop_s"] for r in rep)
                t_new = max(r[f"{spec}|{NEW_GROUP}"]["loop_s"] for r in rep)
                t = max(r[key]["loop_s"] for r in rep)
                t_ideal = t_none + float(delay.sum(axis=1).max())
                per["time_s"].append(t)
                per["speedup"].append(t_sync / t)
                per["speedup_new_group"].append(t_new / t)
                per["vs_none"].append(t_none / t)
                per["masking"].append(sim.masking(t_sync, t, t_ideal) if hideable > 1e-9 else math.nan)
                per["t_ideal_s"].append(t_ideal)
                per["oversleep_s"].append(
                    max(r[key]["slept_s"] - d for r, d in zip(rep, delay.sum(axis=1), strict=True))
                )
                models = {
                    "lat": (compute, sim.fit_comm_s(t_none, compute)),
                    "cpu": (np.full((W, K), t_none / K), 0.0),
                }
                for name, (base, comm) in models.items():
                    for k, v in _simulate(base, delay, comm, _bls_bound(bound)).items():
                        if k == "masking" and not hideable > 1e-9:
                            v = math.nan
                        per[f"sim_{name}_{k}"].append(v)
                if _bls_bound(bound) is not None:
                    for k in ("max_lag", "blocked_on_bound_s", "waiting_for_data_s"):
                        per[k].append(max(r[key]["stats"][k] for r in rep))
                # BLS must deliver what the synchronous exchange delivers, iteration by iteration.
                per["exact"].append(float(all(r[key]["checks"] == r[f"{spec}|sync"]["checks"] for r in rep)))
            row = {
                "delay": spec,
                "provider": "sync" if bound is None else "sync-new-group" if bound == NEW_GROUP else "bls",
                "bound": _bls_bound(bound),
                "hideable_s": hideable,
            }
            row.update({k: _median(v) for k, v in per.items()})
            row["exact"] = all(x == 1.0 for x in per["exact"])
            row["time_s_all"] = per["time_s"]
            row["iters_per_s"] = K / row["time_s"]
            rows.append(row)
    return rows, _summary(cfg, rows)


def _bls_bound(bound: int | str | None) -> int | None:
    """B of a BLS configuration; None for the synchronous ones."""
    return bound if isinstance(bound, int) else None


def _summary(cfg: dict, rows: list[dict]) -> dict:
    big = max(cfg["bounds"]) if cfg["bounds"] else None
    exp_rows = [r for r in rows if r["delay"].startswith("exp") and r["bound"] == big]
    none_rows = [r for r in rows if r["delay"] == "none" and r["bound"] is not None]
    return {
        "masking_exp_at_max_bound": {r["delay"]: r["masking"] for r in exp_rows},
        "masking_target": TARGET_MASKING,
        "masking_met": bool(exp_rows) and all(r["masking"] >= TARGET_MASKING for r in exp_rows),
        "none_ratio_by_bound": {r["bound"]: r["speedup"] for r in none_rows},
        "none_ratio_target": {r["bound"]: _none_target(cfg["splits"], r["bound"]) for r in none_rows},
        "none_ratio_met": bool(none_rows)
        and all(r["speedup"] >= _none_target(cfg["splits"], r["bound"]) for r in none_rows),
        # The same ratios against the synchronous exchange on a group as new as each channel's.
        "none_ratio_new_group_by_bound": {r["bound"]: r["speedup_new_group"] for r in none_rows},
        "none_ratio_new_group_met": bool(none_rows)
        and all(r["speedup_new_group"] >= _none_target(cfg["splits"], r["bound"]) for r in none_rows),
        # Ranks outnumber cores: a sleeping rank frees a core for the others, so T_ideal is no
        # floor and measured masking can exceed 1. The simulator's masking is the figure to read.
        "oversubscribed": cfg["world_size"] > _cores(),
        "cores": _cores(),
        "pinned": cfg["pin"],  # each rank bound to one core (--pin): another regime than the default
        "exact": all(r["exact"] for r in rows),
    }


def _records(cfg: dict, rows: list[dict], prov) -> list[Record]:
    common = {
        k: cfg[k]
        for k in ("world_size", "iters", "warmup", "repeats", "rows", "dim", "splits", "compute_ms", "seed")
    }
    units = {"iters_per_s": "it/s", "time_s": "s", "sim_lat_time_s": "s", "sim_cpu_time_s": "s"}
    # Masking is null for sync rows (and where the schedule leaves nothing to hide).
    ratios = (
        "speedup",
        "speedup_new_group",
        "masking",
        "sim_lat_speedup",
        "sim_cpu_speedup",
        "sim_lat_masking",
        "sim_cpu_masking",
    )
    return [
        Record.from_row(
            NAME,
            r["provider"],
            {**common, "delay": r["delay"], "bound": r["bound"]},
            r,
            units,
            prov,
            ratios,
            baseline="sync",
            quantiles={
                "time_s": {"min": min(r["time_s_all"]), "median": r["time_s"], "max": max(r["time_s_all"])}
            },
        )
        for r in rows
    ]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print_table(rows: list[dict]) -> None:
    head = (
        f"{'delay':<15} {'run':>5} {'time_s':>7} {'it/s':>6} | {'speedup':>7} {'vs new':>6} "
        f"{'sim lat':>7} {'cpu':>5} | {'masking':>7} {'sim lat':>7} {'cpu':>5} | "
        f"{'lag':>3} {'bound_s':>7} {'wait_s':>7} {'ovsl_s':>6} exact"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        bls = r["bound"] is not None
        m = (lambda v, f: _fmt(v, f)) if bls else (lambda v, f: _fmt(None, f))
        run = "B=" + str(r["bound"]) if bls else "sync" if r["provider"] == "sync" else "new"
        print(
            f"{r['delay']:<15} {run:>5} "
            f"{r['time_s']:7.3f} {r['iters_per_s']:6.1f} | {r['speedup']:7.3f} {r['speedup_new_group']:6.3f} "
            f"{r['sim_lat_speedup']:7.2f} {r['sim_cpu_speedup']:5.2f} | "
            f"{m(r['masking'], '7.3f'):>7} {m(r['sim_lat_masking'], '7.2f'):>7} "
            f"{m(r['sim_cpu_masking'], '5.2f'):>5} | {m(r.get('max_lag'), '3.0f'):>3} "
            f"{m(r.get('blocked_on_bound_s'), '7.3f'):>7} "
            f"{m(r.get('waiting_for_data_s'), '7.3f'):>7} {r['oversleep_s']:6.3f} "
            f"{'yes' if r['exact'] else 'NO'}"
        )
    print(
        "speedup = T_sync/T of the same delay model; vs new: T_new/T, T_new of the sync run on a gloo "
        "group made for it, as each channel makes its own (run 'new'); masking per docs/design.md "
        "(n/a: nothing to hide);"
        " sim lat/cpu: blsgpu.bench.sim with the exchange as latency / as busy time; lag: max_lag; "
        "bound_s, wait_s: blocked on the bound / waiting for data (max over ranks); ovsl_s: "
        "oversleep of the injected sleeps (max over ranks)"
    )


def _plot(cfg: dict, rows: list[dict], path: Path) -> None:
    import matplotlib  # plotting is optional

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    bounds = cfg["bounds"]
    for i, spec in enumerate(cfg["delays"]):
        mine = {r["bound"]: r for r in rows if r["delay"] == spec and r["bound"] is not None}
        color = f"C{i}"
        for ax, metric in ((ax_m, "masking"), (ax_s, "speedup")):
            ys = [mine[b][metric] for b in bounds]
            if all(math.isnan(y) for y in ys):
                continue  # nothing to hide under this model (e.g. a constant straggler)
            ax.plot(bounds, ys, "o-", color=color, label=f"{spec} measured")
            ax.plot(
                bounds,
                [mine[b][f"sim_cpu_{metric}"] for b in bounds],
                "x--",
                color=color,
                alpha=0.6,
                label=f"{spec} sim",
            )
    ax_m.axhline(TARGET_MASKING, color="gray", ls=":", lw=1)
    ax_m.set(
        title="delay masking (1 = all but the slowest rank's own delay hidden)",
        xlabel="bound B",
        ylabel="masking",
    )
    ax_s.axhline(1.0, color="gray", ls=":", lw=1)
    ax_s.set(
        title="speedup of BLS over synchronous all_to_all_single", xlabel="bound B", ylabel="T_sync / T_bls"
    )
    for ax in (ax_m, ax_s):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(bounds, [str(b) for b in bounds])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"W={cfg['world_size']} gloo ranks, {cfg['iters']} iterations, "
        f"~{cfg['rows']}x{cfg['dim']} fp32 rows per peer, splits {cfg['splits']}, "
        f"median of {cfg['repeats']} (dashed: blsgpu.bench.sim, exchange as busy time)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per run")
    ap.add_argument(
        "--warmup",
        type=int,
        default=1000,
        help="untimed iterations before each run (a new channel runs slower for its first ~1000 "
        "iterations on a small host: perf/README.md)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bounds", default="0,1,2,4,8", help="comma-separated B values")
    ap.add_argument(
        "--delays",
        default=DEFAULT_DELAYS,
        help="comma-separated blsgpu.bench.delays specs; 'none' is always run (T_none)",
    )
    ap.add_argument("--rows", type=int, default=256, help="mean rows per peer per iteration")
    ap.add_argument("--dim", type=int, default=64, help="float32 columns per row")
    ap.add_argument(
        "--splits",
        choices=("exchanged", "known"),
        default="exchanged",
        help="exchanged: counts travel first (sync: an extra all_to_all_single, BLS: "
        "its headers); known: both are told the receive splits",
    )
    ap.add_argument(
        "--compute-ms",
        type=float,
        default=0.0,
        help="fixed busy compute per iteration per rank (oversubscribes small hosts)",
    )
    ap.add_argument(
        "--inline-bytes",
        type=int,
        default=None,
        help="BLS channels' inline capacity per peer (default: the channel's)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="bind each rank (all its threads, gloo's included) to one core, rank r to core r mod "
        "cores; default: the scheduler places every thread",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=1200.0, help="per repeat")
    args = ap.parse_args(argv)
    try:
        args.bounds = sorted({int(b) for b in args.bounds.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--bounds must be comma-separated integers, got {args.bounds!r}")
    if any(b < 0 for b in args.bounds):
        ap.error("--bounds must be >= 0")
    specs = [s.strip() for s in args.delays.split(",") if s.strip()]
    try:
        models = [DelayModel.parse(s) for s in specs]
    except ValueError as e:
        ap.error(str(e))
    if any(m.kind == "skew" for m in models) and not args.compute_ms > 0:
        ap.error("a skew delay scales the compute: give --compute-ms > 0")
    names = [str(m) for m in models]
    args.delays = ["none"] + [n for n in dict.fromkeys(names) if n != "none"]
    for name, value in (
        ("--world-size", args.world_size),
        ("--iters", args.iters),
        ("--repeats", args.repeats),
        ("--rows", args.rows),
        ("--dim", args.dim),
    ):
        if value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    if args.world_size < 2:
        ap.error("--world-size must be >= 2 for an exchange")
    if args.warmup < 0 or args.compute_ms < 0:
        ap.error("--warmup and --compute-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = {
        "world_size": args.world_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "bounds": args.bounds,
        "delays": args.delays,
        "rows": args.rows,
        "dim": args.dim,
        "splits": args.splits,
        "compute_ms": args.compute_ms,
        "seed": args.seed,
        "inline_bytes": args.inline_bytes,
        "pin": args.pin,
    }
    schedules = {
        spec: DelayModel.parse(spec).schedule(
            args.world_size, args.iters, args.seed, base_ms=args.compute_ms or None
        )
        for spec in args.delays
    }
    t_start = time.perf_counter()
    load_start = os.getloadavg()  # other work on the host shows up as noise; record it
    repeats = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        repeats.append(
            blsgpu.run_world(args.world_size, _rank_main, cfg, schedules, timeout_s=args.timeout_s)
        )
        print(f"repeat {i + 1}/{args.repeats}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows, summary = _analyse(cfg, schedules, repeats)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["loadavg_1m"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    _print_table(rows)
    if summary["oversubscribed"]:
        print(
            f"OVERSUBSCRIBED: {args.world_size} ranks on {summary['cores']} cores; measured "
            "masking can exceed 1 (a sleeping rank frees a core): read the simulator's (sim lat/cpu)"
        )
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "masking_exp_at_max_bound",
                    "masking_met",
                    "none_ratio_by_bound",
                    "none_ratio_met",
                    "oversubscribed",
                    "pinned",
                    "exact",
                )
            },
            default=str,
        )
    )

    prov = provenance(backend="gloo")
    write_report(
        args.out,
        NAME,
        {**summary, "config": cfg, "machine": prov.machine, "commit": prov.commit},
        _records(cfg, rows, prov),
        rows,
        None if args.no_plot else lambda path: _plot(cfg, rows, path),
    )
    return 0 if summary["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
