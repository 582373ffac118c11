"""The BLS engine: a bounded-lag alltoallv channel over a transport (design.md, "The contract").

Iteration k on a rank:
  exchange(k)  checks its arguments, waits until the sends of iteration k-B-1 are delivered (so at
               most B+1 send slots exist), copies `send` into slot k % (B+1) of the send ring (no copy
               when the caller filled `send_buffer()`), then posts one fixed-size header and one data
               message per peer and the header receives. It never waits for peers' data.
  progress     a per-channel thread (the CPU analogue of the GPU comm stream) takes posted iterations
               in order: waits for each peer's header, sizes and posts the data receives from it,
               waits for the data. Headers carry the split, dtype, trailing dims, the receiver's
               expected split and the sender's release count, so mismatches are caught on both sides
               of a pair before a byte of data lands in a buffer of the wrong size.
  wait(k)      blocks (no spinning) until iteration k has arrived, then releases it.

A rank may post iteration k only after it released k-B-1; asking for more raises at once. Every pair
matches its messages in order, so no rank finishes k before every peer released k-B-1.

The same code drives every transport (blsgpu/_transport.py lists what a transport offers). On a
stream-ordered one (NCCL, or the in-process mode on a GPU) the progress thread waits for the headers
only: it launches iteration k's data on the comm stream after the counters' device gate
(released >= k-B), and wait(k) makes the caller's current stream wait for it instead of the host.
"""

from __future__ import annotations

import collections
import math
import operator
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blsgpu import _env, _local
from blsgpu._errors import BLSError, PeerError
from blsgpu._trace import span
from blsgpu._transport import DATA, HEADER, GlooTransport

MAX_BOUND = 4096
_MAX_TRAILING_DIMS = 6
_HEADER_LEN = 16
_MAGIC = 0x424C5331  # "BLS1"
# Header fields (int64).
_H_MAGIC, _H_CHANNEL, _H_ITER, _H_ROWS, _H_DTYPE, _H_NDIM = 0, 1, 2, 3, 4, 5
_H_DIMS = 6  # .. 6 + _MAX_TRAILING_DIMS
_H_RELEASED, _H_EXPECT, _H_INLINE = 12, 13, 14
_HEADER_BYTES = _HEADER_LEN * 8
# Payloads up to this many bytes per peer ride in the header message (one message, no data
# rendezvous) on transports that allow a receive longer than what arrives (gloo).
DEFAULT_INLINE_BYTES = 256 << 10
_INLINE_BUDGET = 32 << 20  # per channel and direction, over all peers

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


class BoundError(BLSError):
    """More than B+1 exchanges outstanding on a channel: wait() an older one first."""


_INT64_MAX = 2**63 - 1


def _as_splits(splits: Any, world_size: int, what: str) -> list[int]:
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.dtype.is_floating_point or splits.is_complex():
            raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints")
        splits = splits.tolist()
    if isinstance(splits, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}")
    try:
        items = list(splits)
    except TypeError as e:
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}") from e
    out = []
    for raw in items:
        try:
            # Integers only (Python, numpy, 0-d integer tensors): a float, even 2.0, is refused
            # rather than truncated into a split that may still add up.
            out.append(operator.index(raw))
        except TypeError:
            raise TypeError(f"{what} must hold integers, got {raw!r}") from None
    if len(out) != world_size:
        raise ValueError(f"{what} has {len(out)} entries; it needs one per rank ({world_size})")
    neg = [i for i, s in enumerate(out) if s < 0]
    if neg:
        raise ValueError(f"{what} has negative entries at ranks {neg}: {out}")
    if sum(out) > _INT64_MAX:
        raise ValueError(f"{what} sum to {sum(out)}, more rows than an int64 counts")
    return out


def _cause(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if "closed" in low or "reset" in low or "broken pipe" in low or "eof" in low:
        return "connection closed: the peer process died or closed its channel"
    if "timed out" in low or "timeout" in low:
        return "timed out: the peer is silent"
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(eq=False)
class _Iteration:
    k: int
    send: torch.Tensor  # slot view [n, *trailing], contiguous, on the transport's device
    send_splits: list[int]
    recv_splits: list[int] | None
    out_device: torch.device
    msg_in: torch.Tensor  # [W, header + inline bytes]: what each peer's header message fills
    header_recvs: dict[int, Any]
    send_works: list[tuple[int, Any]] = field(default_factory=list)
    # Stream-ordered transports: the data receives that wait() hands to the caller's stream.
    ready: list[tuple[int, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[torch.Tensor, list[int]] | None = None
    error: BaseException | None = None
    waited: bool = False


class ExchangeHandle:
    """One posted iteration of a channel. `wait()` returns (recv, recv_splits); `done()` polls."""

    __slots__ = ("_channel", "_it")

    def __init__(self, channel: BoundedLagAllToAll, it: _Iteration):
        self._channel = channel
        self._it = it

    @property
    def iteration(self) -> int:
        return self._it.k

    def done(self) -> bool:
        """True once wait() will not block the host: the data arrived (or, on a stream-ordered
        transport, the headers arrived and the data is on its way on the comm stream)."""
        return self._it.done.is_set()

    def wait(self, blocking: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Block until iteration k arrived, release it, return (recv, recv_splits).

        Earlier iterations of the channel that were not waited yet are completed first (their
        handles keep their results), so releases stay in order. On a stream-ordered transport the
        host waits for the headers only and the caller's current stream waits for the data;
        blocking=True makes the host wait for the data too.
        """
        return self._channel._wait(self._it, blocking)

    def __repr__(self) -> str:
        return f"ExchangeHandle(channel={self._channel.name!r}, iteration={self._it.k})"


class BoundedLagAllToAll:
    """A bounded-lag alltoallv channel over a torch.distributed group.

    Args:
        group: the process group (None: the default group). Creating a channel is collective:
            every rank of the group creates its channels in the same order.
        bound: B, how many iterations this rank may run ahead of its slowest peer.
        device: where received tensors are returned (default: the device of each send tensor).
        transport: "gloo" (CPU), "nccl" (GPU, CuPy), "local" (the ranks of blsgpu._local.run_local)
            or "auto": local inside run_local, else nccl for a CUDA device when the GPU path is
            available, else gloo.
        timeout: how long a wait may last before a silent peer is declared failed.
        name: the channel's name in errors, stats and traces.
        inline_bytes: per-peer payloads up to this size travel inside the header message (gloo
            only; default min(256 KiB, 32 MiB / W)); the ranks agree on the smallest value asked.
            0 turns it off. Ring buffers are allocated lazily, so memory is what messages use.
    """

    def __init__(
        self,
        group: Any = None,
        bound: int = 4,
        device: torch.device | str | None = None,
        transport: str = "auto",
        timeout: timedelta | float | None = None,
        name: str | None = None,
        inline_bytes: int | None = None,
    ):
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(f"bound must be an int, got {type(bound).__name__}")
        if bound < 0:
            raise ValueError(f"bound must be >= 0, got {bound}")
        if bound > MAX_BOUND:
            raise ValueError(f"bound must be <= {MAX_BOUND}, got {bound}")
        if timeout is None:
            timeout = _env.default_timeout()
        self.timeout_s = (
            timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        )
        if not 0 < self.timeout_s <= _env.MAX_TIMEOUT_S:  # also refuses nan and inf
            raise ValueError(
                f"timeout must be positive and at most {_env.MAX_TIMEOUT_S:.0e} s, got {timeout!r}"
            )
        self.bound = bound
        self.device = torch.device(device) if device is not None else None
        self.transport = _make_transport(transport, group, self.device)
        self.rank = self.transport.rank
        self.world_size = self.transport.world_size
        self.name = name or f"bls{self.transport.channel_id}"
        # With a loopback transport the rank messages itself like any peer.
        self._peers = [
            p for p in range(self.world_size) if p != self.rank or self.transport.loopback
        ]
        connect = getattr(self.transport, "connect", None)
        if connect is not None:  # NCCL: every pair connects now, within the timeout
            connect(self.timeout_s)
        self._counters = self.transport.make_counters(self.world_size, self.rank, self.timeout_s)
        self._slots: list[torch.Tensor | None] = [None] * (bound + 1)
        self._inline = self._agree_inline_bytes(inline_bytes)
        self._msg_out: list[torch.Tensor | None] = [None] * (bound + 1)
        self._msg_in: list[torch.Tensor | None] = [None] * (bound + 1)
        self._records: dict[int, _Iteration] = {}
        self._next_k = 0
        self._next_wait = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._warned_staging = False
        self._blocked_on_bound_s = 0.0
        self._waiting_for_data_s = 0.0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._queue: collections.deque[_Iteration] = collections.deque()
        self._stop = False
        self._thread = threading.Thread(
            target=self._progress, name=f"blsgpu-{self.name}-r{self.rank}", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------------------------------
    # public API

    def __enter__(self) -> BoundedLagAllToAll:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not mask the caller's error with a drain that may wait on the same broken peer.
            self._shutdown()

    def send_buffer(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in the send ring that the next `exchange()` posts without a copy.

        Fill it (e.g. with `blsgpu.pooled_lookup(..., out=buf)`) and pass it as `send`. Waits, like
        exchange(), until the slot's previous iteration was delivered.
        """
        self._check_usable()
        if dtype not in _DTYPE_CODE:
            raise TypeError(f"dtype {dtype} is not supported by the exchange")
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 0 for s in shape):
            raise ValueError(f"send_buffer shape must be non-empty and non-negative, got {shape}")
        self._check_bound(self._next_k)
        self._reclaim_slot(self._next_k)
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self._slot_bytes(self._next_k, nbytes)
        return slot[:nbytes].view(dtype).view(shape)

    def exchange(
        self,
        send: torch.Tensor,
        send_splits: Any,
        recv_splits: Any = None,
    ) -> ExchangeHandle:
        """Post the next iteration: rows send[sum(send_splits[:p]) : ...] go to rank p.

        Non-blocking: it returns once the messages are posted. Raises before anything is sent when
        the arguments are wrong, when the channel is closed, or when B+1 exchanges are already
        outstanding.
        """
        with span("post", self.name, self._next_k):
            return self._post(send, send_splits, recv_splits)

    def _post(self, send: torch.Tensor, send_splits: Any, recv_splits: Any) -> ExchangeHandle:
        self._check_usable()
        if not isinstance(send, torch.Tensor):
            raise TypeError(f"send must be a torch.Tensor, got {type(send).__name__}")
        if send.dim() < 1:
            raise ValueError("send must have at least one dimension (rows are split along dim 0)")
        if send.dim() - 1 > _MAX_TRAILING_DIMS:
            raise ValueError(
                f"send has {send.dim() - 1} trailing dims; at most {_MAX_TRAILING_DIMS} supported"
            )
        if send.dtype not in _DTYPE_CODE:
            raise TypeError(f"send dtype {send.dtype} is not supported by the exchange")
        send_splits = _as_splits(send_splits, self.world_size, "send_splits")
        if sum(send_splits) != send.shape[0]:
            raise ValueError(
                f"send_splits sum to {sum(send_splits)} but send has {send.shape[0]} rows (dim 0)"
            )
        if recv_splits is not None:
            recv_splits = _as_splits(recv_splits, self.world_size, "recv_splits")
            if recv_splits[self.rank] != send_splits[self.rank]:
                raise ValueError(
                    f"recv_splits[{self.rank}]={recv_splits[self.rank]} but this rank sends "
                    f"send_splits[{self.rank}]={send_splits[self.rank]} rows to itself"
                )
        if send.is_cuda and self.transport.device.type != "cuda" and not self._warned_staging:
            self._warned_staging = True
            warnings.warn(
                f"channel {self.name!r} runs on {self.transport.name}: its CUDA tensors are staged "
                f"through host memory every iteration (the host waits for the copy). Create it with "
                f"device='cuda' for the GPU path (transport 'auto' then picks NCCL).",
                RuntimeWarning, stacklevel=3,
            )
        k = self._next_k
        self._check_bound(k)
        self._reclaim_slot(k)
        nbytes = send.numel() * send.element_size()
        slot_bytes = self._slot_bytes(k, nbytes)
        if send.device == slot_bytes.device and send.is_contiguous() and nbytes and (
            send.data_ptr() == slot_bytes.data_ptr()
        ):
            slot = send  # filled in place through send_buffer()
        elif send.device == slot_bytes.device and nbytes and (
            send.untyped_storage().data_ptr() == slot_bytes.untyped_storage().data_ptr()
        ):
            raise ValueError(
                "send is a view into the channel's send buffer that does not start at it (or is "
                "not contiguous): pass the tensor send_buffer() returned, or a prefix of it"
            )
        else:
            slot = slot_bytes[:nbytes].view(send.dtype).view(send.shape)
            slot.copy_(send)
        out_device = self.device if self.device is not None else send.device

        row_bytes = send.element_size() * math.prod(send.shape[1:])
        i = k % (self.bound + 1)
        msg_out = self._msg_ring(self._msg_out, i)
        msg_in = self._msg_ring(self._msg_in, i)
        dims = list(send.shape[1:]) + [0] * (_MAX_TRAILING_DIMS - (send.dim() - 1))
        head = [_MAGIC, self.transport.channel_id, k, 0, _DTYPE_CODE[send.dtype], send.dim() - 1,
                *dims, self._counters.released, -1, 0, 0]
        rows = []
        for p in range(self.world_size):
            h = list(head)
            h[_H_ROWS] = send_splits[p]
            if recv_splits is not None:
                h[_H_EXPECT] = recv_splits[p]
            h[_H_INLINE] = int(p != self.rank and 0 < send_splits[p] * row_bytes <= self._inline)
            rows.append(h)
        msg_out.view(torch.int64)[:, :_HEADER_LEN].copy_(torch.tensor(rows, dtype=torch.int64))
        it = _Iteration(
            k=k,
            send=slot,
            send_splits=send_splits,
            recv_splits=recv_splits,
            out_device=out_device,
            msg_in=msg_in,
            header_recvs={},
        )
        flat = slot.reshape(-1).view(torch.uint8) if nbytes else None
        offsets = _prefix(send_splits)
        tr = self.transport
        p = self.rank
        try:
            for p in self._peers:
                it.header_recvs[p] = tr.irecv(msg_in[p], p, HEADER, k)
            for p in self._peers:
                nb = send_splits[p] * row_bytes
                chunk = flat[offsets[p] * row_bytes : offsets[p] * row_bytes + nb] if nb else None
                if rows[p][_H_INLINE]:
                    msg_out[p, _HEADER_BYTES : _HEADER_BYTES + nb].copy_(chunk)
                    message = msg_out[p, : _HEADER_BYTES + nb]
                    it.send_works.append((p, tr.isend(message, p, HEADER, k)))
                else:
                    it.send_works.append((p, tr.isend(msg_out[p, :_HEADER_BYTES], p, HEADER, k)))
                    if nb:
                        it.send_works.append((p, tr.isend(chunk, p, DATA, k)))
                if p != self.rank:
                    self._bytes_sent += nb
            tr.flush(HEADER, k)
        except Exception as e:  # the transport refuses to post: that peer is gone
            self._broken = self._peer_error(getattr(e, "peer", p), k, "posting", e)
            raise self._broken from e
        self._records[k] = it
        self._next_k = k + 1
        self._counters.post(k)
        with self._counters.cond:
            self._queue.append(it)
            self._counters.cond.notify_all()
        return ExchangeHandle(self, it)

    def stats(self) -> dict[str, Any]:
        """Counters and times of this channel (design.md "Observable")."""
        c = self._counters
        extra = c.extra_stats()  # read outside the lock: device counters need no host sync
        with c.cond:
            return extra | {
                "channel": self.name,
                "rank": self.rank,
                "world_size": self.world_size,
                "bound": self.bound,
                "transport": self.transport.name,
                "posted": c.posted,
                "arrived": c.arrived,
                "released": c.released,
                "lag": c.lag(),
                "max_lag": c.max_lag,
                "peer_posted_min": min((c.peer_posted[p] for p in c.peers), default=c.posted),
                "peer_released_min": c.min_peer_released(),
                "blocked_on_bound_s": self._blocked_on_bound_s,
                "waiting_for_data_s": self._waiting_for_data_s,
                "bytes_sent": self._bytes_sent,
                "bytes_received": self._bytes_received,
            }

    def close(self) -> None:
        """Wait out every outstanding iteration and deliver every posted message, then stop.

        Returns only once all this rank posted has reached its peers (or raises PeerError after the
        timeout), so a rank that finishes first never cuts a slower peer off.
        """
        if self._closed:
            return
        try:
            if self._broken is None:
                for k in range(self._next_wait, self._next_k):
                    self._wait(self._records[k], False)
                for k in sorted(self._records):
                    self._wait_sends(self._records.pop(k), time.monotonic() + self.timeout_s)
        finally:
            self._shutdown()

    # ----------------------------------------------------------------------------------------
    # internals

    def _shutdown(self) -> None:
        self._closed = True
        with self._counters.cond:
            self._stop = True
            self._counters.cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)
        self.transport.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"channel {self.name!r} is closed")
        if self._broken is not None:
            # The first failure says it all (peer, channel, iteration): raise it again.
            raise self._broken

    def _agree_inline_bytes(self, asked: int | None) -> int:
        if not getattr(self.transport, "inline_ok", False):
            return 0
        if asked is None:
            asked = min(DEFAULT_INLINE_BYTES, _INLINE_BUDGET // max(self.world_size, 1))
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
            raise ValueError(f"inline_bytes must be a non-negative int, got {asked!r}")
        asked -= asked % 8  # keeps every header in the ring 8-byte aligned
        # A receive buffer must never be shorter than what arrives: all ranks use the smallest.
        return self.transport.agree_min(asked)

    def _msg_ring(self, ring: list[torch.Tensor | None], i: int) -> torch.Tensor:
        buf = ring[i]
        if buf is None:
            # Host memory on every transport: the engine reads headers on the host (the NCCL
            # transport stages them through pinned memory). Untouched pages cost nothing: only
            # the bytes messages use become resident.
            buf = torch.empty((self.world_size, _HEADER_BYTES + self._inline), dtype=torch.uint8)
            ring[i] = buf
        return buf

    def _check_bound(self, k: int) -> None:
        outstanding = k - self._next_wait
        if outstanding >= self.bound + 1:
            raise BoundError(
                f"channel {self.name!r} (rank {self.rank}): {outstanding} exchanges outstanding "
                f"with bound B={self.bound}; wait() iteration {self._next_wait} before posting "
                f"iteration {k}"
            )

    def _slot_bytes(self, k: int, nbytes: int) -> torch.Tensor:
        i = k % (self.bound + 1)
        slot = self._slots[i]
        if slot is None or slot.numel() < nbytes:
            # Grow geometrically so a ring fed slowly growing batches does not reallocate each time.
            size = max(nbytes, 64, 0 if slot is None else slot.numel() * 2)
            # On the transport's device: NCCL reads the slot itself (a fused lookup can write
            # straight into it through send_buffer()); gloo's is host memory.
            slot = self.transport.empty((size,), torch.uint8)
            self._slots[i] = slot
        return slot

    def _reclaim_slot(self, k: int) -> None:
        """Slot k % (B+1) last held iteration k-B-1: its sends must be delivered before reuse."""
        old = self._records.get(k - self.bound - 1)
        if old is None or not old.waited:
            return
        t0 = time.monotonic()
        try:
            # Stream-ordered: the caller's stream (which writes the slot) waits, not the host.
            self._wait_sends(old, t0 + self.timeout_s, order=True)
        finally:
            self._blocked_on_bound_s += time.monotonic() - t0
        del self._records[old.k]

    def _wait_sends(self, it: _Iteration, deadline: float, order: bool = False) -> None:
        done = self.transport.order if order else self.transport.wait
        for p, work in it.send_works:
            try:
                done(work, deadline - time.monotonic())
            except Exception as e:
                err = self._peer_error(p, it.k, "delivery of this rank's messages", e)
                self._broken = err
                raise err from e
        it.send_works.clear()

    def _wait(self, it: _Iteration, blocking: bool) -> tuple[torch.Tensor, list[int]]:
        while self._next_wait <= it.k:
            self._finish(self._records[self._next_wait], blocking and self._next_wait == it.k)
        if it.error is not None:
            raise it.error
        assert it.result is not None
        return it.result

    def _finish(self, it: _Iteration, blocking: bool) -> None:
        with span("wait", self.name, it.k):
            self._finish_inner(it, blocking)

    def _finish_inner(self, it: _Iteration, blocking: bool) -> None:
        t0 = time.monotonic()
        # A caller about to block on an iteration the progress thread has not picked up yet
        # receives it itself: one thread hand-off less per iteration (all of them at B=0). The
        # thread takes iterations in order, so it is busy with none older than this one.
        if self.transport.caller_may_receive:
            with self._counters.cond:
                stolen = bool(self._queue) and self._queue[0] is it
                if stolen:
                    self._queue.popleft()
            if stolen:
                self._run(it)
        # The progress thread enforces the timeout on every transport wait; this is a safety net.
        ok = it.done.wait(timeout=2 * self.timeout_s + 10.0)
        if not ok:
            it.error = BLSError(
                f"channel {self.name!r} (rank {self.rank}): iteration {it.k} never completed"
            )
            self._broken = it.error
        elif it.error is None and self.transport.stream_ordered:
            self._hand_over(it, blocking)
        self._waiting_for_data_s += time.monotonic() - t0
        it.waited = True
        with span("release", self.name, it.k):
            self._counters.release(it.k)
        self._next_wait = it.k + 1
        if it.error is not None and not isinstance(it.error, ValueError):
            self._broken = it.error

    def _hand_over(self, it: _Iteration, blocking: bool) -> None:
        """Stream-ordered data: the caller's current stream waits for it (the host too if asked).

        order() always runs: it also keeps the caching allocator from handing the receive buffer
        to a later iteration while the caller's stream still reads it.
        """
        deadline = time.monotonic() + self.timeout_s
        for p, work in it.ready:
            try:
                self.transport.order(work, deadline - time.monotonic())
                if blocking:
                    self.transport.wait(work, deadline - time.monotonic())
            except Exception as e:
                it.error = self._peer_error(getattr(e, "peer", p), it.k, "data", e)
                self._broken = it.error
                return
        it.ready.clear()
        out, rows = it.result
        if out.device != it.out_device:
            it.result = (out.to(it.out_device), rows)

    def _peer_error(self, peer: int, k: int, what: str, exc: BaseException) -> PeerError:
        return PeerError(
            f"BLS channel {self.name!r} (rank {self.rank}): peer {peer} failed during iteration "
            f"{k} ({what}): {_cause(exc)}",
            peer=peer,
            channel=self.name,
            iteration=k,
        )

    def _post_recv(self, buf: torch.Tensor, peer: int, k: int):
        try:
            return self.transport.irecv(buf, peer, DATA, k)
        except Exception as e:
            raise self._peer_error(peer, k, "posting the data receive", e) from e

    def _progress(self) -> None:
        cond = self._counters.cond
        while True:
            with cond:
                while not self._queue and not self._stop:
                    cond.wait()
                if self._stop and not self._queue:
                    return
                it = self._queue.popleft()
            self._run(it)

    def _run(self, it: _Iteration) -> None:
        """Receive one iteration (on the progress thread, or on a caller that got there first)."""
        if self._broken is not None:
            it.error = self._broken
        else:
            try:
                with span("receive", self.name, it.k):
                    self._receive(it)
            except BaseException as e:  # handed to the waiting caller
                it.error = e
                if not isinstance(e, ValueError):
                    self._broken = e
        self._counters.arrive(it.k)
        it.done.set()

    def _receive(self, it: _Iteration) -> None:
        k, tr = it.k, self.transport
        deadline = time.monotonic() + self.timeout_s
        send = it.send
        trailing = tuple(send.shape[1:])
        row_bytes = send.element_size() * math.prod(trailing)
        known = it.recv_splits
        # Rows come from the headers (what peers really send), never from the caller's
        # recv_splits: those are only checked, so a wrong one cannot size a buffer.
        rows = [0] * self.world_size
        rows[self.rank] = it.send_splits[self.rank]
        problems: list[str] = []
        scratch: list[torch.Tensor] = []
        data_recvs: list[tuple[int, Any]] = []
        pending: list[tuple[int, int]] = []  # (peer, rows) whose data receive waits for `out`
        inline: list[tuple[int, int]] = []  # (peer, rows) whose payload came with the header
        msg_in = it.msg_in

        for p in self._peers:
            try:
                tr.wait(it.header_recvs[p], deadline - time.monotonic())
            except Exception as e:
                raise self._peer_error(p, k, "header", e) from e
            h = msg_in[p, :_HEADER_BYTES].view(torch.int64).tolist()
            if h[_H_MAGIC] != _MAGIC or h[_H_CHANNEL] != tr.channel_id or h[_H_ITER] != k:
                raise BLSError(
                    f"channel {self.name!r} (rank {self.rank}): corrupt header from peer {p} for "
                    f"iteration {k}: {h[:3]}"
                )
            self._counters.learn(p, k, h[_H_RELEASED])
            n = h[_H_ROWS]
            code = h[_H_DTYPE]
            p_dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else None
            p_trailing = tuple(h[_H_DIMS : _H_DIMS + h[_H_NDIM]])
            p_row_bytes = (p_dtype.itemsize if p_dtype else 1) * math.prod(p_trailing)
            bad = False
            if p_dtype != send.dtype or p_trailing != trailing:
                problems.append(
                    f"rank {p} sends {p_dtype} rows of shape {list(p_trailing)} but rank "
                    f"{self.rank} exchanges {send.dtype} rows of shape {list(trailing)}"
                )
                bad = True
            if known is not None and known[p] != n:
                problems.append(
                    f"recv_splits[{p}]={known[p]} on rank {self.rank} but rank {p} sends {n} rows"
                )
                bad = True
            if h[_H_EXPECT] >= 0 and h[_H_EXPECT] != it.send_splits[p]:
                problems.append(
                    f"rank {p} expects {h[_H_EXPECT]} rows from rank {self.rank} (its recv_splits) "
                    f"but rank {self.rank} sends send_splits[{p}]={it.send_splits[p]}"
                )
                bad = True
            if bad:
                # Drain the peer's bytes into scratch so its send completes; never post a receive
                # smaller than what arrives (gloo aborts the process on that).
                if n * p_row_bytes and not h[_H_INLINE]:
                    buf = tr.empty((n * p_row_bytes,), torch.uint8)
                    scratch.append(buf)
                    data_recvs.append((p, self._post_recv(buf, p, k)))
                rows[p] = 0
                continue
            rows[p] = n
            if h[_H_INLINE]:
                inline.append((p, n))
            elif n * row_bytes:  # rows of zero bytes (a [n, 0] tensor) send no data message
                pending.append((p, n))

        out = tr.empty((sum(rows), *trailing), send.dtype)
        out_bytes = out.reshape(-1).view(torch.uint8) if out.numel() else None
        offsets = _prefix(rows)
        for p, n in pending:
            lo = offsets[p] * row_bytes
            data_recvs.append((p, self._post_recv(out_bytes[lo : lo + n * row_bytes], p, k)))

        for p, n in inline:
            lo = offsets[p] * row_bytes
            out_bytes[lo : lo + n * row_bytes] = msg_in[p, _HEADER_BYTES : _HEADER_BYTES + n * row_bytes]

        # The device gate (released >= k-B) goes on the comm stream before the data is launched.
        self._counters.gate(k, self.bound)
        try:
            tr.flush(DATA, k)
        except Exception as e:
            first = self._peers[0] if self._peers else self.rank
            raise self._peer_error(getattr(e, "peer", first), k, "data", e) from e
        if tr.stream_ordered:
            it.ready = data_recvs  # wait() hands them to the caller's stream
        else:
            for p, work in data_recvs:
                try:
                    tr.wait(work, deadline - time.monotonic())
                except Exception as e:
                    raise self._peer_error(p, k, "data", e) from e
        me = self.rank
        self._bytes_received += sum(rows[p] for p in self._peers if p != me) * row_bytes

        if rows[me] and not tr.loopback:
            src = _prefix(it.send_splits)[me]
            out[offsets[me] : offsets[me] + rows[me]] = send[src : src + rows[me]]
        if problems:
            raise ValueError(
                f"channel {self.name!r} iteration {k}: the ranks disagree: " + "; ".join(problems)
            )
        if out.device != it.out_device and not tr.stream_ordered:
            out = out.to(it.out_device)  # stream-ordered: in wait(), once the data is there
        it.result = (out, rows)


def _prefix(splits: list[int]) -> list[int]:
    out, acc = [], 0
    for s in splits:
        out.append(acc)
        acc += s
    return out


def _make_transport(kind: str, group: Any, device: torch.device | None):
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
            raise ValueError("transport 'local' needs a group of blsgpu._local.run_local")
        return _local.LocalTransport(local)
    if isinstance(group, _local.LocalGroup):
        raise ValueError(f"transport {kind!r} cannot run over an in-process group; use 'local'")
    want_nccl = kind == "nccl" or (
        kind == "auto" and device is not None and device.type == "cuda" and _gpu_path_available()
    )
    if want_nccl:
        from blsgpu import _nccl  # noqa: PLC0415 (CuPy and NCCL load only on the GPU path)

        return _nccl.NcclTransport(group, device)
    return GlooTransport(group)


def _gpu_path_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from blsgpu import _nccl  # noqa: PLC0415

    return _nccl.available()
