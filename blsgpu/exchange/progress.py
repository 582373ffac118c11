"""Completing iterations: a progress thread (the CPU analogue of the GPU comm stream), or the caller
itself in wait(), reads each iteration's headers, then gathers its inline payloads or posts its DATA
alltoall; wait() completes the data, releases the iteration and returns its tensor.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from blsgpu._trace import active as tracing
from blsgpu._trace import span
from blsgpu.errors import BLSError
from blsgpu.exchange.iteration import Iteration
from blsgpu.exchange.message import (
    EMPTY,
    H_DTYPE,
    H_ITER,
    H_SPILL,
    HEADER_BYTES,
    NO_BYTES,
    Buffer,
    gather,
    header_problems,
    host_bytes,
    host_tensor,
    read_headers,
    row_bytes_of,
)
from blsgpu.transport.base import DATA, MESSAGE


class Progress:
    """The completing half of BoundedLagAllToAll (channel.py), whose __init__ sets the state used
    here."""

    def _progress(self) -> None:
        while True:
            it = self._queue.get()
            if it is None:
                return
            if self._claim(it):
                self._process(it)

    def _progress_ordered(self) -> None:
        """The progress thread of a stream-ordered transport: the only thread that posts.

        Iterations arrive in order (exchange() queues each one at once); for each, its MESSAGE
        alltoall is posted, then its headers read and its DATA alltoall posted (if any), before the
        next iteration's MESSAGE: the same sequence of groups on every rank.
        """
        while True:
            it = self._queue.get()
            if it is None:
                return
            if not self._claim(it):
                continue
            if self._known:
                self._process(it, self._receive_known)
            else:
                self._post_messages(it)
                self._process(it)

    def _receive_known(self, it: Iteration) -> None:
        """A header-less iteration (known_splits): its data group, sized by the splits, at once."""
        rows, kind, c = it.recv_splits, it.kind, self._counters
        rb = kind.row_bytes
        total = sum(rows)
        out = self.transport.empty((total * rb,), torch.uint8)
        c.gate(it.k, self.bound)  # device gate (release of k-B-1) before the data
        # Every rank posts the data group of every iteration (empty where it moves nothing):
        # without headers nobody knows whether another rank has data.
        it.data_work = self._post_data(it, out, [r * rb for r in rows])
        it.result = (out.view(kind.dtype).view((total, *kind.trailing)), rows)
        self._bytes_received += (total - rows[self.rank]) * rb
        c.learn_all(it.k, [c.released] * self.world_size)  # no news from peers

    def _post_messages(self, it: Iteration) -> None:
        args, it.msg_args = it.msg_args, None
        if args is None or self._broken is not None:
            return
        try:
            it.msg_work = self.transport.alltoall(MESSAGE, it.k, *args)
        except Exception as e:  # _process hands the channel's error to the waiting caller
            self._fail(it.k, "posting", e)

    def _claim(self, it: Iteration) -> bool:
        with self._claim_lock:
            if it.claimed:
                return False
            it.claimed = True
            return True

    def _poll(self, it: Iteration) -> bool:
        if not it.queued and not it.claimed:
            it.queued = True
            self._queue.put(it)
        if not it.finished:
            return False
        work = it.data_work
        tr = self.transport
        return work is None or tr.stream_ordered or tr.is_done(work)

    def _process(self, it: Iteration, step: Any = None) -> None:
        """Decide iteration k: by default read its headers, then gather its inline payloads or
        post its data (`step` replaces that). The outcome, or the error, waits for the caller.

        Strictly in iteration order (data alltoalls must be posted in one order on every rank):
        a thread that takes k while another still processes k-1 waits for it first.
        """
        prev, it.prev = it.prev, None
        if prev is not None:
            self._await(prev, None)
        if self._broken is not None:
            it.error = self._broken
        else:
            try:
                with span("receive", self.name, it.k):
                    (step or self._decide)(it)
            except BaseException as e:
                self._hand_error(it, e)
        self._mark_finished(it)

    def _hand_error(self, it: Iteration, e: BaseException) -> None:
        """The waiting caller gets `e`. Anything but a ValueError (bad arguments, ranks that
        disagree, which leave every rank in step) also breaks the channel."""
        it.error = e
        if not isinstance(e, ValueError):
            self._broken = e

    def _mark_finished(self, it: Iteration) -> None:
        """Its result or error is known: wake a thread that waits for it (_await)."""
        with self._claim_lock:
            it.finished = True
            event = it.event
        if event is not None:
            event.set()

    def _decide(self, it: Iteration) -> None:
        self._await_messages(it)
        if (
            threading.current_thread() is self._thread
            and self._gather_late
            and not it.spill
            and not self._received(it.k)[1][:, H_SPILL].any()
        ):
            # No data alltoall in k: nothing peers wait for. Reading the headers and gathering the
            # payloads is left to the caller's wait(), with no hand-off.
            it.gather_late = True
        else:
            self._receive(it)

    def _await(self, it: Iteration, timeout_s: float | None) -> bool:
        """Block until another thread processed `it` (False: not within timeout_s)."""
        with self._claim_lock:
            if it.finished:
                return True
            if it.event is None:
                it.event = threading.Event()
            event = it.event
        return event.wait(timeout_s)

    def _await_messages(self, it: Iteration) -> None:
        if it.msg_work is not None:
            try:
                self.transport.wait_all(it.msg_work, self.timeout_s)
            except Exception as e:
                raise self._fail(it.k, "header", e) from e
            it.msg_work = None

    def _receive(self, it: Iteration) -> None:
        k, W, me = it.k, self.world_size, self.rank
        kind, send_splits, recv_splits = it.kind, it.send_splits, it.recv_splits
        rb, c, native = kind.row_bytes, self._counters, self._native
        # The peers' headers read and checked in one call: their fixed fields against this kind of
        # rows, the fields of the iteration as lists (this rank's own entries at `me`).
        inbuf = self._msg_in[k % (self.bound + 1)]
        own = (send_splits[me], c.released, send_splits[me])
        if native is not None:
            head = native.read_headers(inbuf.ptr, inbuf.cap, W, me, self._stride, kind.fixed, k, *own)
        else:
            head = read_headers(self._received(k)[0], me, kind.fixed, k, *own)
        off, corrupt, rows, released, expect, said, peer_spilled = head
        if corrupt:
            self._corrupt(k, kind)
        c.learn_all(k, released)
        spill = it.spill or peer_spilled
        if spill:
            self._spilled = True
        if off or (recv_splits is not None and recv_splits != rows) or (said and expect != send_splits):
            hdr = self._received(k)[1]
            problems = header_problems(me, kind, hdr, off, rows, expect, send_splits, recv_splits)
            if problems:
                # Complete the iteration so every rank stays in step, then say what disagreed.
                if spill:
                    sizes = [rows[p] * (row_bytes_of(hdr[p - (p > me)]) if p != me else rb) for p in range(W)]
                    scratch = self.transport.empty((sum(sizes),), torch.uint8)
                    c.gate(k, self.bound)
                    it.data_work = self._post_data(it, scratch, sizes)
                it.error = ValueError(
                    f"channel {self.name!r} iteration {k}: the ranks disagree: " + "; ".join(problems)
                )
                return

        total = sum(rows)
        shape = (total, *kind.trailing)
        direct = it.out_direct  # the caller's `out`, checked at posting to hold exactly these rows
        if spill:
            if direct:
                out = _bytes_of(it.out)
            else:
                out = self.transport.empty((total * rb,), torch.uint8)
            c.gate(k, self.bound)  # device gate (released >= k-B) before the data
            it.data_work = self._post_data(it, out, [r * rb for r in rows])
            result = it.out if direct else out.view(kind.dtype).view(shape)
        elif native is not None:
            result = it.out if direct else torch.empty(shape, dtype=kind.dtype)
            self._gather_native(it, result, rows, inbuf)
        else:
            if direct:
                result = it.out
                raw = host_bytes(result) if total * rb else None
            else:
                raw, result = host_tensor(kind.dtype, shape)
            if total * rb:
                gather(raw, self._received(k)[0], rows, me, self._own_rows(it), rb)
        self._bytes_received += (total - rows[me]) * rb
        it.result = (result, rows)

    def _corrupt(self, k: int, kind: Any) -> None:
        """Raise for the first peer whose header of iteration k has a wrong magic, channel or iteration."""
        hdr = self._received(k)[1]
        bad = (hdr[:, :H_DTYPE] != kind.head[:H_DTYPE]).any(axis=1) | (hdr[:, H_ITER] != k)
        q = int(np.flatnonzero(bad)[0])
        raise BLSError(
            f"channel {self.name!r} (rank {self.rank}): corrupt header from peer {q + (q >= self.rank)} for "
            f"iteration {k}: magic, channel, iteration = {hdr[q, :H_DTYPE].tolist() + [int(hdr[q, H_ITER])]}"
        )

    def _own_rows(self, it: Iteration) -> np.ndarray:
        """This rank's own rows of an iteration (host bytes): behind its messages, in its slot, or
        in its result already."""
        me, rb = self.rank, it.kind.row_bytes
        n = it.send_splits[me] * rb
        if it.own_in_out:
            lo = sum(it.recv_splits[:me]) * rb
            return host_bytes(it.out)[lo : lo + n] if n else NO_BYTES
        return it.own_buf.np[it.own_lo : it.own_lo + n]

    def _gather_native(self, it: Iteration, result: torch.Tensor, rows: list[int], inbuf: Buffer) -> None:
        """Every rank's rows of an iteration, in rank order, into `result` (contiguous host memory
        of exactly their bytes), by the C module: peers' from behind their headers in `inbuf`,
        this rank's own from where they lie (_own_at)."""
        rb = it.kind.row_bytes
        total = sum(rows) * rb
        if total:
            me = self.rank
            self._native.gather(
                result.data_ptr(), total, inbuf.ptr, inbuf.cap, self._stride, rows, me,
                self._own_at(it), rows[me] * rb, rb,
            )  # fmt: skip

    def _own_at(self, it: Iteration) -> int:
        """The address of this rank's own rows of an iteration (see _own_rows)."""
        if it.own_in_out:
            return it.out_at + sum(it.recv_splits[: self.rank]) * it.kind.row_bytes
        return it.own_buf.ptr + it.own_lo

    def _received(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The MESSAGE receive buffer of iteration k as a [W-1, stride] table, and its headers."""
        buf = self._msg_in[k % (self.bound + 1)]
        if buf.views is None:
            table = buf.np[: self._msg_in_bytes].reshape(self.world_size - 1, self._stride)
            buf.views = (table, table[:, :HEADER_BYTES].view(np.int64))
        return buf.views

    def _post_data(self, it: Iteration, out: torch.Tensor, out_sizes: list[int]) -> Any:
        rb = it.kind.row_bytes
        nbytes = sum(it.send_splits) * rb
        inp = self._slot_of(it).torch(nbytes) if nbytes else EMPTY
        try:
            return self.transport.alltoall(DATA, it.k, out, out_sizes, inp, [s * rb for s in it.send_splits])
        except Exception as e:
            raise self._fail(it.k, "posting the data", e) from e

    def _slot_of(self, it: Iteration) -> Buffer:
        """The send slot of an iteration. One posted from the caller's bytes has none: its rows are
        in its message (peers' payloads behind their headers, its own behind the messages) and are
        gathered back into the slot (a peer spilled: every rank sends in the data alltoall)."""
        if it.buf is None:
            me, H = self.rank, HEADER_BYTES
            sizes = [s * it.kind.row_bytes for s in it.send_splits]
            buf = it.buf = self._slot(it.k, sum(sizes))
            msg = self._msg_out[it.k % (self.bound + 1)].np
            pieces, at = [], 0
            for p, nb in enumerate(sizes):
                if p == me:
                    pieces.append(self._own_rows(it))
                else:
                    pieces.append(msg[at + H : at + H + nb])
                    at += H + nb
            np.concatenate(pieces, out=buf.np[: sum(sizes)])
        return it.buf

    # ----------------------------------------------------------------------------------------
    # waiting

    def _wait(self, it: Iteration, blocking: bool) -> tuple[torch.Tensor, list[int]]:
        while self._next_wait <= it.k:
            nxt = self._records[self._next_wait]
            if nxt.fast:
                self._finish_fast(nxt, blocking and nxt is it)
            else:
                self._finish(nxt, blocking and nxt is it)
        if it.error is not None:
            raise it.error
        assert it.result is not None
        return it.result

    def _finish_fast(self, it: Iteration, blocking: bool) -> None:
        """Complete an iteration exchange() posted on its fast path: wait for its messages, then
        check every header and gather every payload in one C call (two when the result is only
        sized now). Whatever the first does not take (a peer spilled or disagrees, the transport
        failed), another thread holding the iteration, or a profiler recording, goes the general
        way (_process, _finish)."""
        with self._claim_lock:
            mine = not it.claimed and not tracing()
            if mine:
                it.claimed = True
        if not mine:
            return self._finish(it, blocking)
        k, kind = it.k, it.kind
        t0 = time.monotonic()
        got = None
        try:
            if it.msg_work is not None:
                self.transport.wait_all(it.msg_work, self.timeout_s)
                it.msg_work = None
            inbuf = self._msg_in[k % (self.bound + 1)]
            out = it.out
            head = (
                inbuf.ptr, inbuf.cap, self.world_size, self.rank, self._stride, kind.fixed, k, it.send_splits,
                it.recv_splits, self._counters.released, kind.row_bytes,
            )  # fmt: skip
            if it.own_in_out:  # the result, own rows in place: the payloads go straight into it
                got = self._native.receive_inline(*head, it.out_at, it.out_cap)
            else:
                got = self._native.receive_inline(*head)
        except Exception as e:
            if it.msg_work is not None:  # the transport failed: named now, handed over below
                self._fail(k, "header", e)
        if got is None:
            self._waiting_for_data_s += time.monotonic() - t0
            self._process(it)
            return self._finish(it, blocking)
        rows, released = got
        total = sum(rows)
        try:
            if out is None:  # recv_splits were not given: sized now, own rows behind the messages
                out = torch.empty((total, *kind.trailing), dtype=kind.dtype)
                self._gather_native(it, out, rows, inbuf)
        except Exception as e:  # e.g. no memory for the result: as on the general path
            self._hand_error(it, e)
        else:
            it.result = (out, rows)
            self._bytes_received += (total - rows[self.rank]) * kind.row_bytes
        it.prev = None
        self._mark_finished(it)
        self._waiting_for_data_s += time.monotonic() - t0
        it.waited = True
        del self._records[k]
        self._counters.complete(k, released)
        self._next_wait = k + 1

    def _finish(self, it: Iteration, blocking: bool) -> None:
        with span("wait", self.name, it.k):
            t0 = time.monotonic()
            try:
                self._finish_inner(it, blocking)
            finally:
                self._waiting_for_data_s += time.monotonic() - t0
                it.waited = True
                del self._records[it.k]
                with span("release", self.name, it.k):
                    self._counters.release(it.k)
                self._next_wait = it.k + 1

    def _finish_inner(self, it: Iteration, blocking: bool) -> None:
        # An iteration nobody took yet is processed here: no thread hand-off (all of them at B=0).
        if not it.finished and self.transport.caller_may_receive and self._claim(it):
            self._process(it)
        # Every transport wait inside is bounded by the timeout; this is a safety net.
        if not it.finished and not self._await(it, 2 * self.timeout_s + 10.0):
            it.error = BLSError(f"channel {self.name!r} (rank {self.rank}): iteration {it.k} never completed")
            self._broken = it.error
        if it.gather_late:
            it.gather_late = False
            try:
                self._receive(it)
            except BaseException as e:
                it.error = e
        work = it.data_work
        if work is not None:
            tr = self.transport
            try:
                if tr.stream_ordered:
                    # The caller's stream waits for the data; the caching allocator keeps the
                    # buffers for it. The host waits too only when asked.
                    tr.order_all(work, self.timeout_s)
                    if blocking:
                        tr.wait_all(work, self.timeout_s)
                else:
                    tr.wait_all(work, self.timeout_s)
            except Exception as e:
                it.error = self._fail(it.k, "data", e)
            it.data_work = None
        self._counters.arrive(it.k)
        if it.error is None and it.result is not None:
            out, rows = it.result
            if it.out is not None:
                if out is not it.out:  # not written in place: copied (on the caller's stream)
                    it.out.copy_(out)
                    it.result = (it.out, rows)
            elif out.device != it.out_device:
                it.result = (out.to(it.out_device), rows)
        elif it.error is not None and not isinstance(it.error, ValueError):
            self._broken = it.error


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (the same memory)."""
    return t.detach().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
