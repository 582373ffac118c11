"""Triton kernel of the fused pooled lookup: gather rows, pool a bag, write its slice of [N, sum(D_t)].

One launch covers a group of tables that share a weight kind (fp32, fp16, bf16 or int8 row-wise) and
a block width. Tables are addressed relative to the group's first table, so the kernel keeps the
alignment Triton proves for a real pointer argument (vector loads) while the tables stay separate
tensors. Host-side planning (grouping, caching the metadata) lives in blsgpu/lookup/triton_path.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the per-table metadata rows (int64 [G, META_COLS]) that the launcher receives.
META_TABLE_OFFSET = 0  # table start, in elements, relative to the group's base pointer
META_ROWS = 1  # rows_t: ids outside [0, rows_t) are never read
META_DIM = 2  # D_t
META_ROW_STRIDE = 3  # elements between rows (bytes for int8 row-wise tables)
META_COL = 4  # first output column of the table
META_TABLE = 5  # t: the table's position in the full list, which selects its bags in offsets
META_COLS = 6

# Fused 8-bit row-wise rows end with an fp32 scale and an fp32 bias (FBGEMM's layout).
QPARAM_BYTES = 8

MAX_BLOCK_D = 256  # wider tables take several programs along grid axis 2
MAX_TILE = 4096  # BLOCK_L * BLOCK_D: fp32 accumulator elements a program keeps live


@triton.jit
def _load_f32_bytes(ptr, mask):
    """fp32 from 4 bytes at any alignment (little-endian), 0.0 where mask is off."""
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(ptr + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(ptr + 3, mask=mask, other=0).to(tl.uint32)
    bits = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
    return bits.to(tl.float32, bitcast=True)


# N and num_indices change with every batch: specialising on them (== 1, % 16) would recompile
# the kernel mid-run whenever a batch happens to hit a new case.
@triton.jit(do_not_specialize=["N", "num_indices"])
def pooled_gather_kernel(
    weights_ptr,
    meta_ptr,
    indices_ptr,
    offsets_ptr,
    psw_ptr,
    out_ptr,
    N,
    num_indices,
    out_row_stride,
    MEAN: tl.constexpr,
    HAS_PSW: tl.constexpr,
    QUANTIZED: tl.constexpr,
    QPARAMS_ALIGNED: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    DIM_ALIGN: tl.constexpr,
    OUT_ALIGN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program pools bag b of the group's table g over columns [d0, d0 + BLOCK_D)."""
    b = tl.program_id(0).to(tl.int64)
    meta = meta_ptr + tl.program_id(1).to(tl.int64) * 6  # META_COLS
    d0 = tl.program_id(2) * BLOCK_D

    table_offset = tl.load(meta + 0)
    rows = tl.load(meta + 1)
    dim = tl.load(meta + 2)
    row_stride = tl.load(meta + 3)
    col = tl.load(meta + 4)
    t = tl.load(meta + 5)
    if ROW_ALIGN > 1:
        table_offset = tl.multiple_of(table_offset, ROW_ALIGN)
        row_stride = tl.multiple_of(row_stride, ROW_ALIGN)
    if DIM_ALIGN > 1:
        # The column mask d < dim only allows vector loads if dim's divisibility is known.
        dim = tl.multiple_of(dim, DIM_ALIGN)

    bag = t * N + b  # int64: table-major bags
    # Clamped to the ids so that offsets the host did not validate can neither read outside the
    # ids nor run the loop away.
    start = tl.maximum(tl.load(offsets_ptr + bag).to(tl.int64), 0)
    end = tl.minimum(tl.load(offsets_ptr + bag + 1).to(tl.int64), num_indices)

    d = d0 + tl.arange(0, BLOCK_D)
    dmask = d < dim
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        li = l0 + tl.arange(0, BLOCK_L)
        lmask = li < end
        ids = tl.load(indices_ptr + li, mask=lmask, other=0).to(tl.int64)
        # An id outside the table (possible only when the host skipped validation) pools as zeros.
        valid = lmask & (ids >= 0) & (ids < rows)
        row = table_offset + ids * row_stride  # int64 before the stride multiplies
        if ROW_ALIGN > 1:
            row = tl.multiple_of(row, ROW_ALIGN)
        x = tl.load(
            weights_ptr + row[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0
        ).to(tl.float32)
        if QUANTIZED:
            qparams = weights_ptr + row + dim
            if QPARAMS_ALIGNED:
                qf = qparams.to(tl.pointer_type(tl.float32), bitcast=True)
                scale = tl.load(qf, mask=valid, other=0.0)
                bias = tl.load(qf + 1, mask=valid, other=0.0)
            else:
                scale = _load_f32_bytes(qparams, valid)
                bias = _load_f32_bytes(qparams + 4, valid)
            x = x * scale[:, None] + bias[:, None]
        if HAS_PSW:
            w = tl.load(psw_ptr + li, mask=lmask, other=0.0).to(tl.float32)
            x = x * w[:, None]
        acc += x

    pooled = tl.sum(acc, axis=0)
    if MEAN:
        pooled = pooled / tl.maximum(end - start, 1).to(tl.float32)
    out_row = b * out_row_stride + col
    if OUT_ALIGN > 1:
        out_row = tl.multiple_of(out_row, OUT_ALIGN)
    tl.store(out_ptr + out_row + d, pooled.to(out_ptr.dtype.element_ty), mask=dmask)


def interpreting() -> bool:
    """True when this module was imported under TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    return not isinstance(pooled_gather_kernel, triton.runtime.JITFunction)


def block_sizes(max_dim: int, avg_pooling: float) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps) for a group: one row per lane group, L rows in flight."""
    block_d = min(triton.next_power_of_2(max(max_dim, 1)), MAX_BLOCK_D)
    block_l = min(triton.next_power_of_2(max(int(avg_pooling + 0.999), 4)), 32)
    block_l = max(1, min(block_l, MAX_TILE // block_d))
    num_warps = max(1, min(8, block_l * block_d // 512))
    return block_l, block_d, num_warps


def launch_pooled_gather(
    weights: torch.Tensor,
    meta: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    out: torch.Tensor,
    *,
    max_dim: int,
    avg_pooling: float,
    mean: bool,
    quantized: bool,
    qparams_aligned: bool,
    row_align: int,
    dim_align: int,
    out_align: int,
) -> None:
    """Launch one group: `meta` rows describe its tables (META_* columns), `weights` is its base.

    The *_align arguments are powers of two (in elements) that the host proved divide every table
    offset and row stride, every D, and the output row stride and column offsets; they let Triton
    emit vector loads and stores. Passing 1 is always correct.
    """
    n = out.shape[0]
    groups = meta.shape[0]
    if n == 0 or groups == 0:
        return
    block_l, block_d, num_warps = block_sizes(max_dim, avg_pooling)
    grid = (n, groups, triton.cdiv(max_dim, block_d))
    pooled_gather_kernel[grid](
        weights,
        meta,
        indices,
        offsets,
        per_sample_weights if per_sample_weights is not None else indices,  # unread when absent
        out,
        n,
        indices.numel(),
        out.stride(0),
        MEAN=mean,
        HAS_PSW=per_sample_weights is not None,
        QUANTIZED=quantized,
        QPARAMS_ALIGNED=qparams_aligned,
        ROW_ALIGN=row_align,
        DIM_ALIGN=dim_align,
        OUT_ALIGN=out_align,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
