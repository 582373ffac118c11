"""Transports: how a channel's bytes move between ranks (base.py describes the interface).

make_transport() is the one place that picks a transport for a channel, so the engine above never
names a device kind or a communication library.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from blsgpu.transport import local as _local
from blsgpu.transport.base import Transport
from blsgpu.transport.gloo import GlooTransport

__all__ = ["Transport", "gpu_path_available", "make_transport"]


def make_transport(kind: Any, group: Any, device: torch.device | None, timeout_s: float) -> Transport:
    """The transport of a new channel of `group`.

    kind: "local" (a group of blsgpu.transport.local.run_local), "nccl", "gloo", or "auto": local
    inside run_local, else nccl for a CUDA `device` when the GPU path is available, else gloo. A
    transport object (anything with alltoall) is used as it is (benchmarks, tests).
    """
    if not isinstance(kind, str) and hasattr(kind, "alltoall"):
        return kind
    if kind not in ("auto", "gloo", "nccl", "local"):
        raise ValueError(f"transport must be 'auto', 'gloo', 'nccl' or 'local', got {kind!r}")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "this rank is not a member of the group (dist.new_group returned NON_GROUP_MEMBER): "
            "only the group's ranks create its channels"
        )
    local = _local.resolve_group(group)
    if kind == "local" or (kind == "auto" and local is not None):
        if local is None:
            raise ValueError("transport 'local' needs a group of blsgpu.transport.local.run_local")
        return _local.LocalTransport(local)
    if isinstance(group, _local.LocalGroup):
        raise ValueError(f"transport {kind!r} cannot run over an in-process group; use 'local'")
    want_nccl = kind == "nccl" or (
        kind == "auto" and device is not None and device.type == "cuda" and gpu_path_available()
    )
    if want_nccl:
        from blsgpu.transport import nccl  # CuPy and NCCL load only on the GPU path

        return nccl.NcclTransport(group, device)
    return GlooTransport(group, timeout_s)


def gpu_path_available() -> bool:
    """A CUDA device is visible and CuPy's NCCL imports."""
    if not torch.cuda.is_available():
        return False
    from blsgpu.transport import nccl_lib  # CuPy loads only on the GPU path

    return nccl_lib.available()
