"""Pooled embedding-bag lookup over T tables at once, packed into one [N, sum(D_t)] tensor.

Layout as TorchRec/FBGEMM: ``indices`` flat, ``offsets`` of length T*N+1, bags table-major (table 0's
N bags, then table 1's, ...). Table t fills columns [col_t, col_t + D_t) of each output row (see
`column_offsets`), so the result, or the caller's ``out`` view into an exchange send buffer, is ready to
send. Two backends, one semantics: a Triton kernel (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and torch ops (CPU or CUDA). Both accumulate in fp32; an empty bag pools to
zeros. The kernel rounds once, to the output dtype. The torch path (torch's embedding_bag) applies
per-sample weights in the table dtype and rounds an fp16/bf16 table's bags to that dtype before the
cast to the output dtype, so it can differ from the kernel by about one ulp of the table dtype.

This module holds the entry point; table.py the table types, checks.py the argument checks,
torch_path.py and triton_path.py the two backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch

from blsgpu.lookup.checks import (
    check_ids,
    check_index_args,
    check_offsets,
    check_out,
    check_tables,
    resolve_backend,
)
from blsgpu.lookup.table import Table, column_offsets, table_device
from blsgpu.lookup.torch_path import torch_lookup
from blsgpu.lookup.triton_path import triton_lookup

Pooling = Literal["sum", "mean"]
Backend = Literal["auto", "triton", "torch"]


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
    dims, out_dtype = check_tables(tables, out, out_dtype)
    device = table_device(tables[0])
    n = check_index_args(len(tables), indices, offsets, per_sample_weights, pooling, out, device)
    cols = column_offsets(dims)
    if out is None:
        out = torch.empty((n, cols[-1]), dtype=out_dtype, device=device)
    else:
        check_out(out, n, cols[-1], out_dtype, device)
    backend = resolve_backend(backend, device)
    indices, offsets = indices.contiguous(), offsets.contiguous()
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.contiguous()
    bounds = check_offsets(indices, offsets, len(tables), n) if validate else None
    # torch's CPU kernels check every id before they read its row (and torch_lookup writes out only
    # after all tables pooled), so there the id check runs only to name a failure.
    torch_checks_ids = backend == "torch" and indices.device.type == "cpu"
    if validate and not torch_checks_ids:
        check_ids(tables, indices, bounds)
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
                triton_lookup(tables, dims, cols, indices, offsets, per_sample_weights, out, mean)
        else:
            torch_lookup(tables, cols, indices, offsets, per_sample_weights, out, n, mean, bounds)
    except (RuntimeError, IndexError):
        if validate and backend == "torch":
            check_ids(tables, indices, bounds)  # raises the ValueError if an id was bad
        raise
    finally:
        if grad_enabled:
            torch.set_grad_enabled(True)
    return out
