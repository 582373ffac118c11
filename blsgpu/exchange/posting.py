"""Posting an iteration: exchange() checks its arguments, fills the send slot, builds every peer's
header (and inline payload) and posts the MESSAGE alltoall of the iteration. It never waits for peers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from blsgpu.errors import BoundError
from blsgpu.exchange.args import as_splits
from blsgpu.exchange.iteration import Iteration
from blsgpu.exchange.message import (
    DTYPE_CODE,
    H_EXPECT,
    H_ITER,
    H_RELEASED,
    H_ROWS,
    H_SPILL,
    HEADER_BYTES,
    HEADER_LEN,
    MAX_TRAILING_DIMS,
    NO_BYTES,
    Buffer,
    header_row,
)
from blsgpu.transport.base import MESSAGE
from blsgpu.transport.sizes import offsets


class Posting:
    """The posting half of BoundedLagAllToAll (channel.py), whose __init__ sets the state used here."""

    def _post(self, send: torch.Tensor, send_splits: Any, recv_splits: Any) -> Iteration:
        self._check_usable()
        if not isinstance(send, torch.Tensor):
            raise TypeError(f"send must be a torch.Tensor, got {type(send).__name__}")
        if send.layout != torch.strided:
            raise TypeError(f"send must be a dense (strided) tensor, got layout {send.layout}")
        if send.is_meta:
            raise ValueError("send is on the meta device: it has no data to exchange")
        if send.dim() < 1:
            raise ValueError("send must have at least one dimension (rows are split along dim 0)")
        if send.dim() - 1 > MAX_TRAILING_DIMS:
            raise ValueError(
                f"send has {send.dim() - 1} trailing dims; at most {MAX_TRAILING_DIMS} supported"
            )
        if send.dtype not in DTYPE_CODE:
            raise TypeError(f"send dtype {send.dtype} is not supported by the exchange")
        W, me = self.world_size, self.rank
        send_splits = as_splits(send_splits, W, "send_splits")
        if sum(send_splits) != send.shape[0]:
            raise ValueError(
                f"send_splits sum to {sum(send_splits)} but send has {send.shape[0]} rows (dim 0)"
            )
        if recv_splits is not None:
            recv_splits = as_splits(recv_splits, W, "recv_splits")
            if recv_splits[me] != send_splits[me]:
                raise ValueError(
                    f"recv_splits[{me}]={recv_splits[me]} but this rank sends "
                    f"send_splits[{me}]={send_splits[me]} rows to itself"
                )
        elif self._known:
            raise ValueError(
                f"channel {self.name!r} was created with known_splits=True: every exchange passes recv_splits"
            )
        tr = self.transport
        device = send.device
        if device != self._send_device:  # a device not seen before: ask the transport once
            self._send_device = device
            staging = tr.staging(device)
            if staging is not None and not self._warned_staging:
                self._warned_staging = True
                warnings.warn(
                    f"channel {self.name!r} runs on {tr.name}: {staging}", RuntimeWarning, stacklevel=3
                )
        k = self._next_k
        self._check_bound(k)
        buf, slot = self._fill_slot(k, send)
        trailing = send.shape[1:]
        row_bytes = send.element_size() * math.prod(trailing)
        out_device = self.device if self.device is not None else device
        head = self._head(send.dtype, trailing)
        it = Iteration(k, slot, buf, head, send_splits, recv_splits, row_bytes, out_device)
        it.prev = self._records.get(k - 1)

        # Per peer (this rank left out): rows and bytes. Unless some payload is too large to inline
        # (then this rank sends every payload in the data alltoall), each rides behind its header.
        rows_p = send_splits[:me] + send_splits[me + 1 :]
        nbs_p = [s * row_bytes for s in rows_p]
        cap = self._inline
        if cap:
            spill = bool(nbs_p) and max(nbs_p) > cap
        else:  # every payload, this rank's own rows too, travels in the data alltoall
            spill = row_bytes > 0 and any(send_splits)
        it.spill = spill
        H, i = HEADER_BYTES, k % (self.bound + 1)
        sizes_p = [H] * (W - 1) if spill else [H + nb for nb in nbs_p]
        total = sum(sizes_p)
        out_buf = self._msg_out[i]
        msg = out_buf.host(total)
        uniform = spill or not nbs_p or nbs_p.count(nbs_p[0]) == W - 1
        if uniform:  # every peer's message alike: fill the buffer as a [W-1, H + nb] table
            step = sizes_p[0] if sizes_p else H
            table = msg[:total].reshape(W - 1, step)
            hdr = table[:, :H].view(np.int64)
        else:
            hdr = np.empty((W - 1, HEADER_LEN), dtype=np.int64)
        row = head.copy()
        row[H_ITER] = k
        row[H_RELEASED] = self._counters.released
        row[H_SPILL] = spill
        hdr[:] = row
        hdr[:, H_ROWS] = rows_p
        if recv_splits is not None:
            hdr[:, H_EXPECT] = recv_splits[:me] + recv_splits[me + 1 :]
        if not spill and total > H * (W - 1):
            src = buf.np  # host bytes of the slot (inline payloads: a host transport)
            if uniform:
                nb = nbs_p[0]
                table[:me, H:] = src[: me * nb].reshape(me, nb)
                after = me * nb + send_splits[me] * row_bytes  # peers after this rank's own rows
                table[me:, H:] = src[after : after + (W - 1 - me) * nb].reshape(W - 1 - me, nb)
            else:
                nbs = [s * row_bytes for s in send_splits]
                starts = offsets(nbs)
                chunks = np.split(src[: starts[-1]], starts[1:-1])
                del chunks[me]
                parts: list[np.ndarray] = [NO_BYTES] * (2 * (W - 1))
                parts[0::2] = hdr.view(np.uint8)
                parts[1::2] = chunks
                np.concatenate(parts, out=msg[:total])
        in_sizes = sizes_p[:me] + [0] + sizes_p[me:]
        in_buf = self._msg_in[i]
        in_buf.host(self._msg_in_bytes)
        if self._ordered:
            # Stream-ordered: the progress thread posts every alltoall of the channel,
            # in one order on every rank; here only the slot's readiness is marked.
            if spill:
                tr.slot_written(k)  # where the caller's stream finished writing the slot
            if W > 1 and not self._known:
                it.msg_args = (
                    in_buf.torch(self._msg_in_bytes),
                    self._msg_out_sizes,
                    out_buf.torch(total),
                    in_sizes,
                )
        elif W > 1:
            try:
                it.msg_work = tr.alltoall(
                    MESSAGE,
                    k,
                    in_buf.torch(self._msg_in_bytes),
                    self._msg_out_sizes,
                    out_buf.torch(total),
                    in_sizes,
                )
            except Exception as e:  # the transport refuses to post: the channel is gone
                raise self._fail(k, "posting", e) from e
        self._bytes_sent += sum(nbs_p)
        self._records[k] = it
        self._next_k = k + 1
        self._counters.post(k)
        if self._eager and (self._handoff_always or spill or self._spilled):
            it.queued = True
            self._queue.put(it)
        return it

    def _fill_slot(self, k: int, send: torch.Tensor) -> tuple[Buffer, torch.Tensor]:
        nbytes = send.numel() * send.element_size()
        buf = self._slot(k, nbytes)
        if not nbytes:
            return buf, send.new_empty(send.shape, device=buf.t.device)
        if send.untyped_storage().data_ptr() == buf.ptr:
            if send.is_contiguous() and send.data_ptr() == buf.ptr:
                return buf, send  # filled in place through send_buffer()
            raise ValueError(
                "send is a view into the channel's send buffer that does not start at it (or is "
                "not contiguous): pass the tensor send_buffer() returned, or a prefix of it"
            )
        slot = buf.typed(send.dtype, send.shape)
        slot.copy_(send)
        return buf, slot

    def _slot(self, k: int, nbytes: int) -> Buffer:
        """Send slot k % (B+1), at least nbytes long, on the transport's device."""
        buf = self._slots[k % (self.bound + 1)]
        if buf.t is None or buf.t.numel() < nbytes:
            # On the transport's device: a device transport reads the slot itself (a fused lookup
            # can write straight into it through send_buffer()); a host transport's is host memory.
            buf.grow(nbytes, self.transport.empty)
        return buf

    def _head(self, dtype: torch.dtype, trailing: tuple[int, ...]) -> np.ndarray:
        """This rank's header row for rows of (dtype, trailing dims); per-iteration fields 0."""
        head = self._heads.get((dtype, trailing))
        if head is None:
            head = self._heads[(dtype, trailing)] = header_row(self.transport.channel_id, dtype, trailing)
        return head

    def _check_bound(self, k: int) -> None:
        outstanding = k - self._next_wait
        if outstanding >= self.bound + 1:
            raise BoundError(
                f"channel {self.name!r} (rank {self.rank}): {outstanding} exchanges outstanding "
                f"with bound B={self.bound}; wait() iteration {self._next_wait} before posting "
                f"iteration {k}"
            )
