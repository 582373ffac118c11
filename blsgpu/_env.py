"""Every BLSGPU_* environment variable, read in this one module, and the names blsgpu registers.

Arguments come first; these only reach what an argument cannot (e.g. a backend built by
torch.distributed, or a test harness).
"""

from __future__ import annotations

import os
from datetime import timedelta

BACKEND_NAME = "bls"  # the torch.distributed backend: dist.init_process_group("bls")
BACKEND_DEVICES = ["cpu", "cuda"]


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a number") from e


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not an integer") from e


def backend_bound() -> int:
    """Lag bound B used by the "bls" torch.distributed backend (default 4)."""
    return _int("BLSGPU_BOUND", 4)


MAX_TIMEOUT_S = 1e9  # about 30 years: as good as forever, and still a finite wait for gloo


def default_timeout() -> timedelta:
    """Timeout of a channel when none is given (default 300 s)."""
    seconds = _float("BLSGPU_TIMEOUT_S", 300.0)
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise ValueError(f"BLSGPU_TIMEOUT_S={seconds!r} must be positive and at most {MAX_TIMEOUT_S:.0e} s")
    return timedelta(seconds=seconds)


def nvtx_enabled() -> bool:
    """NVTX ranges on (default) unless BLSGPU_NVTX=0."""
    return os.environ.get("BLSGPU_NVTX", "1") != "0"


def fast_enabled() -> bool:
    """The host fast path (two C calls each for exchange() and wait()) where it applies (default)
    unless BLSGPU_FAST=0, which sends every iteration the general way."""
    return os.environ.get("BLSGPU_FAST", "1") != "0"


def native_enabled() -> bool:
    """The engine's byte work in C where it was built (default) unless BLSGPU_NATIVE=0."""
    return os.environ.get("BLSGPU_NATIVE", "1") != "0"
