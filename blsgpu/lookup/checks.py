"""What pooled_lookup checks before it writes anything: shapes, dtypes and devices first (no device
work), then the data (offsets, ids), with one host sync on a GPU.
"""

from __future__ import annotations

from functools import reduce
from itertools import pairwise

import numpy as np
import torch

from blsgpu.lookup.table import FLOAT_DTYPES, QuantizedTable

INDEX_DTYPES = (torch.int32, torch.int64)


def check_tables(tables, out, out_dtype) -> tuple[list[int], torch.dtype]:
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
            if dtype not in FLOAT_DTYPES:
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
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be fp32, fp16 or bf16, got {out_dtype}")
    return dims, out_dtype


def check_index_args(num_tables, indices, offsets, psw, pooling, out, device) -> int:
    """Checks what needs no data; returns N."""
    for name, x in (("indices", indices), ("offsets", offsets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be 1-D int32 or int64, got {x.dtype} {list(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the tables on {device}")
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if psw is not None:
        if not isinstance(psw, torch.Tensor) or psw.dim() != 1 or not psw.is_floating_point():
            raise ValueError("per_sample_weights must be a 1-D float tensor")
        if psw.numel() != indices.numel():
            raise ValueError(f"per_sample_weights has {psw.numel()} weights for {indices.numel()} indices")
        if psw.device != device:
            raise ValueError(f"per_sample_weights is on {psw.device}, the tables on {device}")
    num_offsets = offsets.numel()
    if isinstance(out, torch.Tensor) and out.dim() >= 1:
        n = out.shape[0]
    elif num_offsets >= 1 and (num_offsets - 1) % num_tables == 0:
        n = (num_offsets - 1) // num_tables
    else:
        raise ValueError(f"offsets must have T*N + 1 entries for T={num_tables} tables; got {num_offsets}")
    if num_offsets != num_tables * n + 1:
        raise ValueError(
            f"offsets must have T*N + 1 = {num_tables * n + 1} entries (T={num_tables}, N={n} from "
            f"out), got {num_offsets}"
        )
    return n


def check_out(out, n, width, out_dtype, device) -> None:
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


def resolve_backend(backend, device) -> str:
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


def check_offsets(indices, offsets, num_tables, n) -> list[int]:
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
        raise ValueError(f"offsets must end at len(indices) = {indices.numel()}, got offsets[-1] = {last}")
    return bounds if n > 0 else [0] * (num_tables + 1)


def check_ids(tables, indices, bounds) -> None:
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
