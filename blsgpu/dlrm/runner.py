"""DLRM inference over a process group: the sharded model and the pipelined runner behind `blsgpu`.

The model (``DLRM``): bottom MLP, a table-wise ShardedEmbeddingBagCollection, dot interaction, top
MLP; every weight is a function of the seed alone, so every bound (and the unsharded reference)
computes the same model.

The runner (``run_rank``, one call per rank) times, in one world and in this order:

- ``none``: the synchronous run without injected delays (T_none, the base work the simulator is
  calibrated on); skipped when the delay model is ``none`` (then ``sync`` is it).
- ``sync``: the synchronous baseline. It is the same sharded model with both channels at bound 0
  driven by a blocking loop: ``model(batch)`` posts the input dist of batch k, waits for it, looks
  up, posts the output dist, waits for it, then consumes k. That is what ``dist.all_to_all_single``
  gives (lock step on every exchange) on the same engine, so sync and BLS differ by the bound alone.
- ``bls B`` for each bound: ``model.pipeline`` drives both exchanges with up to B+1 batches in
  flight on each channel (the sharded EBC's pipeline), so a rank may run ahead of a slow peer.

Per iteration a rank generates its batch (SyntheticCriteo, a function of (seed, rank, k)), runs it
through the model, and sleeps its injected delay for (rank, k) from the DelayModel schedule, the same
schedule for every run. Nothing else synchronises per iteration (barriers only between runs):
predictions stay on the rank in a preallocated [K, N] tensor; every run is compared bit for bit on
the rank with the first synchronous run's, and the verdicts, digests and timings (the predictions
too with ``keep_predictions``) leave the rank once, at the end. On CUDA each iteration ends with a
local stream synchronize so that host times cover the device work (no peer is involved).

Recorded per rank and iteration: the step time (between consecutive predictions), the busy time
(the step minus the time the rank was blocked in the exchanges, from the channels' counters: its
compute plus its delay, what blsgpu.sim takes as work) and the batch latency (batch generated ->
prediction). With ``trace_dir`` one torch.profiler trace per rank covers every run (each inside a
``blsgpu.run[<label>:<repeat>]`` range, with the engine's post/receive/wait/release ranges and the
runner's ``blsgpu.delay``); profiling slows the runs, so traced timings are not benchmark numbers.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from blsgpu import _provenance, _world, sim
from blsgpu._trace import span
from blsgpu.delays import DelayModel, sleep_schedule
from blsgpu.dlrm.data import Batch, SyntheticCriteo
from blsgpu.dlrm.model import DLRMArch, DLRMDense

__all__ = ["DLRM", "BenchConfig", "analyse", "make_tables", "run_rank"]


def make_tables(arch: DLRMArch, pooling: str = "sum") -> list:
    """The T embedding tables of an arch: table ``t{i}`` of D columns looks up feature ``cat_{i}``."""
    from blsgpu.embedding import EmbeddingBagConfig  # noqa: PLC0415 (the embedding layer loads lazily)

    D = arch.sparse_feature_size
    return [
        EmbeddingBagConfig(f"t{i}", n, D, [f"cat_{i}"], pooling)
        for i, n in enumerate(arch.embedding_sizes)
    ]


def _kjt(batch: Batch, device: torch.device):
    from blsgpu.embedding import KeyedJaggedTensor  # noqa: PLC0415

    if device.type == "cpu":
        return KeyedJaggedTensor(list(batch.keys), batch.values, batch.weights, lengths=batch.lengths)
    # Pinned and still on the host: the sharded collection checks it there and copies it to the
    # GPU without blocking.
    def pin(t):
        return None if t is None else t.pin_memory()

    return KeyedJaggedTensor(list(batch.keys), pin(batch.values), pin(batch.weights),
                             lengths=pin(batch.lengths))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    from blsgpu.embedding._jagged import to_device  # noqa: PLC0415 (the embedding layer loads lazily)

    return to_device(t, device)


class DLRM(nn.Module):
    """DLRM inference sharded over a process group: (batch of N samples) -> click probabilities [N].

    Args:
        arch: sizes (``DLRMArch.parse`` of the reference's flags).
        bound: B of both exchanges of the sharded embeddings.
        seed: the dense weights and every table are functions of it alone, whatever the bound,
            the world size and the plan.
        group, device, plan: as ShardedEmbeddingBagCollection's. Construction is collective.
    """

    def __init__(self, arch: DLRMArch, bound: int = 4, seed: int = 0, group=None, device=None,
                 plan="table_wise", timeout=None):
        super().__init__()
        from blsgpu.embedding import ShardedEmbeddingBagCollection  # noqa: PLC0415

        self.arch = arch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dense = DLRMDense(arch, seed).to(self.device).requires_grad_(False)
        self.ebc = ShardedEmbeddingBagCollection(
            make_tables(arch), plan, group, bound, self.device, seed=seed, timeout=timeout
        )

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Blocking: both exchanges of this batch complete before it returns (lock step)."""
        pooled = self.ebc(_kjt(batch, self.device)).values()
        return self.dense(_to(batch.dense, self.device), pooled)

    def pipeline(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Yields (batch, predictions) in order, with up to B+1 batches in flight per exchange."""
        pending: collections.deque[Batch] = collections.deque()

        def kjts():
            for b in batches:
                pending.append(b)
                yield _kjt(b, self.device)

        for kt in self.ebc.pipeline(kjts()):
            b = pending.popleft()
            with torch.no_grad():
                yield b, self.dense(_to(b.dense, self.device), kt.values())

    def stats(self) -> dict[str, dict]:
        return self.ebc.stats()

    def close(self) -> None:
        self.ebc.close()


def reference_predictions(arch: DLRMArch, seed: int, batches: Iterable[Batch]) -> torch.Tensor:
    """Predictions [K, N] of the unsharded model (EmbeddingBagCollection + DLRMDense), on one rank."""
    from blsgpu.embedding import EmbeddingBagCollection  # noqa: PLC0415

    ebc = EmbeddingBagCollection(make_tables(arch), seed=seed)
    dense = DLRMDense(arch, seed).requires_grad_(False)
    with torch.no_grad():
        return torch.stack([dense(b.dense, ebc(_kjt(b, torch.device("cpu"))).values())
                            for b in batches])


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
            raise ValueError(f"delay {self.delay}: straggler rank {int(model.params[0])} is not < "
                             f"world size {self.world_size}")
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
        return SyntheticCriteo(self.embedding_sizes, self.batch, alpha=self.alpha,
                               pooling=self.pooling, seed=self.seed)


class Progress:
    """Iterations done per rank, in shared memory: ranks write, the launcher's progress bar reads.

    A plain store per iteration (no lock, no message): it is no synchronisation between ranks.
    """

    def __init__(self, world_size: int, ctx=None):
        import multiprocessing as mp  # noqa: PLC0415

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

    def _loop(self, model: DLRM, bound: int | None, first: int, n: int, delays: Sequence[float],
              run: int | None) -> dict:
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
        return {"loop_s": loop_s, "step_s": step, "busy_s": busy, "latency_s": t_out - t_in,
                "preds": preds}

    def run(self, label: str, run_index: int, delays: Sequence[float]) -> dict:
        cfg = self.cfg
        bound = None if label in ("none", "sync") else int(label[3:])
        model = DLRM(self.arch, bound=0 if bound is None else bound, seed=cfg.seed,
                     device=self.device, timeout=cfg.timeout_s)
        K = cfg.iterations
        if cfg.warmup:
            self._loop(model, bound, K, cfg.warmup, [], None)  # past the timed iterations
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
            blocked_s=sum(s["waiting_for_data_s"] + s["blocked_on_bound_s"]
                          for s in stats.values()),
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
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

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
                        base_ms = max(_world.all_gather_object("skew base_ms", mine,
                                                               cfg.timeout_s))
                    schedule = model.schedule(world_size, K, cfg.seed, base_ms=base_ms)
                runs[label] = me.run(label, run_index, schedule[rank].tolist())
            run_index += 1
        repeats.append(runs)
    return repeats, schedule, base_ms


# ------------------------------------------------------------------------------------ analysis


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


def _median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _none_if_nan(x: float | None):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def machine(device: str = "cpu") -> dict:
    return _provenance.machine(
        device=device, backend="gloo" if device == "cpu" else "cpu:gloo,cuda:nccl"
    )


commit = _provenance.commit


def analyse(cfg: BenchConfig, results: list[dict], flags: dict | None = None) -> dict:
    """The JSON document of a bench from every rank's run_rank result (schema: perf/README.md).

    Throughput = K / T with T the slowest rank's timed loop; ratios are taken within a repeat,
    then the median over repeats. Two simulations of each run, with the exchange time fitted to
    T_none (blsgpu.sim.fit_comm_s):

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
        base = np.clip(busy(rep, none_label) - (schedule if none_label == "sync" else 0.0),
                       0.0, None)
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
            d["masking"].append(sim.masking(t_sync, t, t_ideal)
                                if hideable and label != "none" else math.nan)
            d["exact"].append(all(r["repeats"][rep][label]["exact"] for r in results))
            d["sim_s"].append(schedule_time(busy(rep, label), label, comm_s))
            pred = schedule_time(base if label == "none" else pred_work, label, comm_s)
            d["pred_s"].append(pred)
            d["pred_masking"].append(sim.masking(pred_sync, pred, t_ideal)
                                     if hideable and label != "none" else math.nan)

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
    return {
        "config": {**(flags or {}), **asdict(cfg),
                   "arch": {"bottom": arch.bottom, "top": arch.top,
                            "embedding_sizes": arch.embedding_sizes}},
        "commit": commit(),
        "machine": machine(cfg.device),
        "t_none_s": _median(t_none_l),
        "t_ideal_s": _median(t_ideal_l),
        "comm_s": _median(comm_l),
        "base_ms": _median(base_l) * 1e3,
        "skew_base_ms": results[0]["base_ms"],
        "delay_per_rank_s": schedule.sum(axis=1).tolist(),
        "exact": all(r["exact"] for r in runs) and (none_run is None or none_run["exact"]),
        # Ranks outnumber cores: measured masking can exceed 1, the simulator's is the one to read.
        "oversubscribed": cfg.world_size > (machine(cfg.device).get("cores") or 1),
        "none_run": none_run,
        "runs": runs,
    }
