"""Named ranges for profilers: NVTX (nsys) when the `nvtx` package is present, and torch.profiler.

One call site, both tools: `with span("post", channel="bls0", iteration=3): ...` shows up as
"blsgpu.post[bls0:3]" in an nsys timeline and in a torch.profiler trace alike. With neither tool
recording, a span costs about 0.1 microsecond.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function

from blsgpu import _env

try:  # optional: pip install nvtx (in the cuda extras)
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None

_NVTX = _nvtx is not None and _env.nvtx_enabled()


def span_name(what: str, channel: str | None = None, iteration: int | None = None) -> str:
    if channel is None:
        return f"blsgpu.{what}"
    if iteration is None:
        return f"blsgpu.{what}[{channel}]"
    return f"blsgpu.{what}[{channel}:{iteration}]"


_profiler_enabled = torch._C._autograd._profiler_enabled


@contextlib.contextmanager
def _traced(name: str):
    with record_function(name):
        if _NVTX:
            with _nvtx.annotate(name, domain="blsgpu"):
                yield
        else:
            yield


def _always() -> bool:
    return True


# Whether spans are recorded now: NVTX is present, or a torch profiler runs (one C call).
active = _always if _NVTX else _profiler_enabled


def span(what: str, channel: str | None = None, iteration: int | None = None):
    """A range named blsgpu.<what>[<channel>:<iteration>] in NVTX and torch.profiler.

    With no profiler recording and no NVTX, it is a shared no-op context (about 0.1 us): the
    engine opens several per iteration.
    """
    if not _NVTX and not _profiler_enabled():
        return _NOOP
    return _traced(span_name(what, channel, iteration))


_NOOP = contextlib.nullcontext()
