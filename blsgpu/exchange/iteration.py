"""One posted iteration as the engine records it (the caller holds an ExchangeHandle to it)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from blsgpu.exchange.message import Buffer


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

    def __init__(
        self,
        k: int,
        slot: torch.Tensor,
        buf: Buffer,
        head: np.ndarray,
        send_splits: list[int],
        recv_splits: list[int] | None,
        row_bytes: int,
        out_device: torch.device,
    ):
        self.k = k
        self.slot = slot  # [n, *trailing], contiguous, on the transport's device
        self.buf = buf  # the send slot's buffer
        self.head = head  # this rank's header row for the iteration's dtype and trailing dims
        self.send_splits = send_splits
        self.recv_splits = recv_splits
        self.row_bytes = row_bytes
        self.out_device = out_device
