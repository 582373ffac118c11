"""Posting an iteration: exchange() checks its arguments, fills the send slot, builds every peer's
header (and inline payload) and posts the MESSAGE alltoall of the iteration. It never waits for peers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from blsgpu._trace import active as tracing
from blsgpu.errors import BoundError
from blsgpu.exchange.args import as_splits
from blsgpu.exchange.iteration import Iteration
from blsgpu.exchange.message import (
    DTYPE_CODE,
    HEADER_BYTES,
    MAX_TRAILING_DIMS,
    Buffer,
    Rows,
    fill_message,
    host_bytes,
)
from blsgpu.transport.base import MESSAGE

# Without the C module, payloads from this size on go from the caller's tensor straight into the
# message; smaller ones are copied into the send slot first (one torch copy costs less than a numpy
# view of the caller's bytes). The C module reads the caller's bytes by address: always direct.
_DIRECT_MIN_BYTES = 16 << 10
_CPU = torch.device("cpu")


class Posting:
    """The posting half of BoundedLagAllToAll (channel.py), whose __init__ sets the state used here."""

    def _post(self, send: torch.Tensor, send_splits: Any, recv_splits: Any, out: Any = None) -> Iteration:
        if self._closed or self._broken is not None:
            self._check_usable()
        kind = self._kind_of(send)
        W, me = self.world_size, self.rank
        send_splits = as_splits(send_splits, W, "send_splits")
        n = send.shape[0]
        if sum(send_splits) != n:
            raise ValueError(f"send_splits sum to {sum(send_splits)} but send has {n} rows (dim 0)")
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
        if out is not None:
            _check_out(out, send, recv_splits)
        device = send.device
        if device != self._send_device:  # a device not seen before: ask the transport once
            self._new_send_device(device)
        k = self._next_k
        if k - self._next_wait > self.bound:
            self._check_bound(k)  # raises BoundError
        rb = kind.row_bytes
        # Per peer (this rank left out): rows. Unless some payload is too large to inline (then
        # this rank sends every payload in the data alltoall), each rides behind its header.
        rows_p = send_splits[:me] + send_splits[me + 1 :]
        cap = self._inline
        if cap:
            spill = bool(rows_p) and max(rows_p) * rb > cap
        else:  # every payload, this rank's own rows too, travels in the data alltoall
            spill = rb > 0 and n > 0
        out_device = self.device if self.device is not None else device
        direct = self._direct and not spill and (self._native is not None or n * rb >= _DIRECT_MIN_BYTES)
        src = self._caller_bytes(send) if direct else None
        if src is not None:
            ring = self._slots[k % (self.bound + 1)]
            if send.untyped_storage().data_ptr() == ring.ptr:
                _check_ring_view(send, ring)
            # The message is the only copy of the payload: no send slot (a peer's spill, which
            # needs one, has it rebuilt from the message: Progress._slot_of).
            it = Iteration(k, kind, None, send_splits, recv_splits, out_device)
        else:
            buf, _ = self._fill_slot(k, send)
            it = Iteration(k, kind, buf, send_splits, recv_splits, out_device)
        it.spill = spill
        if out is not None:
            it.out = out
            if self._direct and _plain_host(out):
                it.out_direct = True  # gathered (or received) in place
        it.prev = self._records.get(k - 1)
        i = k % (self.bound + 1)
        total = self._write_message(it, i, src)
        if self._ordered:
            # Stream-ordered: the progress thread posts every alltoall of the channel,
            # in one order on every rank; here only the slot's readiness is marked.
            if spill:
                self.transport.slot_written(k)  # where the caller's stream finished writing the slot
            if W > 1 and not self._known:
                it.msg_args = self._message_args(i, total, spill, rows_p, rb)
        elif W > 1:
            try:
                it.msg_work = self.transport.alltoall(
                    MESSAGE, k, *self._message_args(i, total, spill, rows_p, rb)
                )
            except Exception as e:  # the transport refuses to post: the channel is gone
                raise self._fail(k, "posting", e) from e
        self._bytes_sent += (n - send_splits[me]) * rb
        self._records[k] = it
        self._next_k = k + 1
        self._counters.post(k)
        if self._eager and (self._handoff_always or spill or self._spilled):
            it.queued = True
            self._queue.put(it)
        return it

    def _post_fast(self, send: Any, send_splits: Any, recv_splits: Any, out: Any) -> Iteration | None:
        """exchange() in the common case on a host transport with the C module, in two C calls for
        the checks and the byte work (post_inline, then place_own once the messages are posted):
        a contiguous host tensor of a kind of rows seen before, splits given as lists (or tuples)
        of ints, every peer's payload inline, no profiler recording (the general path names every
        phase). With recv_splits, the result (`out`, or a tensor allocated once the messages are
        posted) takes this rank's own rows straight away.

        Returns None, having changed nothing, for every other case: the general path (_post) then
        runs, and it is also what says what is wrong with bad arguments.
        """
        k = self._next_k
        if (
            self._broken is not None
            or self._closed
            or self._spilled
            or k - self._next_wait > self.bound
            or type(send) is not torch.Tensor
            or not send.is_cpu
            or send.layout is not torch.strided
            or not send.is_contiguous()
            or send.is_conj()
            or send.is_neg()
            or tracing()
        ):
            return None
        shape = send.shape
        kind = self._kinds.get((send.dtype, shape[1:])) if shape else None
        if kind is None or not kind.row_bytes:
            return None
        ptr = send.data_ptr()
        i = k % (self.bound + 1)
        ring = self._slots[i]
        if ring.ptr <= ptr < ring.ptr + ring.cap:  # a view into the send ring: the general path checks it
            return None
        res, cap = None, 0
        if out is not None:
            if (
                recv_splits is None
                or type(out) is not torch.Tensor
                or out.dtype is not send.dtype
                or out.shape[1:] != shape[1:]
                or not _plain_host(out)
            ):
                return None
            res, cap = out, out.numel() * out.element_size()
        W, me, rb, native = self.world_size, self.rank, kind.row_bytes, self._native
        at = res.data_ptr() if res is not None else 0
        buf = self._msg_out[i]
        args = (
            ptr,
            shape[0],
            send_splits,
            recv_splits,
            W,
            me,
            rb,
            self._inline,
            kind.fixed,
            k,
            self._counters.released,
            at,
            cap,
        )
        got = native.post_inline(buf.ptr, buf.cap, *args)
        if type(got) is int:  # the message buffer is too small for this iteration: grow it
            buf.host(got)
            got = native.post_inline(buf.ptr, buf.cap, *args)
        if got is None:
            return None
        total, send_splits, recv_splits, sizes = got
        # The messages leave first; what only this rank needs is done while they travel.
        work = None
        if W > 1:
            try:
                work = self.transport.alltoall(
                    MESSAGE, k, self._msg_in_t[i], self._msg_out_sizes, buf.torch(total), sizes
                )
            except Exception as e:  # the transport refuses to post: the channel is gone
                raise self._fail(k, "posting", e) from e
        if res is None and recv_splits is not None:
            # The result, sized by the splits (post_inline checked them), is allocated only now,
            # while the messages travel; post_inline kept room for the own rows behind the
            # messages in case it cannot be (wait() then allocates it, or says why not).
            n = sum(recv_splits)
            try:
                res = torch.empty((n, *kind.trailing), dtype=kind.dtype)
            except RuntimeError:
                pass
            else:
                at, cap = res.data_ptr(), n * rb
        it = Iteration(k, kind, None, send_splits, recv_splits, _CPU)
        it.fast = True
        it.msg_work = work
        if res is not None:
            it.out, it.out_direct, it.own_in_out, it.out_at, it.out_cap = res, True, True, at, cap
        else:
            it.own_buf, it.own_lo = buf, total
        it.prev = self._records.get(k - 1)
        self._bytes_sent += (shape[0] - send_splits[me]) * rb
        self._records[k] = it
        self._next_k = k + 1
        self._counters.post(k)
        self._fast_posts += 1
        # Own rows last (send may be reused once exchange() returns).
        native.place_own(ptr, shape[0], send_splits, recv_splits, me, rb, buf.ptr, buf.cap, total, at, cap)
        return it

    def _write_message(self, it: Iteration, i: int, src: Any) -> int:
        """Fill message buffer i with every peer's header and, unless the iteration spills, its
        payload; returns the bytes to post. The payload comes from `src`, the caller's send bytes
        (from _caller_bytes), whose own rows are kept behind the messages since the caller may
        reuse `send` at once; or, when src is None, from the iteration's send slot."""
        W, me, H = self.world_size, self.rank, HEADER_BYTES
        kind, send_splits, spill = it.kind, it.send_splits, it.spill
        rb, slot = kind.row_bytes, it.buf
        n_me = 0 if spill else send_splits[me] * rb
        total = H * (W - 1) + (0 if spill else sum(send_splits) * rb - n_me)
        keep = src is not None
        buf = self._msg_out[i]
        buf.host(total + (n_me if keep else 0))
        args = (send_splits, me, rb, kind.fixed, it.k, self._counters.released, spill, it.recv_splits, keep)
        if self._native is not None:
            if keep:
                at, cap = src, sum(send_splits) * rb
            elif slot is not None and slot.np is not None:  # host memory (a device slot is never read)
                at, cap = slot.ptr, slot.cap
            else:
                at, cap = 0, 0
            self._native.fill_message(buf.ptr, buf.cap, at, cap, *args)
        else:
            fill_message(buf.np, src if keep else (slot.np if slot is not None else None), *args)
        if keep:
            it.own_buf, it.own_lo = buf, total
        elif slot is not None:
            it.own_buf, it.own_lo = slot, sum(send_splits[:me]) * rb
        return total

    def _caller_bytes(self, send: torch.Tensor) -> Any:
        """The bytes of `send` as the byte work reads them (an address for the C module, a numpy
        view otherwise) when they can be read in place: a contiguous host tensor; else None."""
        if not _plain_host(send):
            return None
        return send.data_ptr() if self._native is not None else host_bytes(send)

    def _message_args(self, i: int, total: int, spill: bool, rows_p: list[int], rb: int) -> tuple:
        """(out, out_sizes, inp, in_sizes) of the MESSAGE alltoall from message buffer i."""
        me, H = self.rank, HEADER_BYTES
        sizes_p = [H] * (self.world_size - 1) if spill else [H + r * rb for r in rows_p]
        sizes_p.insert(me, 0)
        return (self._msg_in_t[i], self._msg_out_sizes, self._msg_out[i].torch(total), sizes_p)

    def _new_send_device(self, device: torch.device) -> None:
        self._send_device = device
        staging = self.transport.staging(device)
        if staging is not None and not self._warned_staging:
            self._warned_staging = True
            warnings.warn(
                f"channel {self.name!r} runs on {self.transport.name}: {staging}",
                RuntimeWarning,
                stacklevel=5,
            )

    def _kind_of(self, send: Any) -> Rows:
        """What kind of rows `send` holds (cached per dtype and trailing dims), or the reason it
        cannot be sent."""
        if not isinstance(send, torch.Tensor):
            raise TypeError(f"send must be a torch.Tensor, got {type(send).__name__}")
        if send.layout != torch.strided:
            raise TypeError(f"send must be a dense (strided) tensor, got layout {send.layout}")
        if send.is_meta:
            raise ValueError("send is on the meta device: it has no data to exchange")
        shape = send.shape
        if not shape:
            raise ValueError("send must have at least one dimension (rows are split along dim 0)")
        key = (send.dtype, shape[1:])
        kind = self._kinds.get(key)
        if kind is not None:
            return kind
        if len(shape) - 1 > MAX_TRAILING_DIMS:
            raise ValueError(
                f"send has {len(shape) - 1} trailing dims; at most {MAX_TRAILING_DIMS} supported"
            )
        if send.dtype not in DTYPE_CODE:
            raise TypeError(f"send dtype {send.dtype} is not supported by the exchange")
        kind = self._kinds[key] = Rows(self.transport.channel_id, send.dtype, tuple(shape[1:]))
        return kind

    def _fill_slot(self, k: int, send: torch.Tensor) -> tuple[Buffer, torch.Tensor]:
        nbytes = send.numel() * send.element_size()
        buf = self._slot(k, nbytes)
        if not nbytes:
            return buf, send.new_empty(send.shape, device=buf.t.device)
        if send.untyped_storage().data_ptr() == buf.ptr:
            _check_ring_view(send, buf)
            return buf, send  # filled in place through send_buffer()
        slot = buf.typed(send.dtype, send.shape)
        slot.copy_(send)
        return buf, slot

    def _slot(self, k: int, nbytes: int) -> Buffer:
        """Send slot k % (B+1), at least nbytes long, on the transport's device."""
        buf = self._slots[k % (self.bound + 1)]
        if buf.t is None or buf.cap < nbytes:
            # On the transport's device: a device transport reads the slot itself (a fused lookup
            # can write straight into it through send_buffer()); a host transport's is host memory.
            buf.grow(nbytes, self.transport.empty)
        return buf

    def _check_bound(self, k: int) -> None:
        outstanding = k - self._next_wait
        if outstanding >= self.bound + 1:
            raise BoundError(
                f"channel {self.name!r} (rank {self.rank}): {outstanding} exchanges outstanding "
                f"with bound B={self.bound}; wait() iteration {self._next_wait} before posting "
                f"iteration {k}"
            )


def _check_ring_view(send: torch.Tensor, buf: Buffer) -> None:
    """`send` lies in a send slot: it must be what send_buffer() returned (or a prefix of it)."""
    if not (send.is_contiguous() and send.data_ptr() == buf.ptr):
        raise ValueError(
            "send is a view into the channel's send buffer that does not start at it (or is "
            "not contiguous): pass the tensor send_buffer() returned, or a prefix of it"
        )


def _check_out(out: Any, send: torch.Tensor, recv_splits: list[int] | None) -> None:
    """`out` must hold exactly the rows this rank receives, of send's dtype and trailing dims."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if recv_splits is None:
        raise ValueError("out= needs recv_splits (they size it)")
    want = (sum(recv_splits), *send.shape[1:])
    if out.dtype != send.dtype or tuple(out.shape) != want:
        raise ValueError(
            f"out is {out.dtype} {list(out.shape)} but this exchange receives {send.dtype} {list(want)}"
        )
    if out.is_conj():
        raise ValueError("out is a conjugate view: received rows cannot be written through it")


def _plain_host(t: torch.Tensor) -> bool:
    """A contiguous host tensor whose bytes are its values (no lazy conjugate or negative bit):
    the byte work may read or write it in place."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()
