"""One posted iteration as the engine records it (the caller holds an ExchangeHandle to it)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from blsgpu.exchange.message import Buffer, Rows


class Iteration:
    """One posted iteration: what its alltoalls read and write, and how far it got."""

    # Defaults live on the class: an iteration only stores what differs (cheaper to create).
    msg_work: Any = None  # the MESSAGE alltoall (None in a world of one rank)
    spill = False  # this rank sends its payloads in the data alltoall
    queued = False  # handed to the progress thread
    claimed = False  # a thread took it to process
    finished = False  # processed: result (or error) known, data posted if any
    event: threading.Event | None = None  # made by a thread that waits for `finished`
    data_work: Any = None
    result: tuple[torch.Tensor, list[int]] | None = None
    error: BaseException | None = None
    waited = False
    prev: Iteration | None = None  # processed before this one, on every rank alike
    gather_late = False  # no data alltoall: the caller reads the headers and gathers in wait()
    msg_args: tuple | None = None  # stream-ordered: the MESSAGE alltoall the progress thread posts
    out: torch.Tensor | None = None  # where the caller wants the received rows (exchange(out=))
    out_direct = False  # out is contiguous host memory: rows are gathered or received into it
    own_buf: Buffer | None = None  # where this rank's own rows lie (host), from byte own_lo:
    own_lo = 0  # behind the messages (posted from the caller's tensor) or in the send slot
    own_in_out = False  # or in `out` already, at their place (the fast path, with recv_splits)
    out_at = 0  # the address of `out` where own_in_out
    out_cap = 0  # and its bytes
    fast = False  # posted by the fast path (posting.py): wait() checks headers and gathers in C

    def __init__(
        self,
        k: int,
        kind: Rows,
        buf: Buffer | None,
        send_splits: list[int],
        recv_splits: list[int] | None,
        out_device: torch.device,
    ):
        self.k = k
        self.kind = kind  # dtype and trailing dims of the rows
        self.buf = buf  # the send slot, or None: posted from the caller's bytes (see `own`)
        self.send_splits = send_splits
        self.recv_splits = recv_splits
        self.out_device = out_device
