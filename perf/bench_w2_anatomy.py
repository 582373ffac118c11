"""Where a W=2 iteration with known splits goes: sync, the raw message layout, BLS, side by side.

Two local gloo ranks exchange the rows of bench_exchange.py (per peer a seeded split uniform in
[128, 384] rows of 64 float32, known to both sides) and sum what they received, in one world,
interleaved round by round. Each object is made once and kept for every round, so every
provider's connections and threads are as old as the others':

- sync: blocking ``dist.all_to_all_single`` on the default group.
- sync-new-group: the same on a gloo group made for it, as each BLS channel makes its own.
- raw-message: the BLS MESSAGE alltoall alone, without the engine. One blocking
  ``ProcessGroupGloo.alltoall_base`` on a new group, with a 128-byte header in front of each
  peer's payload and the channel's 1 MiB receive regions. It copies nothing and checks nothing.
  This is the floor the engine adds to.
- raw-copies: raw-message plus the copies the engine makes (torch slice copies): each peer's
  payload into the message, this rank's own rows into the result, every payload out of the
  receive regions. What the bytes cost without the engine's Python.
- bls-floor: the BLS fast path's own calls and nothing else, driven straight from the benchmark on
  a channel's buffers: the C call that checks the splits and writes the messages, the one MESSAGE
  alltoall, the C call that places this rank's rows, the wait, the C call that checks the headers
  and gathers. No records, counters, locks, handles or frames of the engine: what the bytes and
  the transport cost with the engine's bookkeeping taken away (the floor a hot path in C would
  reach). Not a usable exchange: no bound, no failures named.
- bls-B0, bls-B1: the BLS channel at B=0 and B=1 (post k+B, wait k).
- bls-B0-general: B=0 with the host fast path off (BLSGPU_FAST=0 when the channel is made).

Per provider and round: wall time per iteration (the slower rank's), rank 0's caller-thread CPU,
whole-process CPU (all its threads: gloo's included) and minor page faults per iteration. Ratios
are taken within a round against sync, then the median over rounds.

With --pid-file, rank 0 writes its pid there before the timed rounds, so a profiler can attach,
e.g. ``perf record -g -p $(cat F) -- sleep 4`` during a long run of one provider.

Usage: python perf/bench_w2_anatomy.py [--iters 300 --rounds 8 --providers sync,bls-B0,...]
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import resource
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import blsgpu
from blsgpu.bench.record import Record, provenance, write_report

NAME = "bench_w2_anatomy"
PROVIDERS = (
    "sync",
    "sync-new-group",
    "raw-message",
    "raw-copies",
    "raw-p2p",
    "bls-floor",
    "bls-B0",
    "bls-B1",
    "bls-B0-general",
)
HEADER = 128
REGION = HEADER + (1 << 20)  # a channel's receive region per peer at its default inline capacity


class _Rank:
    def __init__(self, rank: int, world_size: int, cfg: dict):
        self.rank, self.W = rank, world_size
        n = cfg["iters"] + cfg["warmup"]
        rng = np.random.default_rng([cfg["seed"], 0x5EED])
        lo, hi = cfg["rows"] // 2, cfg["rows"] + cfg["rows"] // 2
        S = rng.integers(lo, hi + 1, size=(n, world_size, world_size))
        self.ss = [S[k, rank].tolist() for k in range(n)]
        self.rs = [S[k, :, rank].tolist() for k in range(n)]
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        self.data = torch.randn(int(S[:, rank].sum(axis=1).max()), cfg["dim"], generator=g)
        self.dim = cfg["dim"]

    def consume(self, recv: torch.Tensor) -> float:
        return float(recv.sum(dtype=torch.float64))

    def sync(self, group):
        def run(first: int, n: int) -> None:
            for i in range(first, first + n):
                send, ss, rs = self.data[: sum(self.ss[i])], self.ss[i], self.rs[i]
                recv = torch.empty(sum(rs), self.dim)
                dist.all_to_all_single(recv, send, rs, ss, group=group)
                self.consume(recv)

        return run

    def raw_message(self, backend, copies: bool = False):
        me, W, rb = self.rank, self.W, self.dim * 4
        msg_in = torch.empty(REGION * (W - 1), dtype=torch.uint8)
        msg_out = torch.empty(REGION * W, dtype=torch.uint8)
        out_sizes = [0 if p == me else REGION for p in range(W)]

        def run(first: int, n: int) -> None:
            for i in range(first, first + n):
                ss, rs = self.ss[i], self.rs[i]
                sizes = [0 if p == me else HEADER + s * rb for p, s in enumerate(ss)]
                send = self.data[: sum(ss)]
                if copies:  # the payload bytes the engine copies into the message
                    _copy_rows(send, ss, me, msg_out, HEADER, rb)
                work = backend.alltoall_base(msg_in, msg_out[: sum(sizes)], out_sizes, sizes)
                recv = torch.empty(sum(rs), self.dim)  # what the caller gets: filled with copies
                if copies:  # own rows, then (after the wait) every peer's payload
                    lo = sum(rs[:me])
                    recv[lo : lo + rs[me]] = send[sum(ss[:me]) : sum(ss[: me + 1])]
                work.wait()
                if copies:
                    _gather_rows(msg_in, rs, me, recv, REGION, HEADER, rb)
                self.consume(recv)

        return run

    def raw_p2p(self, backend):
        """The same bytes as raw_message, as one gloo send and one receive per peer (no work
        queue, no worker thread: the caller posts to the connection's loop thread)."""
        me, W, rb = self.rank, self.W, self.dim * 4
        msg_in = torch.empty(REGION * (W - 1), dtype=torch.uint8)
        msg_out = torch.empty(REGION * W, dtype=torch.uint8)
        peers = [p for p in range(W) if p != me]

        def run(first: int, n: int) -> None:
            for i in range(first, first + n):
                ss, rs = self.ss[i], self.rs[i]
                works, at = [], 0
                for j, p in enumerate(peers):
                    works.append(backend.recv([msg_in[j * REGION : (j + 1) * REGION]], p, 0))
                for p in peers:
                    n_p = HEADER + ss[p] * rb
                    works.append(backend.send([msg_out[at : at + n_p]], p, 0))
                    at += n_p
                recv = torch.empty(sum(rs), self.dim)  # what the caller gets: not filled
                for w in works:
                    w.wait()
                self.consume(recv)

        return run

    def bls(self, a2a):
        B = a2a.bound

        def run(first: int, n: int) -> None:
            handles: collections.deque = collections.deque()

            def post(i: int) -> None:
                handles.append(a2a.exchange(self.data[: sum(self.ss[i])], self.ss[i], self.rs[i]))

            for j in range(min(B, n)):
                post(first + j)
            for j in range(n):
                if j + B < n:
                    post(first + j + B)
                recv, _ = handles.popleft().wait()
                self.consume(recv)

        return run

    def bls_floor(self, a2a):
        """The fast path's calls alone (see the module docstring), on a B=0 channel's buffers."""
        native, group = a2a._native, a2a.transport._groups[0]  # the MESSAGE group
        me, W, rb, dim = self.rank, self.W, self.dim * 4, self.dim
        out_buf, in_buf, in_t = a2a._msg_out[0], a2a._msg_in[0], a2a._msg_in_t[0]
        a2a.exchange(self.data[:W], [1] * W, [1] * W).wait()  # makes the kind of rows, sizes the buffers
        fixed = next(iter(a2a._kinds.values())).fixed

        def run(first: int, n: int) -> None:
            for i in range(first, first + n):
                ss, rs = self.ss[i], self.rs[i]
                send = self.data[: sum(ss)]
                res = torch.empty(sum(rs), dim)
                at, cap, ptr = res.data_ptr(), sum(rs) * rb, send.data_ptr()
                args = (ptr, send.shape[0], ss, rs, W, me, rb, a2a._inline, fixed, i, 0, at, cap)
                got = native.post_inline(out_buf.ptr, out_buf.cap, *args)
                if type(got) is int:
                    out_buf.host(got)
                    got = native.post_inline(out_buf.ptr, out_buf.cap, *args)
                total, ss, rs, sizes = got
                work = group.alltoall_base(in_t, out_buf.torch(total), a2a._msg_out_sizes, sizes)
                native.place_own(ptr, send.shape[0], ss, rs, me, rb, out_buf.ptr, out_buf.cap, total, at, cap)
                work.wait()
                head = (in_buf.ptr, in_buf.cap, W, me, a2a._stride, fixed, i, ss, rs, 0, rb, at, cap)
                if native.receive_inline(*head) is None:
                    raise RuntimeError(f"bls-floor: iteration {i} did not check out")
                self.consume(res)

        return run


def _copy_rows(send: torch.Tensor, ss: list[int], me: int, msg_out: torch.Tensor, H: int, rb: int) -> None:
    """Each peer's rows of `send` behind its header in `msg_out` (bytes), as the engine lays them."""
    src = send.view(-1).view(torch.uint8)
    at = lo = 0
    for p, s in enumerate(ss):
        if p != me:
            msg_out[at + H : at + H + s * rb] = src[lo * rb : (lo + s) * rb]
            at += H + s * rb
        lo += s


def _gather_rows(msg_in, rs: list[int], me: int, recv: torch.Tensor, region: int, H: int, rb: int) -> None:
    """Every peer's payload from its receive region into its place in `recv`."""
    dst = recv.view(-1).view(torch.uint8)
    j = lo = 0
    for p, s in enumerate(rs):
        if p != me:
            dst[lo * rb : (lo + s) * rb] = msg_in[j * region + H : j * region + H + s * rb]
            j += 1
        lo += s


def _make(me: _Rank, name: str, closers: list):
    if name == "sync":
        return me.sync(None)
    if name == "sync-new-group":
        return me.sync(dist.new_group(backend="gloo"))
    if name.startswith("raw-"):
        store = dist.PrefixStore(f"bench_w2_anatomy/{name}", dist.distributed_c10d._get_default_store())
        backend = dist.ProcessGroupGloo(store, me.rank, me.W, timedelta(seconds=120))
        if name == "raw-p2p":
            return me.raw_p2p(backend)
        return me.raw_message(backend, copies=name == "raw-copies")
    if name == "bls-floor":
        a2a = blsgpu.BoundedLagAllToAll(bound=0, name=name, timeout=120)
        closers.append(a2a.close)
        return me.bls_floor(a2a)
    bound = int(name.split("-")[1][1:])
    if name.endswith("general"):
        os.environ["BLSGPU_FAST"] = "0"  # read when a channel is made
    try:
        a2a = blsgpu.BoundedLagAllToAll(bound=bound, name=name, timeout=120)
    finally:
        os.environ.pop("BLSGPU_FAST", None)
    closers.append(a2a.close)
    return me.bls(a2a)


def _rank_main(rank: int, world_size: int, cfg: dict) -> dict:
    me = _Rank(rank, world_size, cfg)
    closers: list = []
    loops = {name: _make(me, name, closers) for name in cfg["providers"]}
    K, warm = cfg["iters"], cfg["warmup"]
    if rank == 0 and cfg["pid_file"]:
        Path(cfg["pid_file"]).write_text(str(os.getpid()))
    out: dict = collections.defaultdict(list)
    for _ in range(cfg["rounds"]):
        for name, run in loops.items():
            run(K, warm)  # warm-up on iterations past the timed ones
            gc.collect()  # a full collection pauses a rank for 100-300 ms: never inside a timed run
            dist.barrier()
            r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
            t0 = time.perf_counter()
            run(0, K)
            wall = time.perf_counter() - t0
            c1, r1 = time.thread_time(), resource.getrusage(resource.RUSAGE_SELF)
            proc = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            faults = r1.ru_minflt - r0.ru_minflt
            out[name].append(
                {"wall_s": wall, "caller_cpu_s": c1 - c0, "process_cpu_s": proc, "faults": faults}
            )
    for close in closers:
        close()
    return dict(out)


def _analyse(cfg: dict, results: list[dict]) -> list[dict]:
    K = cfg["iters"]
    rows = []
    for name in cfg["providers"]:
        per = collections.defaultdict(list)
        for j in range(cfg["rounds"]):
            wall = max(r[name][j]["wall_s"] for r in results)
            per["us_per_iter"].append(wall / K * 1e6)
            per["caller_cpu_us"].append(results[0][name][j]["caller_cpu_s"] / K * 1e6)
            per["process_cpu_us"].append(results[0][name][j]["process_cpu_s"] / K * 1e6)
            per["page_faults"].append(results[0][name][j]["faults"] / K)
            if "sync" in cfg["providers"]:
                per["speedup"].append(max(r["sync"][j]["wall_s"] for r in results) / wall)
        row = {"provider": name, **{k: statistics.median(v) for k, v in per.items()}}
        row["us_per_iter_all"] = per["us_per_iter"]
        rows.append(row)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["provider"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for off, key, label in (
        (-0.27, "us_per_iter", "wall per iteration"),
        (0.0, "process_cpu_us", "rank 0 process CPU"),
        (0.27, "caller_cpu_us", "rank 0 caller-thread CPU"),
    ):
        ax.bar(x + off, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names, rotation=15)
    ax.set(ylabel="us per iteration", title="W=2, known splits, no delays (medians over rounds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=300, help="timed iterations per provider and round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--rows", type=int, default=256, help="mean rows per peer per iteration")
    ap.add_argument("--dim", type=int, default=64, help="float32 columns per row")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pid-file", default=None, help="rank 0 writes its pid here (to attach a profiler)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or not providers:
        ap.error(f"providers are some of {', '.join(PROVIDERS)}; got {unknown or 'none'}")
    if args.iters < 1 or args.rounds < 1 or args.rows < 2 or args.dim < 1 or args.warmup < 0:
        ap.error("iters, rounds, dim >= 1, rows >= 2, warmup >= 0")
    cfg = vars(args) | {"providers": providers}
    results = blsgpu.run_world(2, _rank_main, cfg, timeout_s=3600)
    rows = _analyse(cfg, results)
    print(
        f"{'provider':<16} {'us/iter':>8} {'speedup':>8} {'caller CPU':>11} {'process CPU':>12} {'faults':>7}"
    )
    for r in rows:
        sp = f"{r['speedup']:8.3f}" if "speedup" in r else f"{'n/a':>8}"
        print(
            f"{r['provider']:<16} {r['us_per_iter']:8.1f} {sp} {r['caller_cpu_us']:11.1f} "
            f"{r['process_cpu_us']:12.1f} {r['page_faults']:7.1f}"
        )
    print(
        "us/iter: the slower rank's wall time; CPU, faults (minor page faults): rank 0's, per "
        "iteration; medians over rounds"
    )
    prov = provenance(backend="gloo")
    units = {"us_per_iter": "us", "caller_cpu_us": "us", "process_cpu_us": "us"}
    config = {k: cfg[k] for k in ("iters", "warmup", "rounds", "rows", "dim", "seed")} | {"world_size": 2}
    records = [
        Record.from_row(NAME, r["provider"], config, r, units, prov, ("speedup",), baseline="sync")
        if "speedup" in r
        else Record.from_row(NAME, r["provider"], config, r, units, prov)
        for r in rows
    ]
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "config": config}
    write_report(args.out, NAME, summary, records, rows, None if args.no_plot else lambda p: _plot(rows, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
