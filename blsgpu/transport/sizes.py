"""Where consecutive regions start, from their sizes: the one prefix sum every layer uses.

Alltoall buffers hold one region per rank, the lookup's output one column block per table, the
sharded collection's messages one run of ids per slot; each is laid out from its sizes the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate


def offsets(sizes: Iterable[int]) -> list[int]:
    """[0, s_0, s_0 + s_1, ..., sum(s)]: region i is [offsets[i], offsets[i + 1])."""
    return list(accumulate(sizes, initial=0))
