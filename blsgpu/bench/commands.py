"""The work of `blsgpu run/bench` and `blsgpu simulate`, once the command line has been checked.

`bench` runs one world (a local world of CPU processes through `blsgpu.run_world`, or this process
as one rank of a torchrun job), analyses it, prints the table and writes the outputs. `simulate`
replays a recorded bench and projects it to other world sizes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from datetime import timedelta

from blsgpu.bench import analysis, runner, sim
from blsgpu.bench.delays import DelayModel
from blsgpu.bench.progress import RankBar, WorldBar
from blsgpu.bench.record import write_json
from blsgpu.bench.report import format_simulation, format_table, plot
from blsgpu.bench.runner import BenchConfig
from blsgpu.transport.nccl_lib import INSTALL_HINT
from blsgpu.world import barrier, gather_object, run_world, set_control_store

__all__ = ["bench", "simulate", "torchrun_env"]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        )
    return None


def bench(
    cfg: BenchConfig,
    flags: dict,
    torchrun: tuple[int, int, int] | None,
    timeout_s: float,
    json_path: str | None,
    plot_path: str | None,
    progress: bool,
) -> int:
    """Run cfg's world, print its table, write its JSON and plot (rank 0 only under torchrun).

    Returns the exit status: 0 when every run's predictions equal the synchronous run's (and, with
    --device cuda, the channels ran over NCCL), else 1.

    Args:
        flags: the command line's flags, recorded in the JSON's ``config``.
        torchrun: (rank, world size, local rank) of this process in a torchrun job, or None for a
            local world of cfg.world_size processes.
        timeout_s: how long the world may take (local), or the process group's timeout (torchrun).
    """
    total = cfg.repeats * len(cfg.labels()) * cfg.iterations
    labels = cfg.labels()
    t0 = time.perf_counter()
    if torchrun is None:
        shared = runner.Progress(cfg.world_size)
        bar = WorldBar(shared, total, labels, progress)
        try:
            results = run_world(cfg.world_size, runner.run_rank, cfg, shared, timeout_s=timeout_s)
        finally:
            bar.close()
    else:
        rank, world, local = torchrun
        results = _run_torchrun(cfg, rank, world, local, total, labels, progress, timeout_s)
        if results is None:
            return 0
    doc = analysis.analyse(cfg, results, flags=flags)
    doc["wall_s"] = time.perf_counter() - t0
    print(format_table(doc))
    if json_path:
        write_json(json_path, doc)
        print(f"wrote {json_path}")
    if plot_path:
        plot(doc, plot_path)
        print(f"wrote {plot_path}")
    if cfg.trace_dir:
        print(f"wrote torch.profiler traces to {cfg.trace_dir}/ (open in chrome://tracing or Perfetto)")
    if cfg.device == "cuda":
        staged = sorted({t for r in doc["runs"] for t in r["transport"] if t != "nccl"})
        if staged:
            print(
                f"the channels ran over {', '.join(staged)}, not NCCL: the GPU path was not "
                f"used (install CuPy with NCCL: {INSTALL_HINT})",
                file=sys.stderr,
            )
            return 1
    return 0 if doc["exact"] else 1


def _run_torchrun(
    cfg: BenchConfig, rank: int, world: int, local: int, total: int, labels, show: bool, timeout_s: float
):
    """One rank of a torchrun job: init, run, gather every rank's result once on rank 0.

    Every blocking step is bounded: the process group has the user's timeout, and the start, the
    barriers between runs and the final gather go through the rendezvous store (served by the
    launcher) with the channels' timeout, so a rank that died or fell silent there is named on
    every rank that waits for it (PeerError), as a silent peer of an exchange is.
    """
    import torch
    import torch.distributed as dist

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("blsgpu: --device cuda but no CUDA device is visible")
        # Launchers that give each process only its own GPU make LOCAL_RANK exceed the count.
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    backend = "cpu:gloo,cuda:nccl" if cfg.device == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # The rendezvous init_process_group would do, kept in hand for the control collectives.
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    set_control_store(store, rank, world)
    barrier("start", cfg.timeout_s)  # names a rank that never came
    dist.init_process_group(
        backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world, timeout=timeout
    )
    try:
        bar = RankBar(total, labels, show and rank == 0)
        try:
            result = runner.run_rank(rank, world, cfg, bar if rank == 0 else None)
        finally:
            bar.close()
        gathered = gather_object("results", result, cfg.timeout_s, dst=0)
    finally:
        dist.destroy_process_group()
        set_control_store(None)
    return gathered if rank == 0 else None


def simulate(
    delay: str,
    worlds,
    bounds,
    iterations: int,
    base_ms: float,
    comm_s: float,
    seed: int,
    record: dict | None,
    json_path: str | None,
) -> int:
    """Replay `record` (a `blsgpu bench --json` document) if given, then project the sync and BLS
    schedules of `delay` to every W of `worlds` and B of `bounds`; print both, write the JSON."""
    model = DelayModel.parse(delay)
    K = iterations
    out: dict = {
        "delay": delay,
        "iterations": K,
        "base_ms": base_ms,
        "comm_s": comm_s,
        "seed": seed,
        "bounds": list(bounds),
        "replay": None,
        "projections": [],
    }
    if record:
        out["replay"] = _replay(record, comm_s)
    t0 = time.perf_counter()
    for W in worlds:
        for b in bounds:
            p = sim.project(model, W, K, b, base_ms, seed=seed, comm_s=comm_s)
            out["projections"].append(
                {
                    "world_size": W,
                    "bound": b,
                    "sync_throughput_it_s": p.sync_throughput_it_s,
                    "bls_throughput_it_s": p.bls_throughput_it_s,
                    "speedup": p.speedup,
                    "masking": None if math.isnan(p.masking) else p.masking,
                    "t_sync_s": p.t_sync_s,
                    "t_bls_s": p.t_bls_s,
                    "t_ideal_s": p.t_ideal_s,
                }
            )
    out["elapsed_s"] = time.perf_counter() - t0
    print(format_simulation(out))
    if json_path:
        write_json(json_path, out)
        print(f"wrote {json_path}")
    return 0


def _replay(record: dict, comm_s: float) -> dict:
    """Each recorded run's own per-rank busy times (compute + delay) through the schedule of its
    mode, beside what was measured."""
    rows = []
    t_sync = None
    for r in [x for x in record["runs"] if x.get("per_rank_iter_s")]:
        work = sim.load_work(r)
        if r["mode"] == "sync":
            t = sim.simulate_sync(work, comm_s).total_s
            t_sync = t
        else:
            t = sim.simulate_bls(work, r["bound"], comm_s).total_s
        rows.append(
            {
                "mode": r["mode"],
                "bound": r["bound"],
                "simulated_throughput_it_s": work.shape[1] / t,
                "measured_throughput_it_s": r["throughput_it_s"],
                "error": r["throughput_it_s"] and work.shape[1] / t / r["throughput_it_s"] - 1.0,
                "simulated_speedup": t_sync / t if t_sync else None,
            }
        )
    return {"world_size": work.shape[0], "iterations": work.shape[1], "rows": rows}
