"""Checks of what a caller passes to a channel: refused before anything is sent, with what was wrong."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from blsgpu import _env

MAX_BOUND = 4096
_INT64_MAX = 2**63 - 1


def check_options(bound: Any, timeout: timedelta | float | None, inline_bytes: Any) -> float:
    """A channel's bound and inline capacity checked; its timeout in seconds (None: the default)."""
    if isinstance(bound, bool) or not isinstance(bound, int):
        raise TypeError(f"bound must be an int, got {type(bound).__name__}")
    if bound < 0:
        raise ValueError(f"bound must be >= 0, got {bound}")
    if bound > MAX_BOUND:
        raise ValueError(f"bound must be <= {MAX_BOUND}, got {bound}")
    if timeout is None:
        timeout = _env.default_timeout()
    timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not 0 < timeout_s <= _env.MAX_TIMEOUT_S:  # also refuses nan and inf
        raise ValueError(f"timeout must be positive and at most {_env.MAX_TIMEOUT_S:.0e} s, got {timeout!r}")
    if inline_bytes is not None and (
        isinstance(inline_bytes, bool) or not isinstance(inline_bytes, int) or inline_bytes < 0
    ):
        raise ValueError(f"inline_bytes must be a non-negative int, got {inline_bytes!r}")
    return timeout_s


def as_splits(splits: Any, world_size: int, what: str) -> list[int]:
    """`splits` as a list of world_size non-negative Python ints, or TypeError / ValueError."""
    # Fast path: a list (or tuple) of W non-negative Python ints, as most callers pass.
    if (
        (type(splits) is list or type(splits) is tuple)
        and len(splits) == world_size
        and all(type(s) is int for s in splits)
    ):
        if not splits or (min(splits) >= 0 and sum(splits) <= _INT64_MAX):
            return list(splits)
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.dtype.is_floating_point or splits.is_complex():
            raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints")
        splits = splits.tolist()
    if isinstance(splits, (str, bytes, Mapping, set, frozenset)):
        # A dict would be read by its keys and a set in no particular order: never what was meant.
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}")
    try:
        items = list(splits)
    except TypeError as e:
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}") from e
    try:
        # Integers only (Python, numpy, 0-d integer tensors): a float, even 2.0, is refused rather
        # than truncated into a split that may still add up.
        out = [s if type(s) is int else operator.index(s) for s in items]
    except TypeError:
        bad = next(s for s in items if not _is_index(s))
        raise TypeError(f"{what} must hold integers, got {bad!r}") from None
    if len(out) != world_size:
        raise ValueError(f"{what} has {len(out)} entries; it needs one per rank ({world_size})")
    if out and min(out) < 0:
        neg = [i for i, s in enumerate(out) if s < 0]
        raise ValueError(f"{what} has negative entries at ranks {neg}: {out}")
    if sum(out) > _INT64_MAX:
        raise ValueError(f"{what} sum to {sum(out)}, more rows than an int64 counts")
    return out


def _is_index(x: Any) -> bool:
    try:
        operator.index(x)
        return True
    except TypeError:
        return False
