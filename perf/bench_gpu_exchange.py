"""BLS exchange on a GPU: NCCL alltoall vs BLS at W=1, and delay masking in the single-GPU W-rank mode.

Part "w1" (one process, world size 1, 1 MiB per peer by default): torch.distributed's NCCL
``all_to_all_single`` against ``BoundedLagAllToAll(bound=4, transport="nccl")`` driven as a pipeline
(post k+B, wait k, consume k). Both consume each result the same way on the GPU (a reduction, plus
an optional fixed GPU compute of --compute-us). Reports iterations/s, algbw (bytes each rank sends
per iteration / time per iteration) and the BLS/NCCL throughput ratio. Target: >= 0.95 at B=4.

Part "local" (blsgpu.transport.local.run_local, W ranks as W stream sets on one GPU): every rank's consumer
sleeps on its own stream for its delay of iteration k (seeded blsgpu.bench.delays schedule, a spin kernel:
the host never waits), B in --bounds. B=0 is lock-step, so it is the synchronous reference: T_none =
B=0 without delays, T_sync = B=0 with them, T_ideal = T_none + max over ranks of that rank's delays
summed, masking = (T_sync - T_bls) / (T_sync - T_ideal) (docs/design.md). Target: masking >= 0.9 at B=8.
Each configuration's per-rank checksums of every received tensor must agree with B=0's (exact).

Times: wall clock from a start barrier to the device being idle again (torch.cuda.synchronize),
after --warmup iterations; medians over --repeats.

Usage: python perf/bench_gpu_exchange.py [--quick] [--parts w1,local] [--out DIR]
       python perf/bench_gpu_exchange.py --cpu-dry-run   (part "local" on CPU threads with host
       sleeps: checks the script, its JSON and plot; its numbers mean nothing for a GPU)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import blsgpu
from blsgpu import _provenance
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.gpu_sleep import gpu_sleep
from blsgpu.bench.record import Provenance, Record, write_json
from blsgpu.transport.local import run_local

NAME = "bench_gpu_exchange"
TARGET_RATIO = 0.95  # BLS B=4 / NCCL alltoall throughput, no delays
TARGET_MASKING = 0.9  # at B=8 in the local mode under exponential delays


def _machine(gpu: bool) -> dict:
    info = _provenance.machine()
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        try:
            info["nccl_torch"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:
            info["nccl_torch"] = f"unavailable: {e}"
        try:
            import cupy

            from blsgpu.counters import device as _device_counters
            from blsgpu.transport import nccl_lib as _nccl

            info["cupy"] = cupy.__version__
            info["nccl_cupy"] = _nccl.nccl_version_str(_nccl.import_nccl().get_version())
            info["libnccl_check"] = _nccl.check_libnccl() or "one libnccl"
            dev = torch.device("cuda", 0)
            info["stream_ops"] = _device_counters.stream_ops(dev).name
            info["stream_ops_fallback"] = _device_counters.fallback_reason(dev)
        except Exception as e:
            info["cupy"] = f"unavailable: {type(e).__name__}: {e}"
    return info


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# part w1: NCCL alltoall vs BLS over NCCL, one GPU, world size 1


def _w1(args) -> list[dict]:
    import torch.distributed as dist

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    rows = args.bytes_per_peer // (4 * args.dim)
    send = torch.randn(rows, args.dim, device=dev)
    out = torch.empty_like(send)
    acc = torch.zeros((), dtype=torch.float64, device=dev)

    def consume(recv: torch.Tensor) -> None:
        acc.add_(recv.sum(dtype=torch.float64))
        if args.compute_us:
            gpu_sleep(args.compute_us / 1e6)

    def run_nccl(n: int) -> float:
        _sync(True)
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_to_all_single(out, send, [rows], [rows])
            consume(out)
        _sync(True)
        return time.perf_counter() - t0

    def run_bls(a2a, n: int, known: bool) -> float:
        bound = a2a.bound
        handles: collections.deque = collections.deque()
        _sync(True)
        t0 = time.perf_counter()
        for _ in range(min(bound, n)):
            handles.append(a2a.exchange(send, [rows], [rows] if known else None))
        for j in range(n):
            if j + bound < n:
                handles.append(a2a.exchange(send, [rows], [rows] if known else None))
            recv, _ = handles.popleft().wait()
            consume(recv)
        _sync(True)
        return time.perf_counter() - t0

    results: dict[str, list[float]] = collections.defaultdict(list)
    channels = {
        f"bls_B{b}": blsgpu.BoundedLagAllToAll(bound=b, device=dev, transport="nccl", name=f"w1-B{b}")
        for b in args.w1_bounds
    }
    run_nccl(args.warmup)
    for a2a in channels.values():
        run_bls(a2a, args.warmup, True)
        run_bls(a2a, args.warmup, False)
    for _ in range(args.repeats):  # interleaved, so drifts hit every provider alike
        results["nccl_a2a"].append(run_nccl(args.iters))
        for name, a2a in channels.items():
            results[f"{name}_known"].append(run_bls(a2a, args.iters, True))
            results[f"{name}_exchanged"].append(run_bls(a2a, args.iters, False))
    stats = {name: a2a.stats() for name, a2a in channels.items()}
    for a2a in channels.values():
        a2a.close()
    base = statistics.median(results["nccl_a2a"])
    rows_out = []
    for provider, times in results.items():
        t = statistics.median(times)
        rows_out.append(
            {
                "part": "w1",
                "provider": provider,
                "time_s": t,
                "times_s": times,
                "iters_per_s": args.iters / t,
                "algbw_GBps": args.bytes_per_peer * args.iters / t / 1e9,
                "ratio_vs_nccl": base / t,
                "stats": {
                    k: v
                    for k, v in stats.get(provider.rsplit("_", 1)[0], {}).items()
                    if k in ("max_lag", "blocked_on_bound_s", "waiting_for_data_s", "device")
                },
            }
        )
    return rows_out


# ------------------------------------------------------------------------------------------------
# part local: W stream sets on one GPU (or W host threads for --cpu-dry-run)


def _local_rank(rank, w, bound, cfg, delays, barrier, gpu):
    rows, dim, iters, warm = cfg["rows"], cfg["dim"], cfg["iters"], cfg["warmup"]
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    g = torch.Generator().manual_seed(1000 + rank)
    data = torch.randn(rows * w, dim, generator=g).to(dev)
    splits = [rows] * w
    sleep = gpu_sleep if gpu else time.sleep
    sums: list = []
    with blsgpu.BoundedLagAllToAll(bound=bound, timeout=120) as a2a:

        def loop(n: int, delay: list[float] | None) -> float:
            handles: collections.deque = collections.deque()
            t0 = time.perf_counter()
            for _ in range(min(bound, n)):
                handles.append(a2a.exchange(data, splits, splits))
            for j in range(n):
                if j + bound < n:
                    handles.append(a2a.exchange(data, splits, splits))
                recv, _ = handles.popleft().wait()
                if delay is not None:
                    sums.append(recv.sum(dtype=torch.float64))
                    sleep(delay[j])
            _sync(gpu)
            return t0

        loop(warm, None)
        _sync(gpu)
        barrier.wait()
        t0 = loop(iters, delays[rank])
        t1 = time.perf_counter()
        stats = a2a.stats()
    return t0, t1, [float(s) for s in sums], stats


def _local(args, gpu: bool) -> list[dict]:
    w, iters = args.world_size, args.iters
    cfg = {
        "rows": args.bytes_per_peer // (4 * args.dim),
        "dim": args.dim,
        "iters": iters,
        "warmup": args.warmup,
    }
    specs = ["none"] + [s for s in args.delays if s != "none"]
    schedules = {s: DelayModel.parse(s).schedule(w, iters, seed=args.seed) for s in specs}
    bounds = sorted(set([0, *args.bounds]))
    per: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        for spec in specs:
            for bound in bounds:
                barrier = threading.Barrier(w)
                res = run_local(
                    w,
                    _local_rank,
                    bound,
                    cfg,
                    schedules[spec].tolist(),
                    barrier,
                    gpu,
                    device="cuda" if gpu else "cpu",
                    timeout_s=600,
                )
                t = max(r[1] for r in res) - min(r[0] for r in res)
                per[(spec, bound)].append(
                    {
                        "time_s": t,
                        "sums": [r[2] for r in res],
                        "max_lag": max(r[3]["max_lag"] for r in res),
                        "device": [r[3].get("device") for r in res],
                    }
                )
    out = []
    for spec in specs:
        delay = schedules[spec]
        own_max = float(delay.sum(axis=1).max())
        for bound in bounds:
            runs = per[(spec, bound)]
            masks, speedups = [], []
            for i, run in enumerate(runs):
                t_none = per[("none", 0)][i]["time_s"]
                t_sync = per[(spec, 0)][i]["time_s"]
                t_ideal = t_none + own_max
                speedups.append(t_sync / run["time_s"])
                hideable = t_sync - t_ideal
                masks.append(
                    (t_sync - run["time_s"]) / hideable if spec != "none" and hideable > 0 else math.nan
                )
            exact = all(run["sums"] == per[(spec, 0)][i]["sums"] for i, run in enumerate(runs))
            t = statistics.median(r["time_s"] for r in runs)
            finite = [m for m in masks if not math.isnan(m)]
            out.append(
                {
                    "part": "local",
                    "provider": "bls",
                    "delay": spec,
                    "bound": bound,
                    "time_s": t,
                    "times_s": [r["time_s"] for r in runs],
                    "iters_per_s": iters / t,
                    "speedup_vs_B0": statistics.median(speedups),
                    "masking": statistics.median(finite) if finite else None,
                    "t_ideal_s": statistics.median(
                        per[("none", 0)][i]["time_s"] + own_max for i in range(len(runs))
                    ),
                    "max_lag": max(r["max_lag"] for r in runs),
                    "exact": exact,
                    "device_counts": runs[-1]["device"],
                }
            )
    return out


# ------------------------------------------------------------------------------------------------
# report


def _records(args, rows: list[dict], prov) -> list[Record]:
    """w1 rows: ratio_vs_nccl against torch's NCCL alltoall; local rows: speedup_vs_B0 and masking
    against the lock-step run (B=0)."""
    common = {
        "bytes_per_peer": args.bytes_per_peer,
        "dim": args.dim,
        "iters": args.iters,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compute_us": args.compute_us,
        "seed": args.seed,
        "dry_run": args.cpu_dry_run,
    }
    units = {"time_s": "s", "iters_per_s": "it/s", "algbw_GBps": "GB/s", "max_lag": "iterations"}
    recs = []
    for r in rows:
        if r["part"] == "w1":
            config = {**common, "part": "w1", "world_size": 1}
            ratios, baseline = ("ratio_vs_nccl",), "nccl_a2a"
        else:
            config = {
                **common,
                "part": "local",
                "world_size": args.world_size,
                "delay": r["delay"],
                "bound": r["bound"],
            }
            ratios, baseline = ("speedup_vs_B0", "masking"), "bls B=0"
        ts = r["times_s"]
        recs.append(
            Record.from_row(
                NAME,
                r["provider"],
                config,
                r,
                units,
                prov,
                ratios,
                baseline,
                {"time_s": {"min": min(ts), "median": r["time_s"], "max": max(ts)}},
            )
        )
    return recs


def _summary(rows: list[dict]) -> dict:
    w1 = {r["provider"]: r["ratio_vs_nccl"] for r in rows if r["part"] == "w1"}
    b4 = [v for k, v in w1.items() if k.startswith("bls_B4_")]
    loc = [r for r in rows if r["part"] == "local"]
    b8 = {r["delay"]: r["masking"] for r in loc if r["bound"] == 8 and r["delay"] != "none"}
    return {
        "w1_ratio_vs_nccl": w1,
        "w1_ratio_target": TARGET_RATIO,
        "w1_ratio_met": bool(b4) and min(b4) >= TARGET_RATIO,
        "local_masking_at_B8": b8,
        "local_masking_target": TARGET_MASKING,
        "local_masking_met": bool(b8) and all(m is not None and m >= TARGET_MASKING for m in b8.values()),
        "local_exact": all(r["exact"] for r in loc),
    }


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    w1 = [r for r in rows if r["part"] == "w1"]
    if w1:
        ax_w.bar(range(len(w1)), [r["iters_per_s"] for r in w1], color="C0")
        ax_w.set_xticks(range(len(w1)), [r["provider"] for r in w1], rotation=30, ha="right", fontsize=7)
        for i, r in enumerate(w1):
            ax_w.text(i, r["iters_per_s"], f"{r['ratio_vs_nccl']:.2f}x", ha="center", va="bottom", fontsize=7)
        ax_w.set(title="W=1: iterations/s (label: vs NCCL alltoall)", ylabel="it/s")
    else:
        ax_w.set_axis_off()
    loc = [r for r in rows if r["part"] == "local"]
    for i, spec in enumerate(sorted({r["delay"] for r in loc} - {"none"})):
        mine = sorted((r for r in loc if r["delay"] == spec), key=lambda r: r["bound"])
        xs = [r["bound"] for r in mine]
        ax_m.plot(
            xs,
            [r["masking"] if r["masking"] is not None else math.nan for r in mine],
            "o-",
            color=f"C{i}",
            label=f"masking, {spec}",
        )
        ax_m.plot(
            xs,
            [r["speedup_vs_B0"] for r in mine],
            "s--",
            color=f"C{i}",
            alpha=0.6,
            label=f"speedup vs B=0, {spec}",
        )
    ax_m.axhline(TARGET_MASKING, color="gray", ls=":", lw=1)
    ax_m.set(title="local W-rank mode: masking and speedup", xlabel="bound B")
    ax_m.set_xscale("symlog", linthresh=1)
    bounds = sorted({r["bound"] for r in loc})
    ax_m.set_xticks(bounds, [str(b) for b in bounds])
    ax_m.grid(alpha=0.3)
    if loc:
        ax_m.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="w1,local")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and repeats (gpu_check)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--bytes-per-peer", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=64, help="float32 columns per row")
    ap.add_argument(
        "--compute-us",
        type=float,
        default=0.0,
        help="w1: fixed GPU compute per iteration (0: the exchange alone)",
    )
    ap.add_argument("--w1-bounds", default="4")
    ap.add_argument("--world-size", type=int, default=4, help="local part")
    ap.add_argument("--bounds", default="0,1,2,4,8", help="local part")
    ap.add_argument("--delays", default="exp:5", help="local part: blsgpu.bench.delays specs (GPU sleeps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(args.parts) - {"w1", "local"}:
        ap.error(f"--parts takes w1 and/or local, got {args.parts}")
    args.iters = args.iters or (40 if args.quick else 200)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.w1_bounds = [int(b) for b in args.w1_bounds.split(",")]
    args.bounds = [int(b) for b in args.bounds.split(",")]
    args.delays = [str(DelayModel.parse(s.strip())) for s in args.delays.split(",") if s.strip()]
    if args.cpu_dry_run:
        args.parts = ["local"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    gpu = not args.cpu_dry_run
    if gpu and not torch.cuda.is_available():
        print("bench_gpu_exchange needs a CUDA GPU (or --cpu-dry-run to check the script)", file=sys.stderr)
        return 2
    machine = _machine(gpu)
    rows: list[dict] = []
    if "w1" in args.parts:
        rows += _w1(args)
    if "local" in args.parts:
        rows += _local(args, gpu)
    summary = _summary(rows)
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    for r in rows:
        if r["part"] == "w1":
            print(
                f"w1     {r['provider']:<20} {r['iters_per_s']:9.1f} it/s "
                f"{r['algbw_GBps']:8.2f} GB/s  {r['ratio_vs_nccl']:.3f}x NCCL"
            )
        else:
            m = "  n/a" if r["masking"] is None else f"{r['masking']:5.2f}"
            print(
                f"local  {r['delay']:<10} B={r['bound']:<2} {r['time_s']:7.3f} s  "
                f"speedup {r['speedup_vs_B0']:.2f}  masking {m}  lag {r['max_lag']}  "
                f"exact {r['exact']}"
            )
    print(json.dumps(summary))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = NAME + ("_cpu_dry_run" if args.cpu_dry_run else "") + (f"_{args.tag}" if args.tag else "")
    prov = Provenance(machine, _provenance.commit())
    write_json(
        out / f"{stem}.json",
        {"benchmark": NAME, "summary": summary, "records": _records(args, rows, prov), "rows": rows},
    )
    title = (
        f"{machine.get('gpu', 'CPU dry run (numbers mean nothing)')}, "
        f"{args.bytes_per_peer >> 10} KiB per peer, {args.iters} iterations, "
        f"median of {args.repeats}"
    )
    try:
        _plot(rows, out / f"{stem}.png", title)
    except Exception as e:  # a missing matplotlib must not lose the JSON
        print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"wrote {out / stem}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
