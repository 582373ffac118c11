"""What the engine's MESSAGE alltoall carries, and the host memory around it.

Every peer gets one fixed-size int64 header per iteration (layout below), followed, when it fits
the channel's inline capacity, by the payload rows for that peer. This module holds the header
layout and the dtype codes, the growable byte buffers of the send and receive rings, the host
tensors received rows land in, and the per-iteration work on headers that needs no channel state:
checking what peers said against what this rank expects, and gathering inline payloads.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch

from blsgpu import _env
from blsgpu.transport.sizes import offsets

MAX_TRAILING_DIMS = 6
HEADER_LEN = 16
HEADER_BYTES = HEADER_LEN * 8
_MAGIC = 0x424C5331  # "BLS1"
# Header fields (int64). The first H_FIXED are alike in every header of a kind of rows on a channel
# (magic, channel, dtype, trailing dims): one byte comparison checks them all. The rest change per
# iteration and are read with one tolist() (iteration, rows, released, expected rows, spill).
H_MAGIC, H_CHANNEL, H_DTYPE, H_NDIM = 0, 1, 2, 3
H_DIMS = 4  # .. 4 + MAX_TRAILING_DIMS
H_FIXED = H_DIMS + MAX_TRAILING_DIMS
H_ITER, H_ROWS, H_RELEASED, H_EXPECT, H_SPILL = 10, 11, 12, 13, 14

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
# numpy's dtype of each torch dtype (bfloat16: its bits as uint16); numpy allocates and fills host
# tensors at a fraction of torch's per-call cost.
_NUMPY_OF = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.bfloat16: np.uint16, torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16,
    torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_,
    torch.complex64: np.complex64, torch.complex128: np.complex128,
}  # fmt: skip

EMPTY = torch.empty(0, dtype=torch.uint8)
NO_BYTES = np.empty(0, dtype=np.uint8)
_CACHED_VIEWS = 32  # per buffer: exact-length and typed views of its start, reused across iterations


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class Buffer:
    """A growable byte buffer: its tensor, a numpy view when it is host memory, and cached views of
    its start (an alltoall wants a tensor of exactly the bytes it moves; most iterations repeat
    the sizes of an earlier one, and a view costs more than the lookup)."""

    __slots__ = ("t", "np", "ptr", "cap", "views", "_cuts", "_typed")

    def __init__(self) -> None:
        self.ptr = 0
        self.cap = 0  # bytes
        self.views: Any = None  # what a user of the buffer derived from it (reset on growth)
        self.t: torch.Tensor | None = None
        self.np: np.ndarray | None = None
        self._cuts: dict[int, torch.Tensor] = {}
        self._typed: dict[tuple, torch.Tensor] = {}

    def grow(self, nbytes: int, empty: Any) -> None:
        # Geometric growth: a ring fed slowly growing batches does not reallocate each time.
        size = max(nbytes, 64, 2 * self.cap)
        self.t = empty((size,), torch.uint8)
        self.np = self.t.numpy() if self.t.device.type == "cpu" else None
        self.ptr = self.t.data_ptr()
        self.cap = size
        self.views = None
        self._cuts.clear()
        self._typed.clear()

    def host(self, nbytes: int) -> np.ndarray:
        """The numpy view of a host buffer of at least nbytes. Untouched pages cost nothing: only
        the bytes messages use become resident."""
        if self.t is None or self.cap < nbytes:
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


def host_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
    """A new host tensor and a flat uint8 numpy view of its bytes."""
    if not math.prod(shape):  # numpy gives empty arrays zero strides, which torch views refuse
        return NO_BYTES, torch.empty(shape, dtype=dtype)
    arr = np.empty(shape, dtype=_NUMPY_OF[dtype])
    t = torch.from_numpy(arr)
    if dtype is torch.bfloat16:
        t = t.view(torch.bfloat16)
    return arr.reshape(-1).view(np.uint8), t


def header_row(channel_id: int, dtype: torch.dtype, trailing: tuple[int, ...]) -> np.ndarray:
    """A rank's header row for rows of (dtype, trailing dims); the per-iteration fields are 0 (and
    the expected split -1: not known)."""
    dims = list(trailing) + [0] * (MAX_TRAILING_DIMS - len(trailing))
    return np.array(
        [_MAGIC, channel_id, DTYPE_CODE[dtype], len(trailing), *dims, 0, 0, 0, -1, 0, 0], dtype=np.int64
    )


class Rows:
    """One kind of rows a channel exchanges (dtype, trailing dims), with what the engine derives
    from it once: bytes per row, this rank's header row, and the fixed header bytes every peer's
    header must carry (checked with one comparison)."""

    __slots__ = ("dtype", "trailing", "row_bytes", "head", "fixed")

    def __init__(self, channel_id: int, dtype: torch.dtype, trailing: tuple[int, ...]):
        self.dtype = dtype
        self.trailing = trailing
        self.row_bytes = dtype.itemsize * math.prod(trailing)
        self.head = header_row(channel_id, dtype, trailing)
        self.fixed = self.head[:H_FIXED].tobytes()


def dtype_of(row: np.ndarray) -> torch.dtype | None:
    code = int(row[H_DTYPE])
    return DTYPES[code] if 0 <= code < len(DTYPES) else None


def trailing_of(row: np.ndarray) -> list[int]:
    n = min(max(int(row[H_NDIM]), 0), MAX_TRAILING_DIMS)
    return row[H_DIMS : H_DIMS + n].tolist()


def row_bytes_of(row: np.ndarray) -> int:
    """Bytes per row that a peer sends, from its header (its dtype, its trailing dims)."""
    dt = dtype_of(row)
    return (dt.itemsize if dt is not None else 1) * math.prod(trailing_of(row))


def header_problems(
    me: int,
    kind: Rows,
    hdr: np.ndarray,
    off: bool,
    rows: list[int],
    expect: list[int],
    send_splits: list[int],
    recv_splits: list[int] | None,
) -> list[str]:
    """What the peers' headers `hdr` of an iteration contradict (empty: nothing).

    `off`: some peer's dtype or trailing dims differ from `kind`, this rank's rows; `rows`:
    what each rank sends this one; `expect`: what each expects from this one (-1: not said).
    """
    problems: list[str] = []
    if off:
        differ = (hdr[:, H_DTYPE:H_FIXED] != kind.head[H_DTYPE:H_FIXED]).any(axis=1)
        for q in np.flatnonzero(differ).tolist():
            problems.append(
                f"rank {q + (q >= me)} sends {dtype_of(hdr[q])} rows of shape {trailing_of(hdr[q])} "
                f"but rank {me} exchanges {kind.dtype} rows of shape {list(kind.trailing)}"
            )
    if recv_splits is not None and recv_splits != rows:
        problems += [
            f"recv_splits[{p}]={known} on rank {me} but rank {p} sends {rows[p]} rows"
            for p, known in enumerate(recv_splits)
            if known != rows[p]
        ]
    if expect != send_splits and max(expect) >= 0:
        problems += [
            f"rank {p} expects {e} rows from rank {me} (its recv_splits) but rank "
            f"{me} sends send_splits[{p}]={send_splits[p]}"
            for p, e in enumerate(expect)
            if 0 <= e != send_splits[p]
        ]
    return problems


# The per-iteration byte work, in numpy. blsgpu/exchange/_native.c does the same in C over raw
# (address, capacity) pairs, byte for byte; native() says which one a new channel uses.


def native() -> Any:
    """The C module of the byte work, or None: not built (no compiler at install) or BLSGPU_NATIVE=0."""
    if not _env.native_enabled():
        return None
    try:
        return importlib.import_module("blsgpu.exchange._native")
    except ImportError:
        return None


def fill_message(
    msg: np.ndarray,
    src: np.ndarray | None,
    send_splits: list[int],
    me: int,
    row_bytes: int,
    fixed: bytes,
    k: int,
    released: int,
    spill: bool,
    recv_splits: list[int] | None,
    keep: bool,
) -> int:
    """Every peer's header and (unless spill) payload from the send bytes `src`, in rank order,
    this rank left out, into `msg`; with keep, this rank's own rows follow at msg[total:]. Returns
    total, the bytes of the messages."""
    W, H, rb = len(send_splits), HEADER_BYTES, row_bytes
    if src is None:  # no host bytes (a device slot): nothing inline to read
        src = NO_BYTES
    rows_p = send_splits[:me] + send_splits[me + 1 :]
    uniform = spill or not rows_p or rows_p.count(rows_p[0]) == W - 1
    nb = rows_p[0] * rb if rows_p and not spill else 0  # per peer, when uniform
    total = (H + nb) * (W - 1) if uniform else H * (W - 1) + sum(rows_p) * rb
    if uniform:  # every peer's message alike: fill the buffer as a [W-1, H + nb] table
        table = msg[:total].reshape(W - 1, H + nb)
        hdr = table[:, :H].view(np.int64)
    else:
        hdr = np.empty((W - 1, HEADER_LEN), dtype=np.int64)
    row = np.empty(HEADER_LEN, dtype=np.int64)  # one row, then the row into every header
    row[:H_FIXED] = np.frombuffer(fixed, dtype=np.int64)
    row[H_FIXED:] = (k, 0, released, -1, int(spill), 0)
    hdr[:] = row
    hdr[:, H_ROWS] = rows_p
    if recv_splits is not None:
        hdr[:, H_EXPECT] = recv_splits[:me] + recv_splits[me + 1 :]
    if spill:
        return total
    n_me = send_splits[me] * rb
    lo = sum(send_splits[:me]) * rb  # this rank's own rows in the send bytes
    if not uniform:  # headers and payloads in one concatenation (the headers are not in msg yet)
        chunks = np.split(src[: sum(send_splits) * rb], offsets([s * rb for s in send_splits])[1:-1])
        del chunks[me]
        parts: list[np.ndarray] = [NO_BYTES] * (2 * (W - 1))
        parts[0::2] = hdr.view(np.uint8)
        parts[1::2] = chunks
        np.concatenate(parts, out=msg[:total])
    elif nb:
        table[:me, H:] = src[: me * nb].reshape(me, nb)
        after = lo + n_me  # peers after this rank's own rows
        table[me:, H:] = src[after : after + (W - 1 - me) * nb].reshape(W - 1 - me, nb)
    if keep and n_me:
        msg[total : total + n_me] = src[lo : lo + n_me]
    return total


def read_headers(
    table: np.ndarray, me: int, fixed: bytes, k: int, own_rows: int, own_released: int, own_expect: int
) -> tuple[bool, bool, list[int], list[int], list[int], bool, bool]:
    """The peers' headers (rows of `table`, [W-1, stride] bytes) read and checked:
    (off, corrupt, rows, released, expect, said, spill). off: some fixed field differs; corrupt:
    a magic, channel or iteration differs; rows, released, expect per rank with this rank's own at
    `me`; said: some peer gave its expected rows; spill: some peer spilled."""
    W = table.shape[0] + 1
    hdr = table[:, :HEADER_BYTES].view(np.int64)
    off = hdr[:, :H_FIXED].tobytes() != fixed * (W - 1)
    iters, rows, released, expect, spills = hdr[:, H_ITER : H_SPILL + 1].T.tolist()
    corrupt = iters.count(k) != W - 1 or bool(
        off and (hdr[:, :H_DTYPE] != np.frombuffer(fixed, dtype=np.int64)[:H_DTYPE]).any()
    )
    said = expect.count(-1) != W - 1
    rows.insert(me, own_rows)
    released.insert(me, own_released)
    expect.insert(me, own_expect)
    return off, corrupt, rows, released, expect, said, any(spills)


def gather(
    out: np.ndarray, table: np.ndarray, rows: list[int], me: int, own: np.ndarray, row_bytes: int
) -> None:
    """Every peer's inline payload (rows of `table`, behind the headers) and this rank's own rows
    (the bytes `own`) into `out`, in rank order."""
    H, W = HEADER_BYTES, len(rows)
    if rows.count(rows[0]) == W:  # balanced: up to three block copies (nb > 0: the result is not empty)
        nb = rows[0] * row_bytes
        if me:
            out[: me * nb].reshape(me, nb)[:] = table[:me, H : H + nb]
        out[me * nb : (me + 1) * nb] = own
        if me < W - 1:
            out[(me + 1) * nb :].reshape(W - 1 - me, nb)[:] = table[me:, H : H + nb]
        return
    pieces = [table[q, H : H + r * row_bytes] for q, r in enumerate(rows[:me] + rows[me + 1 :])]
    pieces.insert(me, own)
    np.concatenate(pieces, out=out)


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous host tensor as a flat uint8 numpy view (no copy)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: view its bits
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)
