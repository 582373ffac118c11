"""blsgpu: bounded-lag synchronous (BLS) alltoallv for distributed DLRM inference.

The package only re-exports. Heavy modules (Triton kernels, TorchRec interop, the DLRM model) load on
first use, so ``import blsgpu`` needs neither Triton, CuPy nor NCCL. Importing registers the
torch.distributed backend ``"bls"``.
"""

from __future__ import annotations

import importlib

from blsgpu import _autoload
from blsgpu.errors import BLSError, BoundError, LinkError, PeerError, PeerFailure, RankError
from blsgpu.exchange.channel import BoundedLagAllToAll, ExchangeHandle
from blsgpu.world import run_world

__version__ = "0.1.0"

# `import blsgpu` registers "bls" too (where torch's autoload is off): the same registration.
_autoload.register()

# name -> module that defines it; loaded lazily (PEP 562).
_LAZY = {
    "pooled_lookup": "blsgpu.lookup.pooled",
    "QuantizedTable": "blsgpu.lookup",
    "KeyedJaggedTensor": "blsgpu.embedding",
    "KeyedTensor": "blsgpu.embedding",
    "EmbeddingBagConfig": "blsgpu.embedding",
    "EmbeddingBagCollection": "blsgpu.embedding",
    "ShardedEmbeddingBagCollection": "blsgpu.embedding",
    "shard": "blsgpu.embedding",
}

__all__ = [
    "BLSError",
    "BoundError",
    "BoundedLagAllToAll",
    "ExchangeHandle",
    "LinkError",
    "PeerError",
    "PeerFailure",
    "RankError",
    "run_world",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blsgpu' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
