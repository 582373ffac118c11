"""The pipelined runner behind `blsgpu run` and `blsgpu bench`: the sharded DLRM (blsgpu.dlrm) timed
over a process group, synchronously and at each bound.

The runner (``run_rank``, one call per rank) times, in one world and in this order:

- ``none``: the synchronous run without injected delays (T_none, the base work the simulator is
  calibrated on); skipped when the delay model is ``none`` (then ``sync`` is it).
- ``sync``: the synchronous baseline. It is the same sharded model with both channels at bound 0
  driven by a blocking loop: ``model(batch)`` posts the input dist of batch k, waits for it, looks
  up, posts the output dist, waits for it, then consumes k. That is what ``dist.all_to_all_single``
  gives (lock step on every exchange) on the same engine, so sync and BLS differ by the bound alone.
- ``bls B`` for each bound: ``model.pipeline`` drives both exchanges with up to B+1 batches in
  flight on each channel (the sharded EBC's pipeline), so a rank may run ahead of a slow peer.

Before each timed run (after its warm-up) every rank runs Python's garbage collector, untimed.
Per iteration a rank generates its batch (SyntheticCriteo, a function of (seed, rank, k)), runs it
through the model, and sleeps its injected delay for (rank, k) from the DelayModel schedule, the same
schedule for every run. Nothing else synchronises per iteration (barriers only between runs):
predictions stay on the rank in a preallocated [K, N] tensor; every run is compared bit for bit on
the rank with the first synchronous run's, and the verdicts, digests and timings (the predictions
too with ``keep_predictions``) leave the rank once, at the end. On CUDA each iteration ends with a
local stream synchronize so that host times cover the device work (no peer is involved).

Recorded per rank and iteration: the step time (between consecutive predictions), the busy time
(the step minus the time the rank was blocked in the exchanges, from the channels' counters: its
compute plus its delay, what blsgpu.bench.sim takes as work) and the batch latency (batch generated ->
prediction). With ``trace_dir`` one torch.profiler trace per rank covers every run (each inside a
``blsgpu.run[<label>:<repeat>]`` range, with the engine's post/receive/wait/release ranges and the
runner's ``blsgpu.delay``); profiling slows the runs, so traced timings are not benchmark numbers.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from blsgpu import world as _world
from blsgpu._trace import span
from blsgpu.bench.delays import DelayModel, sleep_schedule
from blsgpu.dlrm.data import SyntheticCriteo
from blsgpu.dlrm.model import DLRMArch
from blsgpu.dlrm.sharded import DLRM

__all__ = ["BenchConfig", "Progress", "run_rank"]


# ------------------------------------------------------------------------------------ the runner


@dataclass(frozen=True)
class BenchConfig:
    """One `blsgpu run` / `blsgpu bench`: the model, the data, the delays and the runs to time.

    Attributes:
        bounds: one BLS run per bound (B); a sync run always comes first.
        pooling: L, mean ids per sample and table (Poisson lengths).
        alpha: Zipf exponent of the ids.
        warmup: untimed iterations per run (on iterations past the timed ones).
        repeats: the whole sequence of runs this many times; times are medians over repeats.
        trace_dir: where each rank writes a torch.profiler trace of each timed run (None: off).
        keep_predictions: return each rank's [K, N] predictions of every run (tests).
    """

    world_size: int = 4
    bounds: tuple[int, ...] = (0, 1, 2, 4, 8)
    iterations: int = 100
    warmup: int = 5
    batch: int = 64
    embedding_sizes: tuple[int, ...] = (1000,) * 8
    mlp_bot: tuple[int, ...] = (13, 64, 16)
    mlp_top: tuple[int, ...] = (64, 1)
    delay: str = "exp:50"
    seed: int = 0
    alpha: float = 1.05
    pooling: float = 2.0
    device: str = "cpu"
    repeats: int = 1
    trace_dir: str | None = None
    keep_predictions: bool = False
    timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("world_size", "iterations", "batch", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.bounds):
            raise ValueError(f"bounds must be integers >= 0, got {list(self.bounds)}")
        if len(set(self.bounds)) != len(self.bounds):
            raise ValueError(f"bounds repeat: {list(self.bounds)}")
        model = DelayModel.parse(self.delay)
        if model.kind == "straggler" and int(model.params[0]) >= self.world_size:
            raise ValueError(
                f"delay {self.delay}: straggler rank {int(model.params[0])} is not < "
                f"world size {self.world_size}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not self.pooling >= 0 or not self.alpha >= 0:
            raise ValueError(f"pooling and alpha must be >= 0, got {self.pooling}, {self.alpha}")
        self.arch  # noqa: B018  (checks that the arch flags agree)

    @property
    def arch(self) -> DLRMArch:
        return DLRMArch.parse(self.mlp_bot, self.mlp_top, self.embedding_sizes)

    @property
    def delay_model(self) -> DelayModel:
        return DelayModel.parse(self.delay)

    def labels(self) -> list[str]:
        """Runs in order: "none" (only with delays), "sync", "bls<B>" per bound."""
        out = [] if self.delay_model.kind == "none" else ["none"]
        return out + ["sync"] + [f"bls{b}" for b in self.bounds]

    def data(self) -> SyntheticCriteo:
        return SyntheticCriteo(
            self.embedding_sizes, self.batch, alpha=self.alpha, pooling=self.pooling, seed=self.seed
        )


class Progress:
    """Iterations done per rank, in shared memory: ranks write, the launcher's progress bar reads.

    A plain store per iteration (no lock, no message): it is no synchronisation between ranks.
    """

    def __init__(self, world_size: int, ctx=None):
        import multiprocessing as mp

        ctx = ctx or mp.get_context("forkserver")
        self.world_size = world_size
        self._done = ctx.Array("q", world_size + 1, lock=False)  # [W] iterations, [W]: run index

    def advance(self, rank: int, run: int) -> None:
        self._done[rank] += 1
        if rank == 0:
            self._done[self.world_size] = run

    def read(self) -> tuple[int, int]:
        """(iterations that every rank finished, the run rank 0 is in)."""
        done = list(self._done)
        return min(done[: self.world_size]), done[self.world_size]


def _barrier(name: str, cfg: BenchConfig) -> None:
    """Between runs: bounded by the channels' timeout, a rank that does not come is named
    (PeerError), as a silent peer of an exchange is."""
    _world.barrier(name, cfg.timeout_s)


def _blocked_s(model: DLRM) -> float:
    return sum(s["waiting_for_data_s"] + s["blocked_on_bound_s"] for s in model.stats().values())


def _digest(preds: torch.Tensor) -> str:
    return hashlib.sha256(preds.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class _Rank:
    """One rank's state across the runs: its data, and the first synchronous run's predictions."""

    def __init__(self, rank: int, world_size: int, cfg: BenchConfig, progress):
        self.rank, self.W, self.cfg, self.progress = rank, world_size, cfg, progress
        self.data = cfg.data()
        self.arch = cfg.arch
        if cfg.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.reference: torch.Tensor | None = None
        self.repeat = 0

    def _loop(
        self, model: DLRM, bound: int | None, first: int, n: int, delays: Sequence[float], run: int | None
    ) -> dict:
        """Iterations first..first+n-1; bound None: blocking driver. Returns the timings."""
        K, N = n, self.cfg.batch
        preds = torch.empty(K, N, dtype=torch.float32, device=self.device)
        step = np.zeros(K)
        busy = np.zeros(K)
        t_in = np.zeros(K)
        t_out = np.zeros(K)
        sleep = sleep_schedule(np.asarray([delays]), 0) if len(delays) else None
        cuda = self.device.type == "cuda"

        def batches():
            for j in range(K):
                b = self.data.batch(self.rank, first + j)
                t_in[j] = time.perf_counter()
                yield b

        if bound is None:
            outputs = ((b, model(b)) for b in batches())
        else:
            outputs = model.pipeline(batches())
        blocked0 = _blocked_s(model)
        t0 = t_prev = time.perf_counter()
        for j, (_, p) in enumerate(outputs):
            preds[j] = p
            if sleep is not None:
                with span("delay", "dlrm", j):
                    sleep(j)
            if cuda:  # a local wait, so that host times mean device work done (no peer involved)
                torch.cuda.current_stream().synchronize()
            t = time.perf_counter()
            blocked = _blocked_s(model)
            step[j] = t - t_prev
            busy[j] = max(0.0, step[j] - (blocked - blocked0))
            t_out[j] = t
            t_prev, blocked0 = t, blocked
            if run is not None and self.progress is not None:
                self.progress.advance(self.rank, run)
        loop_s = time.perf_counter() - t0
        return {"loop_s": loop_s, "step_s": step, "busy_s": busy, "latency_s": t_out - t_in, "preds": preds}

    def run(self, label: str, run_index: int, delays: Sequence[float]) -> dict:
        cfg = self.cfg
        bound = None if label in ("none", "sync") else int(label[3:])
        model = DLRM(
            self.arch,
            bound=0 if bound is None else bound,
            seed=cfg.seed,
            device=self.device,
            timeout=cfg.timeout_s,
        )
        K = cfg.iterations
        if cfg.warmup:
            self._loop(model, bound, K, cfg.warmup, [], None)  # past the timed iterations
        # Python's full collection scans every tracked object: 100-300 ms per rank here, on every
        # rank at about the same iteration (their allocations are alike), whichever run it falls
        # in. A collection now, untimed, leaves each timed run too little to trigger one.
        gc.collect()
        _barrier(f"{label}:{self.repeat} start", cfg)
        with span("run", label, self.repeat):
            out = self._loop(model, bound, 0, K, delays, run_index)
        stats = model.stats()
        model.close()
        _barrier(f"{label}:{self.repeat} end", cfg)
        preds = out.pop("preds")
        if self.reference is None:
            self.reference = preds
            exact = True
        else:
            exact = bool(torch.equal(preds, self.reference))
        out.update(
            exact=exact,
            digest=_digest(preds),
            slept_s=float(np.sum(delays)),
            max_lag=max(s["max_lag"] for s in stats.values()),
            blocked_s=sum(s["waiting_for_data_s"] + s["blocked_on_bound_s"] for s in stats.values()),
            bytes_sent=sum(s["bytes_sent"] for s in stats.values()),
            transport=sorted({s["transport"] for s in stats.values()}),
        )
        for key in ("step_s", "busy_s", "latency_s"):
            out[key] = out[key].tolist()
        if cfg.keep_predictions:
            out["preds"] = preds.cpu()
        return out


def run_rank(rank: int, world_size: int, cfg: BenchConfig, progress=None) -> dict:
    """Every run of cfg on this rank (collective: every rank of the default group calls it).

    Returns {"repeats": [{label: timings}], "schedule": [W, K] seconds, "base_ms"} where timings
    are this rank's loop_s, per-iteration step_s / busy_s / latency_s, exact (predictions equal
    the sync run's, bit for bit), digest, max_lag.
    """
    if world_size != cfg.world_size:
        raise ValueError(f"config is for {cfg.world_size} ranks, the group has {world_size}")
    me = _Rank(rank, world_size, cfg, progress)
    prof = None
    if cfg.trace_dir:
        # One profiler over every run: starting and stopping it per run while the channels'
        # progress threads record ranges crashed the process (torch 2.13, CPU).
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if cfg.device == "cuda":
            acts.append(ProfilerActivity.CUDA)
        prof = profile(activities=acts)
        prof.__enter__()
    try:
        repeats, schedule, base_ms = _run_all(me, cfg, rank, world_size)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    if prof is not None:
        os.makedirs(cfg.trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(cfg.trace_dir, f"rank{rank}.json"))
    return {"repeats": repeats, "schedule": schedule, "base_ms": base_ms}


def _run_all(me: _Rank, cfg: BenchConfig, rank: int, world_size: int):
    model = cfg.delay_model
    K = cfg.iterations
    labels = cfg.labels()
    repeats: list[dict] = []
    schedule = None
    base_ms = None
    run_index = 0
    for rep in range(cfg.repeats):
        me.reference = None  # each repeat checks against its own sync run
        me.repeat = rep
        runs: dict[str, dict] = {}
        for label in labels:
            if label == "none":
                runs[label] = me.run(label, run_index, [])
            else:
                if schedule is None:
                    if model.kind == "skew":
                        # skew scales the compute of one iteration: the slowest rank's mean busy
                        # time without delays, agreed once (not per iteration).
                        mine = float(np.mean(runs["none"]["busy_s"])) * 1e3
                        base_ms = max(_world.all_gather_object("skew base_ms", mine, cfg.timeout_s))
                    schedule = model.schedule(world_size, K, cfg.seed, base_ms=base_ms)
                runs[label] = me.run(label, run_index, schedule[rank].tolist())
            run_index += 1
        repeats.append(runs)
    return repeats, schedule, base_ms
