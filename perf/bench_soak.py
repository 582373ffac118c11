"""Soak: one BLS channel on W local gloo ranks for a long run; every row checked, nothing may grow.

Each rank drives ``blsgpu.BoundedLagAllToAll(bound=B)`` as a pipeline (post k, wait k-B, consume
k-B) for --iterations iterations. Splits are random in every iteration (seeded: every rank draws the
same [W, W] matrix for iteration k, so a receiver knows what it must get without being told), and
every row carries its own address (iteration, source, destination, row, column), so each received
row is checked exactly. After consuming iteration k a rank sleeps its seeded delay for k
(blsgpu.bench.delays, default rare spikes).

Every --window iterations each rank records its resident memory (RSS), its threads (the OS count:
the channels' and gloo's threads too), its open descriptors, and the wall time of the window, with
and without the injected sleeps. The summary compares the first window after --warmup with the last:
nothing may grow (RSS within max(16 MiB, 5 %), threads and descriptors equal, time per 1000
iterations within 1.5x). Not run in CI: 100,000 iterations take minutes.

Usage: python perf/bench_soak.py [--iterations 100000 --world-size 4 --bound 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

import blsgpu
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.record import Record, provenance, write_report

NAME = "bench_soak"
RSS_SLACK_BYTES = 16 << 20
RSS_SLACK_RATIO = 0.05
TIME_SLACK_RATIO = 1.5


def _splits(seed: int, k: int, world_size: int, max_rows: int) -> np.ndarray:
    """S[src, dst]: rows src sends dst in iteration k (the same matrix on every rank)."""
    return np.random.default_rng([seed, k]).integers(0, max_rows + 1, size=(world_size, world_size))


def _rows(k: int, src: int, dst: int, n: int, W: int, cols):
    """The n rows src sends dst in iteration k: each value is its own address."""
    import torch

    base = ((k * W + src) * W + dst) << 20
    return base + (torch.arange(n, dtype=torch.int64)[:, None] << 8) + cols


def _proc_status() -> tuple[int, int, int]:
    """(RSS bytes, OS threads, open descriptors) of this process."""
    rss = threads = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads, len(os.listdir("/proc/self/fd"))


def _rank_main(rank: int, world_size: int, cfg: dict) -> dict:
    import torch

    W, B, K = world_size, cfg["bound"], cfg["iterations"]
    seed, max_rows, window = cfg["seed"], cfg["max_rows"], cfg["window"]
    cols = torch.arange(cfg["dim"], dtype=torch.int64)
    delays = DelayModel.parse(cfg["delay"]).schedule(W, K, seed)[rank].tolist()
    samples: list[dict] = []
    rows_checked = 0
    slept = 0.0
    mismatches: list[str] = []

    a2a = blsgpu.BoundedLagAllToAll(bound=B, name="soak", timeout=cfg["channel_timeout_s"])
    pending: collections.deque = collections.deque()
    t_window = time.perf_counter()
    slept_window = 0.0

    def consume(j: int, S: np.ndarray, handle) -> None:
        nonlocal rows_checked, slept, slept_window, t_window
        recv, recv_splits = handle.wait()
        want = S[:, rank].tolist()
        expected = torch.cat([_rows(j, src, rank, want[src], W, cols) for src in range(W)])
        if list(recv_splits) != want or not torch.equal(recv, expected):
            if len(mismatches) < 10:
                mismatches.append(f"iteration {j}: splits {list(recv_splits)} (expected {want})")
        else:
            rows_checked += int(recv.shape[0])
        if delays[j] > 0:
            t0 = time.perf_counter()
            time.sleep(delays[j])
            dt = time.perf_counter() - t0
            slept += dt
            slept_window += dt
        if (j + 1) % window == 0 or j + 1 == K:
            now = time.perf_counter()
            rss, threads, fds = _proc_status()
            n = window if (j + 1) % window == 0 else (j + 1) % window
            samples.append(
                {
                    "rank": rank,
                    "iteration": j + 1,
                    "rss_bytes": rss,
                    "threads": threads,
                    "fds": fds,
                    "ms_per_1000": (now - t_window) / n * 1e6,
                    "ms_per_1000_without_delays": (now - t_window - slept_window) / n * 1e6,
                }
            )
            t_window, slept_window = now, 0.0

    t0 = time.perf_counter()
    for k in range(K):
        S = _splits(seed, k, W, max_rows)
        send = torch.cat([_rows(k, rank, dst, int(S[rank, dst]), W, cols) for dst in range(W)])
        pending.append((k, S, a2a.exchange(send, S[rank].tolist())))
        if len(pending) > B:
            consume(*pending.popleft())
    while pending:
        consume(*pending.popleft())
    elapsed = time.perf_counter() - t0
    stats = a2a.stats()
    a2a.close()
    expected_rows = int(sum(_splits(seed, k, W, max_rows)[:, rank].sum() for k in range(K)))
    return {
        "rank": rank,
        "samples": samples,
        "rows_checked": rows_checked,
        "rows_expected": expected_rows,
        "mismatches": mismatches,
        "elapsed_s": elapsed,
        "slept_s": slept,
        "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))},
    }


def _start_end(samples: list[dict], warmup: int) -> tuple[dict, dict]:
    """The first sample after the warm-up, and the last."""
    after = [s for s in samples if s["iteration"] > warmup] or samples
    return after[0], samples[-1]


def _analyse(cfg: dict, results: list[dict]) -> dict:
    per_rank = []
    for r in results:
        start, end = _start_end(r["samples"], cfg["warmup"])
        rss_limit = max(RSS_SLACK_BYTES, RSS_SLACK_RATIO * start["rss_bytes"])
        per_rank.append(
            {
                "rank": r["rank"],
                "start": start,
                "end": end,
                "rss_growth_bytes": end["rss_bytes"] - start["rss_bytes"],
                "rss_flat": end["rss_bytes"] - start["rss_bytes"] <= rss_limit,
                "threads_flat": end["threads"] <= start["threads"],
                "fds_flat": end["fds"] <= start["fds"],
                "time_flat": end["ms_per_1000_without_delays"]
                <= TIME_SLACK_RATIO * start["ms_per_1000_without_delays"],
                "exact": r["rows_checked"] == r["rows_expected"] and not r["mismatches"],
                "rows_checked": r["rows_checked"],
                "mismatches": r["mismatches"],
                "elapsed_s": r["elapsed_s"],
                "slept_s": r["slept_s"],
                "max_lag": r["stats"].get("max_lag"),
            }
        )
    flat = all(p[k] for p in per_rank for k in ("rss_flat", "threads_flat", "fds_flat"))
    return {
        "exact": all(p["exact"] for p in per_rank),
        "rows_checked": sum(p["rows_checked"] for p in per_rank),
        "flat": flat,
        "time_flat": all(p["time_flat"] for p in per_rank),
        "per_rank": per_rank,
    }


def _records(cfg: dict, summary: dict, prov) -> list[Record]:
    """One record per rank: its first and last window after warm-up ("_start", "_end")."""
    config = {
        k: cfg[k]
        for k in ("world_size", "bound", "iterations", "warmup", "window", "max_rows", "dim", "delay", "seed")
    }
    units = {
        "rss_bytes": "B",
        "threads": "count",
        "fds": "count",
        "ms_per_1000": "ms",
        "ms_per_1000_without_delays": "ms",
        "iteration": "iterations",
    }
    recs = []
    for p in summary["per_rank"]:
        row = {f"{k}_{point}": p[point][k] for point in ("start", "end") for k in units}
        recs.append(
            Record.from_row(
                NAME,
                "bls",
                {**config, "rank": p["rank"]},
                row,
                prov=prov,
                units={f"{k}_{point}": u for point in ("start", "end") for k, u in units.items()},
            )
        )
    return recs


def _print(summary: dict) -> None:
    head = (
        f"{'rank':>4} {'iter':>8} {'RSS MiB':>15} {'threads':>9} {'fds':>9} "
        f"{'ms/1000':>15} {'rows':>10} exact flat"
    )
    print(head)
    print("-" * len(head))
    for p in summary["per_rank"]:
        s, e = p["start"], p["end"]
        print(
            f"{p['rank']:>4} {e['iteration']:>8} "
            f"{s['rss_bytes'] / 2**20:7.1f}>{e['rss_bytes'] / 2**20:<7.1f} "
            f"{s['threads']:>4}>{e['threads']:<4} {s['fds']:>4}>{e['fds']:<4} "
            f"{s['ms_per_1000_without_delays']:7.1f}>{e['ms_per_1000_without_delays']:<7.1f} "
            f"{p['rows_checked']:>10} {'yes' if p['exact'] else 'NO':>5} "
            f"{'yes' if p['rss_flat'] and p['threads_flat'] and p['fds_flat'] else 'NO':>4}"
        )
    print("start>end: the first window after the warm-up > the last; ms/1000 without the injected sleeps")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument(
        "--warmup",
        type=int,
        default=5_000,
        help="iterations before the start point (allocators and caches settle)",
    )
    ap.add_argument("--window", type=int, default=1000, help="iterations per sample")
    ap.add_argument("--bound", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=32, help="rows per peer: uniform in [0, this]")
    ap.add_argument("--dim", type=int, default=8, help="int64 columns per row")
    ap.add_argument("--delay", default="spikes:0.002:5", help="a blsgpu.bench.delays spec")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channel-timeout-s", type=float, default=300.0)
    ap.add_argument("--timeout-s", type=float, default=6 * 3600.0, help="the whole soak")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.world_size < 2:
        ap.error("--world-size must be >= 2")
    for name in ("iterations", "window", "max_rows", "dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.bound < 0:
        ap.error("--warmup and --bound must be >= 0")
    if args.warmup + args.window > args.iterations:
        ap.error("--iterations must exceed --warmup by at least one --window")
    if args.dim > 256 or args.max_rows >= 4096:
        ap.error("--dim must be <= 256 and --max-rows < 4096 (rows carry their address)")
    try:
        args.delay = str(DelayModel.parse(args.delay))
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = {
        "world_size": args.world_size,
        "bound": args.bound,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "window": args.window,
        "max_rows": args.max_rows,
        "dim": args.dim,
        "delay": args.delay,
        "seed": args.seed,
        "channel_timeout_s": args.channel_timeout_s,
    }
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    results = blsgpu.run_world(args.world_size, _rank_main, cfg, timeout_s=args.timeout_s)
    summary = _analyse(cfg, results)
    summary["wall_s"] = time.perf_counter() - t0
    summary["loadavg_1m"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    _print(summary)
    prov = provenance(backend="gloo")
    rows = [s for r in results for s in r["samples"]]
    write_report(
        args.out,
        NAME,
        {**summary, "config": cfg, "machine": prov.machine, "commit": prov.commit},
        _records(cfg, summary, prov),
        rows,
    )
    print(
        f"exact: {'yes' if summary['exact'] else 'NO'} ({summary['rows_checked']:,} rows "
        f"checked); flat after warm-up: {'yes' if summary['flat'] else 'NO'}; time per 1000 "
        f"iterations flat: {'yes' if summary['time_flat'] else 'NO'}"
    )
    return 0 if summary["exact"] and summary["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
