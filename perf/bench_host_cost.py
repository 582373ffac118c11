"""Host cost of the BLS engine per iteration: the real engine code over a transport that does no I/O.

One rank of a world of W drives a channel over MirrorTransport: every alltoall completes when it is
posted, and each peer "sends" this rank exactly what this rank sends it (balanced, symmetric
splits), so headers check out and every byte the engine gathers is real. What is left is what the
engine itself costs the host: argument checks, the send-slot copy, headers, the alltoall calls, the
header checks, the gather of inline payloads (or the data alltoall), releases and counters.

Times are CPU time of the threads that spend them, read once per run from each thread's CPU clock
(the caller's and the progress thread's), so other load on the host does not inflate them and no
per-call clock read (0.8 us each here) lands in them. The caller's CPU is split between exchange()
and wait() by the wall-clock share of each (perf_counter, 0.07 us a read). Reported per
iteration, medians over --repeats runs of --iters iterations:
  exchange_us  the caller's CPU inside exchange()
  process_us   deciding iterations (headers, data post, gather): the caller's share inside wait()
               plus all the progress thread's CPU
  wait_us      the caller's CPU inside wait() minus the deciding it did itself
  total_us     exchange + process + wait: the host time one iteration costs, whichever thread
  transport_us the fake transport's own copies (left out of exchange_us and total_us)
Payloads: --rows rows of --dim float32 per peer; "inline" rides behind the headers in the message
alltoall, "spill" is the same payload on a channel without inline capacity (the data alltoall).

Usage: python perf/bench_host_cost.py [--worlds 1,8,64] [--bounds 0,4] [--iters 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import blsgpu
from blsgpu.bench.record import Record, provenance, write_report
from blsgpu.counters.host import HostCounters
from blsgpu.exchange import channel as _exchange
from blsgpu.transport.gloo import _Done

NAME = "bench_host_cost"
GOALS_US = {8: 60.0, 64: 250.0}  # total per iteration


class MirrorTransport:
    """A transport of W ranks whose alltoalls complete at once, peers mirroring this rank."""

    name = "mirror"
    device = torch.device("cpu")
    stream_ordered = False
    inline_ok = True
    caller_may_receive = True

    def __init__(self, world_size: int):
        self.rank, self.world_size, self.channel_id = 0, world_size, 0
        self.spent = 0.0  # wall time inside alltoall()

    @staticmethod
    def connect(timeout_s: float) -> None:
        pass

    @staticmethod
    def agree_min(value: int) -> int:
        return value

    @staticmethod
    def staging(device: torch.device) -> None:
        return None

    @staticmethod
    def make_counters(world_size: int, rank: int, timeout_s: float) -> HostCounters:
        return HostCounters(world_size, rank)

    @staticmethod
    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def alltoall(self, kind, k, out, out_sizes, inp, in_sizes):
        # Timed apart: this is the fake's cost, not the engine's.
        t0 = _wall()
        o, i = out.numpy(), inp.numpy()
        # Rank 0's own part comes first in both buffers; every peer sends what it receives.
        n0, m0 = in_sizes[0], out_sizes[0]
        o[:n0] = i[:n0]
        s_in, s_out = in_sizes[-1], out_sizes[-1]
        if self.world_size > 1:
            w1 = self.world_size - 1
            o[m0 : m0 + w1 * s_out].reshape(w1, s_out)[:, :s_in] = i[n0:].reshape(w1, s_in)
        self.spent += _wall() - t0
        return _Done

    @staticmethod
    def wait_all(work, timeout_s):
        pass

    order_all = wait_all

    @staticmethod
    def blame(k, exc, grace_s):
        return [], False

    def close(self):
        pass

    def abort(self):
        pass


_wall = time.perf_counter


class _Timed:
    """Wall time the caller's thread spends in the engine's _process (the progress thread's share
    is read from its CPU clock instead)."""

    def __init__(self):
        self.on_caller = 0.0
        self.real = _exchange.BoundedLagAllToAll._process
        self.caller = threading.current_thread()

    def __call__(self, chan, it, *args):
        if threading.current_thread() is not self.caller:
            return self.real(chan, it, *args)
        t0 = _wall()
        try:
            return self.real(chan, it, *args)
        finally:
            self.on_caller += _wall() - t0


def _cpu_clock(thread: threading.Thread) -> int:
    return time.pthread_getcpuclockid(thread.ident)


def run_once(
    world_size: int, bound: int, iters: int, rows: int, dim: int, known: bool, inline_bytes: int | None = None
) -> dict:
    timed = _Timed()
    _exchange.BoundedLagAllToAll._process = lambda chan, it, *a: timed(chan, it, *a)
    try:
        mirror = MirrorTransport(world_size)
        a2a = blsgpu.BoundedLagAllToAll(
            bound=bound, transport=mirror, timeout=60, name="host-cost", inline_bytes=inline_bytes
        )
        send = torch.randn(rows * world_size, dim)
        splits = [rows] * world_size
        recv_splits = splits if known else None
        handles = []
        w_ex = w_wait = 0.0
        me_clock, progress_clock = _cpu_clock(threading.current_thread()), _cpu_clock(a2a._thread)
        c0, p0 = time.clock_gettime(me_clock), time.clock_gettime(progress_clock)
        for k in range(iters + bound):
            if k < iters:
                t0 = _wall()
                handles.append(a2a.exchange(send, splits, recv_splits))
                w_ex += _wall() - t0
            if k >= bound:
                t0 = _wall()
                recv, _ = handles.pop(0).wait()
                w_wait += _wall() - t0
        caller_cpu = time.clock_gettime(me_clock) - c0
        progress_cpu = time.clock_gettime(progress_clock) - p0
        a2a.close()
        assert torch.equal(recv, send), "the mirror must deliver what was sent"
    finally:
        _exchange.BoundedLagAllToAll._process = timed.real
    # The fake transport's copies are not the engine's cost (they run inside exchange()).
    w_ex -= mirror.spent
    caller_cpu = max(caller_cpu - mirror.spent, 0.0)
    # The caller's CPU split by where its wall time went (the loop's own few statements included).
    share = caller_cpu / max(w_ex + w_wait, 1e-12)
    exchange = w_ex * share
    process = timed.on_caller * share + progress_cpu
    wait = (w_wait - timed.on_caller) * share
    per = 1e6 / iters
    return {
        "exchange_us": exchange * per,
        "wait_us": wait * per,
        "process_us": process * per,
        "total_us": (exchange + wait + process) * per,
        "transport_us": mirror.spent * per,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,8,64")
    ap.add_argument("--bounds", default="0,4")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16, help="rows per peer (inline payloads)")
    ap.add_argument("--dim", type=int, default=16, help="float32 columns per row")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    bounds = [int(b) for b in args.bounds.split(",")]
    if min(worlds) < 1 or min(bounds) < 0 or args.iters < 1 or args.repeats < 1:
        ap.error("worlds >= 1, bounds >= 0, iters and repeats >= 1")
    torch.set_num_threads(1)
    rows_out = []
    for payload, inline_bytes in (("inline", None), ("spill", 0)):
        for known in (False, True):
            for w in worlds:
                for b in bounds:
                    run_once(w, b, min(args.iters, 100), args.rows, args.dim, known, inline_bytes)
                    reps = [
                        run_once(w, b, args.iters, args.rows, args.dim, known, inline_bytes)
                        for _ in range(args.repeats)
                    ]
                    row = {
                        "payload": payload,
                        "splits": "known" if known else "exchanged",
                        "world_size": w,
                        "bound": b,
                        "rows": args.rows,
                        "dim": args.dim,
                    }
                    for key in reps[0]:
                        row[key] = statistics.median(r[key] for r in reps)
                    row["goal_us"] = GOALS_US.get(w)
                    rows_out.append(row)
                    print(
                        f"{payload:6} {row['splits']:9} W={w:3} B={b}: total "
                        f"{row['total_us']:7.1f} us  (exchange {row['exchange_us']:6.1f}, "
                        f"process {row['process_us']:6.1f}, wait {row['wait_us']:6.1f})",
                        flush=True,
                    )
    met = all(r["total_us"] <= r["goal_us"] for r in rows_out if r["goal_us"] and r["payload"] == "inline")
    summary = {
        "goals_us": GOALS_US,
        "goals_met_inline": met,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": vars(args) | {"worlds": worlds, "bounds": bounds},
    }
    prov = provenance()
    config_keys = ("payload", "splits", "world_size", "bound", "rows", "dim")
    units = {k: "us" for k in ("total_us", "exchange_us", "process_us", "wait_us", "transport_us")}
    records = [Record.from_row(NAME, "bls", {k: r[k] for k in config_keys}, r, units, prov) for r in rows_out]
    write_report(
        args.out,
        NAME,
        {**summary, "machine": prov.machine, "commit": prov.commit},
        records,
        rows_out,
        None if args.no_plot else lambda p: _plot(rows_out, p),
    )
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for payload in ("inline", "spill"):
        for splits in ("exchanged", "known"):
            for b in sorted({r["bound"] for r in rows}):
                sel = [r for r in rows if (r["payload"], r["splits"], r["bound"]) == (payload, splits, b)]
                if sel:
                    ax.plot(
                        [r["world_size"] for r in sel],
                        [r["total_us"] for r in sel],
                        marker="o",
                        label=f"{payload}, {splits}, B={b}",
                    )
    goals = sorted(GOALS_US.items())
    ax.scatter(
        [w for w, _ in goals], [g for _, g in goals], marker="x", color="k", s=60, label="goal", zorder=5
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("world size W")
    ax.set_ylabel("host time per iteration (us)")
    ax.set_title("BLS engine host cost (no I/O)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
