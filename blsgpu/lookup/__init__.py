"""The pooled embedding-bag lookup: T tables at once into one packed [N, sum(D_t)] tensor."""

from blsgpu.lookup.pooled import Backend, Pooling, pooled_lookup
from blsgpu.lookup.table import QuantizedTable, Table, column_offsets

__all__ = ["Backend", "Pooling", "QuantizedTable", "Table", "column_offsets", "pooled_lookup"]
