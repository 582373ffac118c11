"""Injected delay models: per-rank, per-iteration sleeps, deterministic from a seed.

A model comes from a spec string (the CLI's ``--delay``) and turns into a schedule: a float64 array
[W, iters] of seconds that rank r sleeps in iteration k. Every rank builds the same schedule from the
same seed, so no rank needs to tell another what it will sleep.

Specs (times in milliseconds):

- ``none``: no delay.
- ``exp:MEAN_MS``: i.i.d. exponential delays with mean MEAN_MS, per rank per iteration.
- ``straggler:RANK:MS``: rank RANK sleeps MS in every iteration; the others never.
- ``rotate:MS``: in iteration k, rank k % W sleeps MS. A synchronous run pays MS every iteration,
  while each rank's own total is only about iters * MS / W.
- ``spikes:PROB:MS``: each rank, in each iteration, independently sleeps MS with probability PROB.
- ``skew:ALPHA``: hot tables on some ranks, a persistent per-rank load. Rank r's load relative to an
  even spread is m_r = W * v_r / sum(v), v_r = (h_r + 1) ** -ALPHA, where h is a seeded permutation
  of the ranks (h_r = 0 is the hottest). With ``base_ms`` the compute time of one iteration under an
  even spread, rank r sleeps base_ms * max(m_r - 1, 0) in every iteration: ranks above the average
  carry the extra; ranks below it cannot be made faster by a delay, so they get none. ALPHA = 0 is
  balanced. A persistent imbalance cannot be hidden by any bound: it shows what BLS does not fix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["DelayModel", "sleep_schedule"]

ACCEPTED = "none, exp:MEAN_MS, straggler:RANK:MS, rotate:MS, spikes:PROB:MS, skew:ALPHA"

# kind -> names of its parameters, in spec order.
_PARAMS = {
    "none": (),
    "exp": ("MEAN_MS",),
    "straggler": ("RANK", "MS"),
    "rotate": ("MS",),
    "spikes": ("PROB", "MS"),
    "skew": ("ALPHA",),
}


def _fmt(x: float) -> str:
    # Integral values print without ".0" so "exp:5" round-trips as written; repr keeps every bit.
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


@dataclass(frozen=True)
class DelayModel:
    """A delay model; build it with ``DelayModel.parse(spec)``."""

    kind: str
    params: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in _PARAMS:
            raise ValueError(f"unknown delay model {self.kind!r}; accepted: {ACCEPTED}")
        names = _PARAMS[self.kind]
        if len(self.params) != len(names):
            raise ValueError(
                f"delay model {self.kind!r} takes {len(names)} parameter(s) "
                f"({', '.join(names) or 'none'}), got {len(self.params)}"
            )
        for name, value in zip(names, self.params, strict=True):
            if not math.isfinite(value):
                raise ValueError(f"delay {self.kind}: {name} must be finite, got {value}")
            if value < 0:
                raise ValueError(f"delay {self.kind}: {name} must be >= 0, got {value}")
        if self.kind == "spikes" and self.params[0] > 1:
            raise ValueError(f"delay spikes: PROB must be in [0, 1], got {self.params[0]}")
        if self.kind == "straggler" and not float(self.params[0]).is_integer():
            raise ValueError(f"delay straggler: RANK must be an integer, got {self.params[0]}")

    @classmethod
    def parse(cls, spec: str) -> DelayModel:
        """Parse ``kind[:p1[:p2]]``; raises ValueError naming the spec and the accepted forms."""
        if not isinstance(spec, str):
            raise TypeError(f"delay spec must be a str, got {type(spec).__name__}")
        kind, *raw = spec.strip().split(":")
        kind = kind.strip().lower()
        try:
            params = tuple(float(p) for p in raw)
        except ValueError:
            raise ValueError(
                f"bad delay spec {spec!r}: parameters must be numbers; accepted: {ACCEPTED}"
            ) from None
        try:
            return cls(kind, params)
        except ValueError as e:
            why = str(e) if ACCEPTED in str(e) else f"{e}; accepted: {ACCEPTED}"
            raise ValueError(f"bad delay spec {spec!r}: {why}") from None

    def __str__(self) -> str:
        return ":".join([self.kind, *(_fmt(p) for p in self.params)])

    def schedule(
        self, world_size: int, iterations: int, seed: int = 0, base_ms: float | None = None
    ) -> np.ndarray:
        """Seconds that rank r sleeps in iteration k, as float64 [W, iterations].

        Args:
            base_ms: compute time of one iteration under an even load; only ``skew`` uses it
                (and requires it).
        """
        W, K = int(world_size), int(iterations)
        if W < 1 or K < 0:
            raise ValueError(f"need world_size >= 1 and iterations >= 0, got {W}, {K}")
        rng = np.random.default_rng(seed)
        out = np.zeros((W, K), dtype=np.float64)
        p = self.params
        if self.kind == "exp":
            out[:] = rng.exponential(p[0] / 1e3, size=(W, K))
        elif self.kind == "straggler":
            rank = int(p[0])
            if rank >= W:
                raise ValueError(f"delay {self}: straggler rank {rank} is not < world size {W}")
            out[rank] = p[1] / 1e3
        elif self.kind == "rotate":
            k = np.arange(K)
            out[k % W, k] = p[0] / 1e3
        elif self.kind == "spikes":
            out[:] = np.where(rng.random((W, K)) < p[0], p[1] / 1e3, 0.0)
        elif self.kind == "skew":
            if base_ms is None or not base_ms > 0 or not math.isfinite(base_ms):
                raise ValueError(f"delay {self} needs base_ms > 0 (the compute time it scales)")
            extra = np.clip(self.skew_load(W, seed) - 1.0, 0.0, None)
            out[:] = (base_ms / 1e3 * extra)[:, None]
        return out

    def skew_load(self, world_size: int, seed: int = 0) -> np.ndarray:
        """Per-rank load m_r relative to an even spread (mean 1) for ``skew``; ones otherwise."""
        if self.kind != "skew":
            return np.ones(world_size)
        hot = np.random.default_rng(seed).permutation(world_size)  # hot[r] = r's place, 0 hottest
        v = (hot + 1.0) ** -self.params[0]
        return world_size * v / v.sum()


def sleep_schedule(schedule: np.ndarray, rank: int) -> Callable[[int], float]:
    """A function ``sleep(k)`` that sleeps rank's delay for iteration k and returns the seconds."""
    schedule = np.asarray(schedule, dtype=np.float64)
    if schedule.ndim != 2 or not 0 <= rank < schedule.shape[0]:
        raise ValueError(f"rank {rank} is not a row of a schedule of shape {schedule.shape}")
    row = schedule[rank].tolist()

    def sleep(k: int) -> float:
        s = row[k]
        if s > 0:
            time.sleep(s)
        return s

    return sleep
