"""The BLS engine: a bounded-lag alltoallv channel over a transport (docs/design.md, "The contract").

Iteration k on a rank costs at most two alltoalls of the transport, never a message per peer:

  exchange(k)  checks its arguments, copies `send` into slot k % (B+1) of the send ring (no copy
               when the caller filled `send_buffer()`) and posts the MESSAGE alltoall of k: one
               fixed-size header per peer (split, dtype, trailing dims, the receiver's expected
               split, the sender's release count) and, where the transport allows it, the payload
               behind it when it fits the channel's inline capacity. It never waits for peers.
  process(k)   once the messages of k arrived: checks every header (a mismatch is caught on both
               sides of a pair before a byte lands in a buffer of the wrong size), then either
               gathers the inline payloads into the receive tensor, or, when any rank sent a
               payload too large to inline (every rank sees every sender's flag, so all agree),
               posts the DATA alltoall of k with exactly sized receives straight into it.
               Done by a progress thread (the CPU analogue of the GPU comm stream) for iterations
               posted ahead, or by the caller itself when it waits on one nobody took yet.
  wait(k)      completes k (the data alltoall, if any), releases it, returns the tensor.

A rank posts iteration k only after it released k-B-1; asking for more raises at once. Each kind's
alltoalls complete in posting order on every rank, so no rank finishes k before every peer released
k-B-1. On a stream-ordered transport (NCCL, or the in-process mode on a GPU) the data alltoall runs
on the comm stream after the counters' device gate (released >= k-B), and wait(k) makes the caller's
current stream wait for it instead of the host.
"""

from __future__ import annotations

import itertools
import math
import operator
import queue
import threading
import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from blsgpu import _env
from blsgpu._trace import span
from blsgpu.errors import BLSError, BoundError, PeerError, PeerFailure
from blsgpu.transport import local as _local
from blsgpu.transport.base import DATA, MESSAGE
from blsgpu.transport.gloo import GlooTransport

MAX_BOUND = 4096
_MAX_TRAILING_DIMS = 6
_HEADER_LEN = 16
_MAGIC = 0x424C5331  # "BLS1"
# Header fields (int64). The first _H_FIXED must equal what the receiver expects of the iteration
# (magic, channel, iteration, dtype, trailing dims): one comparison checks them all.
_H_MAGIC, _H_CHANNEL, _H_ITER, _H_DTYPE, _H_NDIM = 0, 1, 2, 3, 4
_H_DIMS = 5  # .. 5 + _MAX_TRAILING_DIMS
_H_FIXED = _H_DIMS + _MAX_TRAILING_DIMS
_H_ROWS, _H_RELEASED, _H_EXPECT, _H_SPILL = 11, 12, 13, 14
_HEADER_BYTES = _HEADER_LEN * 8
# Per-peer payloads up to this many bytes ride behind the header (one alltoall per iteration) on
# transports that allow a receive longer than what arrives (gloo).
DEFAULT_INLINE_BYTES = 256 << 10
_INLINE_BUDGET = 32 << 20  # per channel and slot, over all peers

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_INT64_MAX = 2**63 - 1
_EMPTY = torch.empty(0, dtype=torch.uint8)
_NO_BYTES = np.empty(0, dtype=np.uint8)
_CACHED_VIEWS = 32  # per buffer: exact-length and typed views of its start, reused across iterations


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class _Buffer:
    """A growable byte buffer: its tensor, a numpy view when it is host memory, and cached views of
    its start (an alltoall wants a tensor of exactly the bytes it moves; most iterations repeat
    the sizes of an earlier one, and a view costs more than the lookup)."""

    __slots__ = ("t", "np", "ptr", "views", "_cuts", "_typed")

    def __init__(self) -> None:
        self.ptr = 0
        self.views: Any = None  # what a user of the buffer derived from it (reset on growth)
        self.t: torch.Tensor | None = None
        self.np: np.ndarray | None = None
        self._cuts: dict[int, torch.Tensor] = {}
        self._typed: dict[tuple, torch.Tensor] = {}

    def grow(self, nbytes: int, empty: Any) -> None:
        # Geometric growth: a ring fed slowly growing batches does not reallocate each time.
        size = max(nbytes, 64, 0 if self.t is None else 2 * self.t.numel())
        self.t = empty((size,), torch.uint8)
        self.np = self.t.numpy() if self.t.device.type == "cpu" else None
        self.ptr = self.t.data_ptr()
        self.views = None
        self._cuts.clear()
        self._typed.clear()

    def host(self, nbytes: int) -> np.ndarray:
        """The numpy view of a host buffer of at least nbytes. Untouched pages cost nothing: only
        the bytes messages use become resident."""
        if self.t is None or self.t.numel() < nbytes:
            self.grow(nbytes, _host_empty)
        return self.np

    def torch(self, nbytes: int) -> torch.Tensor:
        cut = self._cuts.get(nbytes)
        if cut is None:
            if len(self._cuts) >= _CACHED_VIEWS:
                self._cuts.clear()
            cut = self._cuts[nbytes] = self.t[:nbytes]
        return cut

    def typed(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        key = (dtype, shape)
        view = self._typed.get(key)
        if view is None:
            if len(self._typed) >= _CACHED_VIEWS:
                self._typed.clear()
            nbytes = math.prod(shape) * dtype.itemsize
            view = self._typed[key] = self.t[:nbytes].view(dtype).view(shape)
        return view


def _as_splits(splits: Any, world_size: int, what: str) -> list[int]:
    # Fast path: a list (or tuple) of W non-negative Python ints, as most callers pass.
    if (type(splits) is list or type(splits) is tuple) and len(splits) == world_size and all(
        type(s) is int for s in splits
    ):
        if not splits or (min(splits) >= 0 and sum(splits) <= _INT64_MAX):
            return list(splits)
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.dtype.is_floating_point or splits.is_complex():
            raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints")
        splits = splits.tolist()
    if isinstance(splits, (str, bytes, Mapping, set, frozenset)):
        # A dict would be read by its keys and a set in no particular order: never what was meant.
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}")
    try:
        items = list(splits)
    except TypeError as e:
        raise TypeError(f"{what} must be a sequence of ints, got {type(splits).__name__}") from e
    try:
        # Integers only (Python, numpy, 0-d integer tensors): a float, even 2.0, is refused rather
        # than truncated into a split that may still add up.
        out = [s if type(s) is int else operator.index(s) for s in items]
    except TypeError:
        bad = next(s for s in items if not _is_index(s))
        raise TypeError(f"{what} must hold integers, got {bad!r}") from None
    if len(out) != world_size:
        raise ValueError(f"{what} has {len(out)} entries; it needs one per rank ({world_size})")
    if out and min(out) < 0:
        neg = [i for i, s in enumerate(out) if s < 0]
        raise ValueError(f"{what} has negative entries at ranks {neg}: {out}")
    if sum(out) > _INT64_MAX:
        raise ValueError(f"{what} sum to {sum(out)}, more rows than an int64 counts")
    return out


def _is_index(x: Any) -> bool:
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def _cause(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if "closed" in low or "reset" in low or "broken pipe" in low or "eof" in low:
        return "connection closed: the peer process died or closed its channel"
    if "timed out" in low or "timeout" in low:
        return "timed out: the peer is silent"
    if "abort" in low:
        return "the channel was abandoned"
    return text.splitlines()[0] if text else type(exc).__name__


class _Iteration:
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
    prev: _Iteration | None = None  # processed before this one, on every rank alike
    gather_late = False  # no data alltoall: the caller reads the headers and gathers in wait()
    msg_args: tuple | None = None  # stream-ordered: the MESSAGE alltoall the progress thread posts

    def __init__(self, k: int, slot: torch.Tensor, buf: _Buffer, head: np.ndarray,
                 send_splits: list[int], recv_splits: list[int] | None, row_bytes: int,
                 out_device: torch.device):
        self.k = k
        self.slot = slot  # [n, *trailing], contiguous, on the transport's device
        self.buf = buf  # the send slot's buffer
        self.head = head  # this rank's header row for the iteration's dtype and trailing dims
        self.send_splits = send_splits
        self.recv_splits = recv_splits
        self.row_bytes = row_bytes
        self.out_device = out_device


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
        """True once wait() will not block the host for the headers (on a host transport: nor for
        the data). Polling hands the iteration to the progress thread if nobody has it yet."""
        return self._channel._poll(self._it)

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
        transport: "gloo" (CPU), "nccl" (GPU, CuPy), "local" (the ranks of blsgpu.transport.local.run_local)
            or "auto": local inside run_local, else nccl for a CUDA device when the GPU path is
            available, else gloo. A transport object is used as it is (benchmarks, tests).
        timeout: how long a wait may last before a silent peer is declared failed.
        name: the channel's name in errors, stats and traces.
        inline_bytes: per-peer payloads up to this size travel behind the header, in the same
            alltoall (gloo only; default min(256 KiB, 32 MiB / W)); the ranks agree on the smallest
            value asked. 0 turns it off. Untouched receive pages cost no memory.
        known_splits: every exchange() on every rank passes recv_splits. On a stream-ordered
            transport (NCCL, the in-process mode) no header travels then: the data moves sized by
            the splits, one NCCL group per iteration, with no header round trip before it; the
            splits are trusted (a wrong one is NCCL's size mismatch, not a ValueError) and stats'
            lag counts only this rank's iterations not yet launched (peers report nothing). The
            ranks agree at creation: unless every rank asks for it, headers travel as usual.
            Ignored on gloo, where small payloads ride in the headers.
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
        known_splits: bool = False,
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
        if inline_bytes is not None and (
            isinstance(inline_bytes, bool) or not isinstance(inline_bytes, int) or inline_bytes < 0
        ):
            raise ValueError(f"inline_bytes must be a non-negative int, got {inline_bytes!r}")
        self.bound = bound
        self.device = torch.device(device) if device is not None else None
        try:
            self.transport = _make_transport(transport, group, self.device, self.timeout_s)
        except PeerFailure as e:
            raise PeerError(
                f"BLS channel {name or 'new'!r}: peer {e.peer} failed during channel creation: {e}",
                peer=e.peer, channel=name or "new", iteration=-1,
            ) from e
        tr = self.transport
        self.rank = tr.rank
        self.world_size = tr.world_size
        self.name = name or f"bls{tr.channel_id}"
        connect = getattr(tr, "connect", None)
        if connect is not None:  # NCCL: every pair connects now, within the timeout
            connect(self.timeout_s)
        self._counters = tr.make_counters(self.world_size, self.rank, self.timeout_s)
        self._inline = self._agree_inline_bytes(inline_bytes)
        # Header-less iterations: stream-ordered transports only, and only if every rank asked.
        self._known = False
        if tr.stream_ordered and self.world_size > 1:
            agree = getattr(tr, "agree_min", None)
            asked = int(bool(known_splits))
            self._known = agree is not None and bool(agree(asked))
        self._slot_written = getattr(tr, "slot_written", None)
        # MESSAGE alltoall: a header (and room for an inline payload) from every peer, nothing
        # from itself (a rank's own rows never travel; its header is known). Regions are all alike,
        # so the received headers are one strided [W-1, 16] view of the buffer.
        W, me, H = self.world_size, self.rank, _HEADER_BYTES
        self._stride = H + self._inline
        self._msg_out_sizes = [self._stride] * W
        self._msg_out_sizes[me] = 0
        self._msg_in_bytes = (W - 1) * self._stride
        n = bound + 1
        self._slots = [_Buffer() for _ in range(n)]  # send ring, on the transport's device
        self._msg_in = [_Buffer() for _ in range(n)]  # host
        self._msg_out = [_Buffer() for _ in range(n)]  # host
        self._heads: dict[tuple, np.ndarray] = {}  # (dtype, trailing) -> this rank's header row
        self._records: dict[int, _Iteration] = {}
        self._next_k = 0
        self._next_wait = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._fail_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._warned_staging = False
        self._blocked_on_bound_s = 0.0
        self._waiting_for_data_s = 0.0
        self._bytes_sent = 0
        self._bytes_received = 0
        # B=0 callers wait on each iteration right after posting it: they process it themselves
        # (no thread hand-off). Iterations posted ahead go to the progress thread at once.
        self._eager = bound > 0 or not tr.caller_may_receive
        # Host transports gather inline payloads on the caller's thread (what the progress thread
        # must do early is only to post data alltoalls, which peers wait for).
        self._gather_late = not tr.stream_ordered
        # Until some rank needed a data alltoall, iterations wait for the caller: their messages
        # complete in the transport's own threads, and a progress thread would only look at them.
        # From the first one on (or when this rank spills), iterations go to it when posted.
        self._spilled = False
        # Stream-ordered transports (NCCL, local): one thread, the progress thread, posts every
        # alltoall of the channel (MESSAGE of k, then DATA of k, then MESSAGE of k+1, ...), so every
        # rank issues to its communicators in one global order and no caller thread ever waits on
        # the host for headers (docs/design.md, "The GPU path").
        self._ordered = tr.stream_ordered
        if self._ordered and tr.caller_may_receive:
            raise ValueError(f"transport {tr.name!r}: a stream-ordered transport is driven by the "
                             f"progress thread alone (caller_may_receive must be False)")
        self._queue: queue.SimpleQueue[_Iteration | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._progress_ordered if self._ordered else self._progress,
            name=f"blsgpu-{self.name}-r{self.rank}", daemon=True
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
            self._shutdown(abandon=True)

    def send_buffer(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in the send ring that the next `exchange()` posts without a copy.

        Fill it (e.g. with `blsgpu.pooled_lookup(..., out=buf)`) and pass it as `send`. Like
        exchange(), it raises BoundError when B+1 exchanges are outstanding.
        """
        self._check_usable()
        if dtype not in _DTYPE_CODE:
            raise TypeError(f"dtype {dtype} is not supported by the exchange")
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 0 for s in shape):
            raise ValueError(f"send_buffer shape must be non-empty and non-negative, got {shape}")
        self._check_bound(self._next_k)
        nbytes = math.prod(shape) * dtype.itemsize
        return self._slot(self._next_k, nbytes).typed(dtype, shape)

    def exchange(
        self,
        send: torch.Tensor,
        send_splits: Any,
        recv_splits: Any = None,
    ) -> ExchangeHandle:
        """Post the next iteration: rows send[sum(send_splits[:p]) : ...] go to rank p.

        Non-blocking: it returns once the messages are posted, and `send` may be reused at once.
        Raises before anything is sent when the arguments are wrong, when the channel is closed,
        or when B+1 exchanges are already outstanding.
        """
        with span("post", self.name, self._next_k):
            return self._post(send, send_splits, recv_splits)

    def stats(self) -> dict[str, Any]:
        """Counters and times of this channel (docs/design.md, "Observable")."""
        c = self._counters
        extra = c.extra_stats()  # read outside the lock: device counters need no host sync
        with c.lock:
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
                "peer_posted_min": c.min_peer_posted(),
                "peer_released_min": c.min_peer_released(),
                "blocked_on_bound_s": self._blocked_on_bound_s,
                "waiting_for_data_s": self._waiting_for_data_s,
                "bytes_sent": self._bytes_sent,
                "bytes_received": self._bytes_received,
            }

    def close(self) -> None:
        """Wait out every outstanding iteration (so every posted message was delivered), then stop.

        Returns only once all this rank posted has reached its peers (or raises PeerError after the
        timeout), so a rank that finishes first never cuts a slower peer off.
        """
        if self._closed:
            return
        clean = False
        try:
            if self._broken is None:
                for k in range(self._next_wait, self._next_k):
                    self._wait(self._records[k], True)
                clean = True
        finally:
            self._shutdown(abandon=not clean)

    # ----------------------------------------------------------------------------------------
    # posting

    def _post(self, send: torch.Tensor, send_splits: Any, recv_splits: Any) -> ExchangeHandle:
        self._check_usable()
        if not isinstance(send, torch.Tensor):
            raise TypeError(f"send must be a torch.Tensor, got {type(send).__name__}")
        if send.layout != torch.strided:
            raise TypeError(f"send must be a dense (strided) tensor, got layout {send.layout}")
        if send.is_meta:
            raise ValueError("send is on the meta device: it has no data to exchange")
        if send.dim() < 1:
            raise ValueError("send must have at least one dimension (rows are split along dim 0)")
        if send.dim() - 1 > _MAX_TRAILING_DIMS:
            raise ValueError(
                f"send has {send.dim() - 1} trailing dims; at most {_MAX_TRAILING_DIMS} supported"
            )
        if send.dtype not in _DTYPE_CODE:
            raise TypeError(f"send dtype {send.dtype} is not supported by the exchange")
        W, me = self.world_size, self.rank
        send_splits = _as_splits(send_splits, W, "send_splits")
        if sum(send_splits) != send.shape[0]:
            raise ValueError(
                f"send_splits sum to {sum(send_splits)} but send has {send.shape[0]} rows (dim 0)"
            )
        if recv_splits is not None:
            recv_splits = _as_splits(recv_splits, W, "recv_splits")
            if recv_splits[me] != send_splits[me]:
                raise ValueError(
                    f"recv_splits[{me}]={recv_splits[me]} but this rank sends "
                    f"send_splits[{me}]={send_splits[me]} rows to itself"
                )
        elif self._known:
            raise ValueError(f"channel {self.name!r} was created with known_splits=True: "
                             f"every exchange passes recv_splits")
        tr = self.transport
        if send.is_cuda and tr.device.type != "cuda" and not self._warned_staging:
            self._warned_staging = True
            warnings.warn(
                f"channel {self.name!r} runs on {tr.name}: its CUDA tensors are staged through "
                f"host memory every iteration (the host waits for the copy). Create it with "
                f"device='cuda' for the GPU path (transport 'auto' then picks NCCL).",
                RuntimeWarning, stacklevel=3,
            )
        k = self._next_k
        self._check_bound(k)
        buf, slot = self._fill_slot(k, send)
        trailing = send.shape[1:]
        row_bytes = send.element_size() * math.prod(trailing)
        out_device = self.device if self.device is not None else send.device
        head = self._head(send.dtype, trailing)
        it = _Iteration(k, slot, buf, head, send_splits, recv_splits, row_bytes, out_device)
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
        H, i = _HEADER_BYTES, k % (self.bound + 1)
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
            hdr = np.empty((W - 1, _HEADER_LEN), dtype=np.int64)
        row = head.copy()
        row[_H_ITER] = k
        row[_H_RELEASED] = self._counters.released
        row[_H_SPILL] = spill
        hdr[:] = row
        hdr[:, _H_ROWS] = rows_p
        if recv_splits is not None:
            hdr[:, _H_EXPECT] = recv_splits[:me] + recv_splits[me + 1 :]
        if not spill and total > H * (W - 1):
            src = buf.np  # host bytes of the slot (gloo)
            if uniform:
                nb = nbs_p[0]
                table[:me, H:] = src[: me * nb].reshape(me, nb)
                after = me * nb + send_splits[me] * row_bytes  # peers after this rank's own rows
                table[me:, H:] = src[after : after + (W - 1 - me) * nb].reshape(W - 1 - me, nb)
            else:
                nbs = [s * row_bytes for s in send_splits]
                chunks = np.split(src[: sum(nbs)], list(itertools.accumulate(nbs))[:-1])
                del chunks[me]
                parts: list[np.ndarray] = [_NO_BYTES] * (2 * (W - 1))
                parts[0::2] = hdr.view(np.uint8)
                parts[1::2] = chunks
                np.concatenate(parts, out=msg[:total])
        in_sizes = sizes_p[:me] + [0] + sizes_p[me:]
        in_buf = self._msg_in[i]
        in_buf.host(self._msg_in_bytes)
        if self._ordered:
            # Stream-ordered (NCCL, local): the progress thread posts every group of the channel,
            # in one order on every rank; here only the slot's readiness is marked.
            if spill and self._slot_written is not None:
                self._slot_written(k)  # where the caller's stream finished writing the slot
            if W > 1 and not self._known:
                it.msg_args = (in_buf.torch(self._msg_in_bytes), self._msg_out_sizes,
                               out_buf.torch(total), in_sizes)
        elif W > 1:
            try:
                it.msg_work = tr.alltoall(MESSAGE, k, in_buf.torch(self._msg_in_bytes),
                                          self._msg_out_sizes,
                                          out_buf.torch(total), in_sizes)
            except Exception as e:  # the transport refuses to post: the channel is gone
                raise self._fail(k, "posting", e) from e
        self._bytes_sent += sum(nbs_p)
        self._records[k] = it
        self._next_k = k + 1
        self._counters.post(k)
        if self._eager and (spill or self._spilled or not self._gather_late):
            it.queued = True
            self._queue.put(it)
        return ExchangeHandle(self, it)

    def _fill_slot(self, k: int, send: torch.Tensor) -> tuple[_Buffer, torch.Tensor]:
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

    def _slot(self, k: int, nbytes: int) -> _Buffer:
        """Send slot k % (B+1), at least nbytes long, on the transport's device."""
        buf = self._slots[k % (self.bound + 1)]
        if buf.t is None or buf.t.numel() < nbytes:
            # On the transport's device: NCCL reads the slot itself (a fused lookup can write
            # straight into it through send_buffer()); gloo's is host memory.
            buf.grow(nbytes, self.transport.empty)
        return buf

    def _head(self, dtype: torch.dtype, trailing: tuple[int, ...]) -> np.ndarray:
        """This rank's header row for rows of (dtype, trailing dims); per-iteration fields 0."""
        head = self._heads.get((dtype, trailing))
        if head is None:
            dims = list(trailing) + [0] * (_MAX_TRAILING_DIMS - len(trailing))
            head = np.array([_MAGIC, self.transport.channel_id, 0, _DTYPE_CODE[dtype],
                             len(trailing), *dims, 0, 0, -1, 0, 0], dtype=np.int64)
            self._heads[(dtype, trailing)] = head
        return head

    def _check_bound(self, k: int) -> None:
        outstanding = k - self._next_wait
        if outstanding >= self.bound + 1:
            raise BoundError(
                f"channel {self.name!r} (rank {self.rank}): {outstanding} exchanges outstanding "
                f"with bound B={self.bound}; wait() iteration {self._next_wait} before posting "
                f"iteration {k}"
            )

    # ----------------------------------------------------------------------------------------
    # processing (progress thread, or the caller)

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

    def _receive_known(self, it: _Iteration) -> None:
        """A header-less iteration (known_splits): its data group, sized by the splits, at once."""
        rows, rb, c = it.recv_splits, it.row_bytes, self._counters
        total = sum(rows)
        out = self.transport.empty((total * rb,), torch.uint8)
        c.gate(it.k, self.bound)  # device gate (release of k-B-1) before the data
        # Every rank posts the data group of every iteration (empty where it moves nothing):
        # without headers nobody knows whether another rank has data.
        it.data_work = self._post_data(it, out, [r * rb for r in rows])
        it.result = (out.view(it.slot.dtype).view((total, *it.slot.shape[1:])), rows)
        self._bytes_received += (total - rows[self.rank]) * rb
        c.learn_all(it.k, [c.released] * self.world_size)  # no news from peers

    def _post_messages(self, it: _Iteration) -> None:
        args, it.msg_args = it.msg_args, None
        if args is None or self._broken is not None:
            return
        try:
            it.msg_work = self.transport.alltoall(MESSAGE, it.k, *args)
        except Exception as e:  # _process hands the channel's error to the waiting caller
            self._fail(it.k, "posting", e)

    def _claim(self, it: _Iteration) -> bool:
        with self._claim_lock:
            if it.claimed:
                return False
            it.claimed = True
            return True

    def _poll(self, it: _Iteration) -> bool:
        if not it.queued and not it.claimed:
            it.queued = True
            self._queue.put(it)
        if not it.finished:
            return False
        work = it.data_work
        return work is None or self.transport.stream_ordered or work.is_completed()

    def _process(self, it: _Iteration, step: Any = None) -> None:
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
            except BaseException as e:  # handed to the waiting caller
                it.error = e
                if not isinstance(e, ValueError):
                    self._broken = e
        with self._claim_lock:
            it.finished = True
            event = it.event
        if event is not None:
            event.set()

    def _decide(self, it: _Iteration) -> None:
        self._await_messages(it)
        if (threading.current_thread() is self._thread and self._gather_late
                and not it.spill and not self._received(it.k)[1][:, _H_SPILL].any()):
            # No data alltoall in k: nothing peers wait for. Reading the headers and gathering the
            # payloads is left to the caller's wait(), with no hand-off.
            it.gather_late = True
        else:
            self._receive(it)

    def _await(self, it: _Iteration, timeout_s: float | None) -> bool:
        """Block until another thread processed `it` (False: not within timeout_s)."""
        with self._claim_lock:
            if it.finished:
                return True
            if it.event is None:
                it.event = threading.Event()
            event = it.event
        return event.wait(timeout_s)

    def _await_messages(self, it: _Iteration) -> None:
        if it.msg_work is not None:
            try:
                self.transport.wait_all(it.msg_work, self.timeout_s)
            except Exception as e:
                raise self._fail(it.k, "header", e) from e
            it.msg_work = None

    def _receive(self, it: _Iteration) -> None:
        k, tr, W, me = it.k, self.transport, self.world_size, self.rank
        slot, row_bytes, head = it.slot, it.row_bytes, it.head
        # The peers' headers: rows of a [W-1, 16] int64 view of the receive buffer.
        table, hdr = self._received(k)
        want = head[:_H_FIXED].copy()
        want[_H_ITER] = k
        # One byte comparison of every peer's fixed fields (a mismatch is then looked at closely).
        off = hdr[:, :_H_FIXED].tobytes() != want.tobytes() * (W - 1)
        if off and (hdr[:, :3] != want[:3]).any():
            bad = int(np.flatnonzero((hdr[:, :3] != want[:3]).any(axis=1))[0])
            raise BLSError(
                f"channel {self.name!r} (rank {me}): corrupt header from peer "
                f"{bad + (bad >= me)} for iteration {k}: {hdr[bad, :3].tolist()}"
            )
        rows_p, released, expect, spills = hdr[:, _H_ROWS : _H_SPILL + 1].T.tolist()
        self._counters.learn_all(k, released[:me] + [self._counters.released] + released[me:])
        rows = rows_p[:me] + [it.send_splits[me]] + rows_p[me:]
        spill = it.spill or any(spills)
        if spill:
            self._spilled = True
        expect.insert(me, -1)
        problems = self._check_headers(it, hdr, off, rows, expect)
        if problems:
            # Complete the iteration so every rank stays in step, then say what disagreed.
            if spill:
                sizes = [rows[p] * (_row_bytes_of(hdr[p - (p > me)]) if p != me else row_bytes)
                         for p in range(W)]
                scratch = tr.empty((sum(sizes),), torch.uint8)
                self._counters.gate(k, self.bound)
                it.data_work = self._post_data(it, scratch, sizes)
            it.error = ValueError(
                f"channel {self.name!r} iteration {k}: the ranks disagree: " + "; ".join(problems)
            )
            return

        total = sum(rows)
        shape = (total, *slot.shape[1:])
        if spill:
            out = tr.empty((total * row_bytes,), torch.uint8)
            self._counters.gate(k, self.bound)  # device gate (released >= k-B) before the data
            it.data_work = self._post_data(it, out, [r * row_bytes for r in rows])
            result = out.view(slot.dtype).view(shape)
        else:
            raw, result = _host_tensor(slot.dtype, shape)
            if total * row_bytes:
                self._gather(it, raw, table, rows)
        self._bytes_received += (total - rows[me]) * row_bytes
        it.result = (result, rows)

    def _received(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The MESSAGE receive buffer of iteration k as a [W-1, stride] table, and its headers."""
        buf = self._msg_in[k % (self.bound + 1)]
        if buf.views is None:
            table = buf.np[: self._msg_in_bytes].reshape(self.world_size - 1, self._stride)
            buf.views = (table, table[:, :_HEADER_BYTES].view(np.int64))
        return buf.views

    def _gather(self, it: _Iteration, out: np.ndarray, table: np.ndarray, rows: list[int]) -> None:
        """Every peer's inline payload, and this rank's own rows, into `out` in rank order."""
        me, W, H, rb = self.rank, self.world_size, _HEADER_BYTES, it.row_bytes
        own = it.buf.np
        lo = sum(it.send_splits[:me]) * rb
        n_me = rows[me] * rb
        if len(set(rows)) == 1:  # balanced: three block copies
            nb = n_me
            out[: me * nb].reshape(me, nb)[:] = table[:me, H : H + nb]
            out[me * nb : (me + 1) * nb] = own[lo : lo + nb]
            out[(me + 1) * nb :].reshape(W - 1 - me, nb)[:] = table[me:, H : H + nb]
            return
        pieces = [table[q, H : H + r * rb] for q, r in enumerate(rows[:me] + rows[me + 1 :])]
        pieces.insert(me, own[lo : lo + n_me])
        np.concatenate(pieces, out=out)

    def _check_headers(self, it: _Iteration, hdr: np.ndarray, off: bool, rows: list[int],
                       expect: list[int]) -> list[str]:
        """What the peers' headers of this iteration contradict (empty: nothing)."""
        W, me = self.world_size, self.rank
        problems: list[str] = []
        if off:  # dtype or trailing dims differ somewhere
            head = self._head(it.slot.dtype, tuple(it.slot.shape[1:]))
            differ = (hdr[:, _H_DTYPE:_H_FIXED] != head[_H_DTYPE:_H_FIXED]).any(axis=1)
            for q in np.flatnonzero(differ).tolist():
                dt, tr = _dtype_of(hdr[q]), _trailing_of(hdr[q])
                problems.append(
                    f"rank {q + (q >= me)} sends {dt} rows of shape {tr} but rank {me} exchanges "
                    f"{it.slot.dtype} rows of shape {list(it.slot.shape[1:])}")
        known = it.recv_splits
        if known is not None and known != rows:
            problems += [f"recv_splits[{p}]={known[p]} on rank {me} but rank {p} sends {rows[p]} "
                         f"rows" for p in range(W) if known[p] != rows[p]]
        if expect != it.send_splits and max(expect) >= 0:
            problems += [f"rank {p} expects {e} rows from rank {me} (its recv_splits) but rank "
                         f"{me} sends send_splits[{p}]={it.send_splits[p]}"
                         for p, e in enumerate(expect) if 0 <= e != it.send_splits[p]]
        return problems

    def _post_data(self, it: _Iteration, out: torch.Tensor, out_sizes: list[int]) -> Any:
        nbytes = sum(it.send_splits) * it.row_bytes
        inp = it.buf.torch(nbytes) if nbytes else _EMPTY
        try:
            return self.transport.alltoall(DATA, it.k, out, out_sizes, inp,
                                           [s * it.row_bytes for s in it.send_splits])
        except Exception as e:
            raise self._fail(it.k, "posting the data", e) from e

    # ----------------------------------------------------------------------------------------
    # waiting

    def _wait(self, it: _Iteration, blocking: bool) -> tuple[torch.Tensor, list[int]]:
        while self._next_wait <= it.k:
            self._finish(self._records[self._next_wait], blocking and self._next_wait == it.k)
        if it.error is not None:
            raise it.error
        assert it.result is not None
        return it.result

    def _finish(self, it: _Iteration, blocking: bool) -> None:
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

    def _finish_inner(self, it: _Iteration, blocking: bool) -> None:
        # An iteration nobody took yet is processed here: no thread hand-off (all of them at B=0).
        if not it.finished and self.transport.caller_may_receive and self._claim(it):
            self._process(it)
        # Every transport wait inside is bounded by the timeout; this is a safety net.
        if not it.finished and not self._await(it, 2 * self.timeout_s + 10.0):
            it.error = BLSError(
                f"channel {self.name!r} (rank {self.rank}): iteration {it.k} never completed"
            )
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
            if out.device != it.out_device:
                it.result = (out.to(it.out_device), rows)
        elif it.error is not None and not isinstance(it.error, ValueError):
            self._broken = it.error

    # ----------------------------------------------------------------------------------------
    # failures and shutdown

    def _fail(self, k: int, what: str, exc: BaseException) -> BaseException:
        """The channel's first failure as a PeerError naming the peer (asking the transport when
        the error does not say); later failures raise the same error again."""
        with self._fail_lock:
            if self._broken is not None:
                return self._broken
            grace = min(3.0, max(0.5, 0.25 * self.timeout_s))
            peers, sure = self.transport.blame(k, exc, grace)
            others = [p for p in range(self.world_size) if p != self.rank]
            peer = peers[0] if peers else (others[0] if others else self.rank)
            note = ""
            if sure and len(peers) > 1:
                note = f" (ranks {peers} did not report the failure either)"
            elif not sure and not peers:
                note = " (the failing peer could not be told apart)"
            err = PeerError(
                f"BLS channel {self.name!r} (rank {self.rank}): peer {peer} failed during iteration "
                f"{k} ({what}): {_cause(exc)}{note}",
                peer=peer, channel=self.name, iteration=k,
            )
            self._broken = err
            return err

    def _shutdown(self, abandon: bool) -> None:
        if self._closed:
            return
        self._closed = True
        pending = abandon and any(not it.finished or it.data_work is not None
                                  for it in self._records.values())
        self._queue.put(None)
        if pending:
            # Cancel what is still posted on this channel's own connections: nothing else shares
            # them, and the caller does not wait for a peer that may never come.
            self.transport.abort()
        elif threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)
        self._records.clear()
        if not pending:
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
        asked -= asked % 8  # keeps every header in the ring 8-byte aligned
        # A receive region must never be shorter than what arrives: all ranks use the smallest.
        return self.transport.agree_min(asked)


# numpy's dtype of each torch dtype (bfloat16: its bits as uint16); numpy allocates and fills host
# tensors at a fraction of torch's per-call cost.
_NUMPY_OF = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.bfloat16: np.uint16, torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16,
    torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_,
    torch.complex64: np.complex64, torch.complex128: np.complex128,
}  # fmt: skip


def _host_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
    """A new host tensor and a flat uint8 numpy view of its bytes."""
    if not math.prod(shape):  # numpy gives empty arrays zero strides, which torch views refuse
        return _NO_BYTES, torch.empty(shape, dtype=dtype)
    arr = np.empty(shape, dtype=_NUMPY_OF[dtype])
    t = torch.from_numpy(arr)
    if dtype is torch.bfloat16:
        t = t.view(torch.bfloat16)
    return arr.reshape(-1).view(np.uint8), t


def _dtype_of(row: np.ndarray) -> torch.dtype | None:
    code = int(row[_H_DTYPE])
    return _DTYPES[code] if 0 <= code < len(_DTYPES) else None


def _trailing_of(row: np.ndarray) -> list[int]:
    n = min(max(int(row[_H_NDIM]), 0), _MAX_TRAILING_DIMS)
    return row[_H_DIMS : _H_DIMS + n].tolist()


def _row_bytes_of(row: np.ndarray) -> int:
    """Bytes per row that a peer sends, from its header (its dtype, its trailing dims)."""
    dt = _dtype_of(row)
    return (dt.itemsize if dt is not None else 1) * math.prod(_trailing_of(row))


def _make_transport(kind: Any, group: Any, device: torch.device | None, timeout_s: float):
    if not isinstance(kind, str) and hasattr(kind, "alltoall"):
        return kind  # a transport object (blsgpu/transport/base.py lists what it offers)
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
        kind == "auto" and device is not None and device.type == "cuda" and _gpu_path_available()
    )
    if want_nccl:
        from blsgpu.transport import nccl as _nccl  # noqa: PLC0415 (CuPy and NCCL load only on the GPU path)

        return _nccl.NcclTransport(group, device)
    return GlooTransport(group, timeout_s)


def _gpu_path_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from blsgpu.transport import nccl_lib as _nccl  # noqa: PLC0415

    return _nccl.available()
