"""The BLS engine: bounded-lag alltoallv channels over a transport (see channel.py)."""

from blsgpu.exchange.args import MAX_BOUND
from blsgpu.exchange.channel import DEFAULT_INLINE_BYTES, BoundedLagAllToAll, ExchangeHandle

__all__ = ["DEFAULT_INLINE_BYTES", "MAX_BOUND", "BoundedLagAllToAll", "ExchangeHandle"]
