"""One rank's rows of one table: how they are stored, and how a saved table loads into them."""

from __future__ import annotations

import torch
from torch import nn

from blsgpu.lookup import QuantizedTable


class LocalShard(nn.Module):
    """Rows [row_start, row_end) of one table; `weight` is named as in the unsharded module.

    int8 shards keep FBGEMM's fused 8-bit row-wise layout (uint8 [rows, D + 8]) in `weight`.
    """

    def __init__(self, weight: torch.Tensor, row_start: int, row_end: int, quantized: bool):
        super().__init__()
        self.row_start = row_start
        self.row_end = row_end
        self.quantized = quantized
        if quantized:
            self.register_buffer("weight", QuantizedTable.from_float(weight).data)
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)

    def table(self):
        """What the lookup reads: the float tensor or a QuantizedTable over the same bytes."""
        return QuantizedTable(self.weight) if self.quantized else self.weight

    @torch.no_grad()
    def load(self, src: torch.Tensor) -> None:
        """Copy this shard's rows from `src` (float rows are quantized for an int8 shard)."""
        if self.quantized and src.dtype != torch.uint8:
            src = QuantizedTable.from_float(src.to(self.weight.device)).data
        self.weight.copy_(src)

    def load_saved(self, key: str, src: torch.Tensor, config) -> None:
        """Load a saved `src` under state-dict `key`: the whole table of `config` (this shard's
        rows are sliced from it) or this shard alone."""
        rows, d = tuple(src.shape), config.embedding_dim
        if self.quantized and src.dtype == torch.uint8:
            d += 8  # fused 8-bit rows: D codes, fp32 scale, fp32 bias
        if rows == (config.num_embeddings, d):
            src = src[self.row_start : self.row_end]
        elif rows != (self.row_end - self.row_start, d):
            raise ValueError(
                f"{key}: shape {rows} is neither the table's "
                f"{(config.num_embeddings, d)} nor this rank's shard "
                f"{(self.row_end - self.row_start, d)}"
            )
        self.load(src)
