"""Pooled embedding-bag lookup over T tables at once, packed into one [N, sum(D_t)] tensor.

Layout as TorchRec/FBGEMM: ``indices`` flat, ``offsets`` of length T*N+1, bags table-major (table 0's
N bags, then table 1's, ...). Table t fills columns [col_t, col_t + D_t) of each output row (see
`column_offsets`), so the result, or the caller's ``out`` view into an exchange send buffer, is ready to
send. Two backends, one semantics: a Triton kernel (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and torch ops (CPU or CUDA). Both accumulate in fp32; an empty bag pools to
zeros. The kernel rounds once, to the output dtype. The torch path (torch's embedding_bag) applies
per-sample weights in the table dtype and rounds an fp16/bf16 table's bags to that dtype before the
cast to the output dtype, so it can differ from the kernel by about one ulp of the table dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import pairwise
from typing import Literal

import numpy as np
import torch

Pooling = Literal["sum", "mean"]
Backend = Literal["auto", "triton", "torch"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_QPARAM_BYTES = 8  # fp32 scale + fp32 bias at the end of each fused 8-bit row
_EPS = 1e-8  # FBGEMM's kEpsilon: keeps a constant row from dividing by zero


class QuantizedTable:
    """Int8 row-wise table in FBGEMM's fused 8-bit layout.

    Each row of ``data`` (uint8 [rows, D + 8]) holds D codes, then an fp32 scale and an fp32 bias
    (little-endian); row r dequantizes to ``codes[r] * scale[r] + bias[r]``. This is what
    ``torch.ops.quantized.embedding_bag_byte_prepack`` and fbgemm's ``FloatToFused8BitRowwiseQuantized``
    produce, so tables move between them without conversion.
    """

    def __init__(self, data: torch.Tensor):
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"QuantizedTable data must be a tensor, got {type(data).__name__}")
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] <= _QPARAM_BYTES:
            raise ValueError(
                "QuantizedTable data must be uint8 [rows, D + 8] (D codes, fp32 scale, fp32 bias), "
                f"got {data.dtype} {list(data.shape)}"
            )
        if data.stride(1) != 1:
            raise ValueError("QuantizedTable data must have unit column stride")
        self.data = data

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> QuantizedTable:
        """Quantize a float [rows, D] table row-wise: scale = (max - min) / 255, bias = min."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', weight)}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight must be fp32, fp16 or bf16, got {weight.dtype}")
        w = weight.detach().float()
        if w.shape[0] == 0:
            lo = hi = w.new_zeros(0, 1)
        else:
            lo = w.amin(dim=1, keepdim=True)
            hi = w.amax(dim=1, keepdim=True)
        span = hi - lo
        # Same fp32 arithmetic as FBGEMM's reference quantizer, so codes match it bit for bit.
        inverse_scale = 255.0 / (span + _EPS)
        codes = torch.round((w - lo) * inverse_scale).clamp_(0, 255).to(torch.uint8)
        qparams = torch.cat([span / 255.0, lo], dim=1).contiguous().view(torch.uint8)
        return cls(torch.cat([codes, qparams], dim=1))

    @property
    def num_embeddings(self) -> int:
        return self.data.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.data.shape[1] - _QPARAM_BYTES

    @property
    def shape(self) -> torch.Size:
        """(rows, D), as for a float table."""
        return torch.Size((self.num_embeddings, self.embedding_dim))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes the table occupies: D + 8 per row."""
        return self.data.numel() * self.data.element_size()

    @property
    def codes(self) -> torch.Tensor:
        """uint8 [rows, D] view of the codes."""
        return self.data[:, : self.embedding_dim]

    def _qparams(self) -> torch.Tensor:
        # A copy, not .contiguous(): a one-row slice is contiguous already but keeps a storage
        # offset that a float32 view refuses when D is not a multiple of 4.
        return self.data[:, self.embedding_dim :].clone(memory_format=torch.contiguous_format).view(
            torch.float32
        )

    @property
    def scale(self) -> torch.Tensor:
        """fp32 [rows] per-row scale (a copy)."""
        return self._qparams()[:, 0]

    @property
    def bias(self) -> torch.Tensor:
        """fp32 [rows] per-row bias (a copy)."""
        return self._qparams()[:, 1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [rows, D] table these codes stand for."""
        qp = self._qparams()
        return (self.codes.float() * qp[:, :1] + qp[:, 1:]).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedTable:
        return QuantizedTable(self.data.to(device))

    def __repr__(self) -> str:
        return f"QuantizedTable(rows={self.num_embeddings}, D={self.embedding_dim}, device={self.device})"


Table = torch.Tensor | QuantizedTable


def column_offsets(tables: Sequence[Table | int]) -> list[int]:
    """[0, D_0, D_0 + D_1, ..., sum(D_t)]: table t fills output columns [col[t], col[t + 1]).

    Args:
        tables: the tables, or their dims D_t.
    """
    cols = [0]
    for t in tables:
        cols.append(cols[-1] + (t if isinstance(t, int) else int(t.shape[1])))
    return cols


def pooled_lookup(
    tables: Sequence[Table],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    *,
    per_sample_weights: torch.Tensor | None = None,
    pooling: Pooling = "sum",
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Pool bags of rows from T tables into one [N, sum(D_t)] tensor (inference: no autograd).

    Args:
        tables: T tables, each a float [rows_t, D_t] tensor (fp32, fp16, bf16) with unit column
            stride, or a `QuantizedTable`.
        indices: int32/int64 ids, flat; bag (t, b) is indices[offsets[t*N + b] : offsets[t*N + b + 1]].
        offsets: int32/int64, length T*N + 1, starting at 0, non-decreasing, ending at len(indices).
        per_sample_weights: one float weight per id. With "mean" a bag pools to sum(w * row) / (ids
            in the bag), as FBGEMM's table-batched embedding (torch's embedding_bag refuses it).
        pooling: "sum" or "mean" (an empty bag is zeros either way).
        out: optional [N, sum(D_t)] destination with unit column stride, e.g. a view into a larger
            send buffer (its row stride is honoured). N is taken from it when given.
        out_dtype: fp32, fp16 or bf16; default out's dtype, else the tables' common float dtype
            (int8 row-wise tables count as fp32).
        backend: "triton", "torch" or "auto" (Triton for CUDA tensors, torch for CPU tensors).
        validate: check offsets and ids before anything is written (one host sync on GPU). With
            False the Triton kernel still never reads outside the ids or a table (bad ids pool as
            zeros, offsets are clamped to the ids); the torch path then relies on torch's own
            checks, which catch bad ids but not bad offsets.

    Returns:
        `out` when given, else a new [N, sum(D_t)] tensor.
    """
    tables = list(tables) if isinstance(tables, (list, tuple)) else tables
    dims, out_dtype = _check_tables(tables, out, out_dtype)
    device = _table_device(tables[0])
    n = _check_index_args(len(tables), indices, offsets, per_sample_weights, pooling, out, device)
    cols = column_offsets(dims)
    if out is None:
        out = torch.empty((n, cols[-1]), dtype=out_dtype, device=device)
    else:
        _check_out(out, n, cols[-1], out_dtype, device)
    backend = _resolve_backend(backend, device)
    indices, offsets = indices.contiguous(), offsets.contiguous()
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.contiguous()
    bounds = _check_offsets(indices, offsets, len(tables), n) if validate else None
    # torch's CPU kernels check every id before they read its row (and _torch_lookup writes out only
    # after all tables pooled), so there the id check runs only to name a failure.
    torch_checks_ids = backend == "torch" and indices.device.type == "cpu"
    if validate and not torch_checks_ids:
        _check_ids(tables, indices, bounds)
    if n == 0 or out.shape[1] == 0:
        return out
    if indices.numel() == 0:
        return out.zero_()
    mean = pooling == "mean"
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled:  # tables may be Parameters; a lookup for inference records nothing
        torch.set_grad_enabled(False)
    try:
        if backend == "triton":
            # Triton launches on the thread's current device: make it the tensors' one.
            with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
                _triton_lookup(tables, dims, cols, indices, offsets, per_sample_weights, out, mean)
        else:
            _torch_lookup(tables, cols, indices, offsets, per_sample_weights, out, n, mean, bounds)
    except (RuntimeError, IndexError):
        if validate and backend == "torch":
            _check_ids(tables, indices, bounds)  # raises the ValueError if an id was bad
        raise
    finally:
        if grad_enabled:
            torch.set_grad_enabled(True)
    return out


# --------------------------------------------------------------------------------------------------
# Validation: shapes and dtypes first (no device work), then data (offsets, ids).


def _table_device(table: Table) -> torch.device:
    return table.data.device if isinstance(table, QuantizedTable) else table.device


def _check_tables(tables, out, out_dtype) -> tuple[list[int], torch.dtype]:
    if not isinstance(tables, list) or not tables:
        raise ValueError("tables must be a non-empty list of tensors or QuantizedTable")
    dims = []
    dtypes = set()
    device = None
    for t, table in enumerate(tables):
        if isinstance(table, torch.Tensor):
            if table.dim() != 2:
                raise ValueError(f"table {t} must be 2-D [rows, D], got shape {list(table.shape)}")
            dtype = table.dtype
            if dtype not in _FLOAT_DTYPES:
                raise ValueError(f"table {t} has dtype {dtype}; use fp32, fp16, bf16 or QuantizedTable")
            if table.stride(1) != 1 and table.shape[1] > 1:
                raise ValueError(f"table {t} must have unit column stride (call .contiguous())")
            dtypes.add(dtype)
            table_device = table.device
        elif isinstance(table, QuantizedTable):
            dtypes.add(torch.float32)
            table_device = table.data.device
        else:
            raise TypeError(f"table {t} is a {type(table).__name__}, not a tensor or QuantizedTable")
        if device is None:
            device = table_device
        elif table_device != device:
            raise ValueError(f"table {t} is on {table_device}, table 0 on {device}")
        dims.append(table.shape[1])
    if out_dtype is None:
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else reduce(torch.promote_types, dtypes)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be fp32, fp16 or bf16, got {out_dtype}")
    return dims, out_dtype


def _check_index_args(num_tables, indices, offsets, psw, pooling, out, device) -> int:
    """Checks what needs no data; returns N."""
    for name, x in (("indices", indices), ("offsets", offsets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be 1-D int32 or int64, got {x.dtype} {list(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the tables on {device}")
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if psw is not None:
        if not isinstance(psw, torch.Tensor) or psw.dim() != 1 or not psw.is_floating_point():
            raise ValueError("per_sample_weights must be a 1-D float tensor")
        if psw.numel() != indices.numel():
            raise ValueError(
                f"per_sample_weights has {psw.numel()} weights for {indices.numel()} indices"
            )
        if psw.device != device:
            raise ValueError(f"per_sample_weights is on {psw.device}, the tables on {device}")
    num_offsets = offsets.numel()
    if isinstance(out, torch.Tensor) and out.dim() >= 1:
        n = out.shape[0]
    elif num_offsets >= 1 and (num_offsets - 1) % num_tables == 0:
        n = (num_offsets - 1) // num_tables
    else:
        raise ValueError(
            f"offsets must have T*N + 1 entries for T={num_tables} tables; got {num_offsets}"
        )
    if num_offsets != num_tables * n + 1:
        raise ValueError(
            f"offsets must have T*N + 1 = {num_tables * n + 1} entries (T={num_tables}, N={n} from "
            f"out), got {num_offsets}"
        )
    return n


def _check_out(out, n, width, out_dtype, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.dim() != 2 or tuple(out.shape) != (n, width):
        raise ValueError(f"out must have shape [N, sum(D_t)] = [{n}, {width}], got {list(out.shape)}")
    if out.dtype != out_dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected out_dtype {out_dtype}")
    if out.stride(1) != 1 and width > 1:
        raise ValueError("out must have unit column stride (a row-strided view is fine)")
    if n > 1 and width > 0 and abs(out.stride(0)) < width:
        raise ValueError(
            f"out rows overlap (row stride {out.stride(0)} < width {width}): every output element "
            f"needs its own memory"
        )
    if out.device != device:
        raise ValueError(f"out is on {out.device}, the tables on {device}")


def _resolve_backend(backend, device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton" and device.type != "cuda":
        from blsgpu.kernels.embedding_bag import interpreting

        if not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton is "
                f"imported, to interpret the kernel on CPU); got tensors on {device}"
            )
    return backend


def _check_offsets(indices, offsets, num_tables, n) -> list[int]:
    """Offsets start at 0, never decrease and end at len(indices).

    Returns the T + 1 table boundaries in the ids (offsets[0], offsets[N], ..., offsets[T*N]).
    """
    if offsets.device.type != "cpu":
        first, last, decreasing, bounds = _offsets_summary_device(offsets, num_tables, n)
    else:
        # numpy views of CPU tensors: a few microseconds where torch ops cost tens.
        off = offsets.numpy()
        bounds = off[:: max(n, 1)].tolist()  # its last entry is offsets[-1] (T*N is a multiple)
        first, last = bounds[0], bounds[-1]
        decreasing = bool((off[1:] < off[:-1]).any())
    if first != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {first}")
    if decreasing:
        off = offsets.cpu()
        i = int(torch.nonzero(off[1:] < off[:-1])[0])
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{i}] = {int(off[i])} > "
            f"offsets[{i + 1}] = {int(off[i + 1])}"
        )
    if last != indices.numel():
        raise ValueError(
            f"offsets must end at len(indices) = {indices.numel()}, got offsets[-1] = {last}"
        )
    return bounds if n > 0 else [0] * (num_tables + 1)


def _check_ids(tables, indices, bounds) -> None:
    """Every id of table t lies in [0, rows_t); names the first that does not."""
    rows = [int(t.shape[0]) for t in tables]
    if indices.numel() == 0 or _ids_in_range(indices, bounds, rows):
        return
    for t, (a, b) in enumerate(pairwise(bounds)):
        ids = indices[a:b]
        bad = torch.nonzero((ids < 0) | (ids >= rows[t]))
        if bad.numel():
            p = int(bad[0])
            raise ValueError(
                f"indices[{a + p}] = {int(ids[p])} is out of range for table {t} with "
                f"{rows[t]} rows (ids must lie in [0, {rows[t]}))"
            )


def _offsets_summary_device(offsets, num_tables, n):
    """(offsets[0], offsets[-1], any decrease, table boundaries) with one host sync."""
    off = offsets.long()
    decreasing = (off[1:] < off[:-1]).any().long().view(1)
    bounds_idx = torch.arange(0, num_tables * n + 1, max(n, 1), device=off.device)
    first, last, dec, *bounds = torch.cat([off[:1], off[-1:], decreasing, off[bounds_idx]]).tolist()
    return first, last, bool(dec), bounds


def _ids_in_range(indices, bounds, rows) -> bool:
    if indices.device.type != "cpu":
        # One pass, no per-table launches: each id against its own table's row count.
        counts = torch.tensor([b - a for a, b in pairwise(bounds)], device=indices.device)
        limit = torch.repeat_interleave(
            torch.tensor(rows, device=indices.device), counts, output_size=indices.numel()
        )
        return not bool(((indices < 0) | (indices >= limit)).any())
    # One pass: seen as unsigned, a negative id is huge, so a per-table max catches both ends.
    spans = [(a, r) for (a, b), r in zip(pairwise(bounds), rows, strict=True) if b > a]
    ids = indices.numpy()
    ids = ids.view(np.uint32 if ids.dtype == np.int32 else np.uint64)
    hi = np.maximum.reduceat(ids, [a for a, _ in spans])
    return bool((hi < np.array([r for _, r in spans], dtype=ids.dtype)).all())


# --------------------------------------------------------------------------------------------------
# Torch path: one embedding_bag per table, written straight into the table's column slice.

try:
    _QUANTIZED_BAG = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
except (AttributeError, RuntimeError):  # torch built without the quantized CPU engine
    _QUANTIZED_BAG = None


def _torch_lookup(tables, cols, indices, offsets, psw, out, n, mean, bounds) -> None:
    if offsets.dtype != indices.dtype:
        offsets = offsets.to(indices.dtype)
    if bounds is None:  # validation skipped: read the table boundaries in the ids here
        bounds = offsets[::n].tolist()
    num_tables = len(tables)
    # Every table's offsets relative to its first id, [T, N + 1], in three ops instead of T.
    starts = offsets[:-1:n].view(num_tables, 1)
    rel = torch.empty((num_tables, n + 1), dtype=offsets.dtype, device=offsets.device)
    torch.sub(offsets[:-1].view(num_tables, n), starts, out=rel[:, :n])
    torch.sub(offsets[n::n].view(num_tables, 1), starts, out=rel[:, n:])
    # Per-table views in one call each (Python-level slicing costs microseconds per table).
    counts = [b - a for a, b in pairwise(bounds)]
    ids_t = indices.split(counts)
    psw_t = psw.split(counts) if psw is not None else (None,) * num_tables
    # torch's embedding_bag takes weights with "sum" only: a weighted mean sums, then divides.
    weighted_mean = mean and psw is not None
    mode = 1 if mean and not weighted_mean else 0
    pooled = []
    for table, ids, offs, weights in zip(tables, ids_t, rel.unbind(0), psw_t, strict=True):
        if isinstance(table, QuantizedTable):
            pooled.append(_quantized_bag(table, ids, offs, weights, mean))
            continue
        if weights is not None and weights.dtype != table.dtype:
            weights = weights.to(table.dtype)
        # The aten op itself: F.embedding_bag repeats checks that validation already made.
        bag = torch.embedding_bag(table, ids, offs, False, mode, False, weights, True, None)[0]
        pooled.append(_divide_by_counts(bag, offs) if weighted_mean else bag)
    # One cat into out (casting to its dtype, honouring its row stride) beats T slice copies.
    torch.cat(pooled, dim=1, out=out)


def _quantized_bag(table: QuantizedTable, ids, offs, weights, mean) -> torch.Tensor:
    """fp32 [N, D] pooled bags of an int8 row-wise table."""
    if weights is not None:
        weights = weights.float()
    if _QUANTIZED_BAG is not None and not table.data.is_cuda:
        # FBGEMM's fused 8-bit CPU kernel; it only sums, so mean divides afterwards.
        pooled = _QUANTIZED_BAG(
            table.data.contiguous(), ids, offs, False, 0, False, weights, None, True
        )
    else:
        # Generic path: gather the fused rows, dequantize them, then pool with embedding_bag over
        # positions 0..nnz-1 (a segment sum).
        d = table.embedding_dim
        rows = table.data.index_select(0, ids.long())
        qp = rows[:, d:].clone(memory_format=torch.contiguous_format).view(torch.float32)
        values = rows[:, :d].float() * qp[:, :1] + qp[:, 1:]
        positions = torch.arange(ids.numel(), device=ids.device, dtype=offs.dtype)
        pooled = torch.embedding_bag(values, positions, offs, False, 0, False, weights, True, None)[0]
    return _divide_by_counts(pooled, offs) if mean else pooled


def _divide_by_counts(pooled: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Mean from sum: each bag divided by its number of ids (an empty bag stays zero)."""
    counts = (offs[1:] - offs[:-1]).clamp_(min=1).to(torch.float32)
    return (pooled.float() / counts[:, None]).to(pooled.dtype)


# --------------------------------------------------------------------------------------------------
# Triton path: one launch per group of tables with the same weight kind and block width.

@dataclass(frozen=True)
class _Group:
    """Tables that one kernel launch covers: same weight kind and block width.

    Holds no tensor of the tables (the cache must not keep tables alive): `first` indexes the table
    whose data pointer is the launch's base; `meta` rows (int64 [G, 6], META_* columns of
    kernels/embedding_bag.py) address every member relative to it.
    """

    first: int
    meta: torch.Tensor
    max_dim: int
    quantized: bool
    qparams_aligned: bool  # every scale/bias is 4-byte aligned: load them as fp32 directly
    row_align: int  # power of two (elements) dividing every member's offset and row stride
    dim_align: int  # power of two dividing every member's D
    cols: tuple[int, ...]  # members' first output columns


_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _pow2_divisor(values: Sequence[int], cap: int) -> int:
    """Largest power of two <= cap dividing every value."""
    g = reduce(math.gcd, values, 0)
    p = 1
    while p * 2 <= cap and g % (p * 2) == 0:
        p *= 2
    return p


def _data(table: Table) -> torch.Tensor:
    return table.data if isinstance(table, QuantizedTable) else table


def _triton_groups(tables, dims, cols, device) -> list[_Group]:
    """The launches for these tables, cached by their addresses and shapes.

    In inference the same tables serve every batch; rebuilding the metadata would cost a
    host-to-device copy per call. A table freed and another allocated at the same address with the
    same shape gets the same (still correct) plan.
    """
    from blsgpu.kernels import embedding_bag as kern

    datas = [_data(t) for t in tables]
    key = (device, tuple((str(d.dtype), d.data_ptr(), *d.shape, d.stride(0)) for d in datas))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    buckets: dict = {}
    for t, data in enumerate(datas):
        block_d = min(1 << max(dims[t] - 1, 0).bit_length(), kern.MAX_BLOCK_D)
        buckets.setdefault((data.dtype, block_d), []).append(t)
    plan = []
    for (dtype, _), members in buckets.items():
        base = datas[members[0]]
        elsize = base.element_size()
        cap = max(16 // elsize, 1)  # 16-byte vectors
        rows_meta = [
            [(datas[t].data_ptr() - base.data_ptr()) // elsize, datas[t].shape[0], dims[t],
             datas[t].stride(0), cols[t], t]
            for t in members
        ]  # fmt: skip
        quantized = dtype == torch.uint8
        plan.append(
            _Group(
                first=members[0],
                meta=torch.tensor(rows_meta, dtype=torch.int64).to(device),
                max_dim=max(dims[t] for t in members),
                quantized=quantized,
                qparams_aligned=quantized
                and all((base.data_ptr() + m[0] + m[2]) % 4 == 0 and m[3] % 4 == 0 for m in rows_meta),
                row_align=_pow2_divisor([m[0] for m in rows_meta] + [m[3] for m in rows_meta], cap),
                dim_align=_pow2_divisor([dims[t] for t in members], cap),
                cols=tuple(cols[t] for t in members),
            )
        )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _triton_lookup(tables, dims, cols, indices, offsets, psw, out, mean) -> None:
    from blsgpu.kernels.embedding_bag import launch_pooled_gather

    n = out.shape[0]
    avg_pooling = indices.numel() / max(len(tables) * n, 1)
    out_cap = max(16 // out.element_size(), 1)
    for group in _triton_groups(tables, dims, cols, out.device):
        launch_pooled_gather(
            _data(tables[group.first]),
            group.meta,
            indices,
            offsets,
            psw,
            out,
            max_dim=group.max_dim,
            avg_pooling=avg_pooling,
            mean=mean,
            quantized=group.quantized,
            qparams_aligned=group.qparams_aligned,
            row_align=group.row_align,
            dim_align=group.dim_align,
            out_align=_pow2_divisor([out.stride(0), *group.cols], out_cap),
        )
