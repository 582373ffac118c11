"""The tables a pooled lookup reads: float tensors, or int8 row-wise `QuantizedTable`s in FBGEMM's
fused layout, and where each one's columns land in the packed output (`column_offsets`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blsgpu.transport.sizes import offsets

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QPARAM_BYTES = 8  # fp32 scale + fp32 bias at the end of each fused 8-bit row
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
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] <= QPARAM_BYTES:
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
        if weight.dtype not in FLOAT_DTYPES:
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
        return self.data.shape[1] - QPARAM_BYTES

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
        return (
            self.data[:, self.embedding_dim :]
            .clone(memory_format=torch.contiguous_format)
            .view(torch.float32)
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
    return offsets(t if isinstance(t, int) else int(t.shape[1]) for t in tables)


def table_device(table: Table) -> torch.device:
    """The device of the table's rows."""
    return table.data.device if isinstance(table, QuantizedTable) else table.device


def table_data(table: Table) -> torch.Tensor:
    """The tensor that holds the table's rows (the fused uint8 rows of a QuantizedTable)."""
    return table.data if isinstance(table, QuantizedTable) else table
