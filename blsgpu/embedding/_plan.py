"""Sharding plan: which rank holds which rows of which table, and where each pooled output goes.

Plans:
- "table_wise": every table whole on one rank, assigned greedily (largest rows*D first, to the least
  loaded rank, lowest rank on ties), so the same tables give the same plan on every rank.
- "row_wise": every table split into W contiguous row blocks of ceil(rows/W) rows; rank r holds
  block r (trailing ranks may hold nothing when rows < W). Each rank pools the ids that fall in its
  block; the partial sums travel back and are added (mean divides after adding).
- a dict table name -> "table_wise" (greedy), {"table_wise": rank} (pinned) or "row_wise".

A rank that gets no table is allowed: it still sends its ids and receives its pooled outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from blsgpu.embedding._config import EmbeddingBagConfig, as_configs, embedding_names

KINDS = ("table_wise", "row_wise")


@dataclass(frozen=True)
class TableShard:
    """Rows [row_start, row_end) of `table`, held by `rank`."""

    table: str
    rank: int
    row_start: int
    row_end: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class FeatureSlot:
    """One pooled output: feature `feature` looked up in table `table`, KT key `name`, columns
    [col, col + dim) of the output."""

    name: str
    feature: str
    table: str
    dim: int
    pooling: str
    kind: str
    col: int
    block: int  # rows per row block (row_wise); the table's rows (table_wise)


@dataclass(frozen=True)
class LocalSlot:
    """A slot that one rank pools: output slot `slot` from `shard`, at column `col` of the rows
    this rank sends back. `pooling` is what the lookup does: the table's pooling, or "sum" for
    row-wise partials (mean divides after the partials are added)."""

    slot: int
    shard: TableShard
    pooling: str
    col: int


@dataclass(frozen=True)
class ShardingPlan:
    """Shards and routing for W ranks; built by make_plan."""

    world_size: int
    tables: tuple[EmbeddingBagConfig, ...]
    kinds: dict[str, str]
    shards: tuple[TableShard, ...]
    slots: tuple[FeatureSlot, ...]
    local: tuple[tuple[LocalSlot, ...], ...]  # per rank, in send-column order

    def shards_of(self, rank: int) -> list[TableShard]:
        return [s for s in self.shards if s.rank == rank]

    def local_dim(self, rank: int) -> int:
        """Columns of the pooled rows rank `rank` sends back to each sample's owner."""
        return sum(self.slots[ls.slot].dim for ls in self.local[rank])

    def owners(self, slot: int) -> list[tuple[int, LocalSlot]]:
        """(rank, local slot) pairs that pool output slot `slot`."""
        return [(r, ls) for r, loc in enumerate(self.local) for ls in loc if ls.slot == slot]

    @property
    def total_dim(self) -> int:
        return sum(s.dim for s in self.slots)


def _entry(name: str, entry, world_size: int) -> tuple[str, int | None]:
    if isinstance(entry, str):
        if entry not in KINDS:
            raise ValueError(f"plan for table {name!r}: unknown kind {entry!r} (one of {KINDS})")
        return entry, None
    if isinstance(entry, dict) and len(entry) == 1:
        ((kind, rank),) = entry.items()
        if kind == "row_wise" and rank is None:
            return "row_wise", None
        if kind == "table_wise":
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ValueError(
                    f"plan for table {name!r}: rank {rank!r} is out of range for {world_size} ranks"
                )
            return "table_wise", rank
    raise ValueError(
        f"plan for table {name!r}: expected 'table_wise', 'row_wise' or {{'table_wise': rank}}, got {entry!r}"
    )


def make_plan(tables, plan="table_wise", world_size: int = 1) -> ShardingPlan:
    """Builds the plan for `tables` (ours or TorchRec's configs) on `world_size` ranks."""
    tables = as_configs(tables)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    W = world_size
    if isinstance(plan, ShardingPlan):
        if plan.world_size != W:
            raise ValueError(f"plan was made for {plan.world_size} ranks, the group has {W}")
        if list(plan.tables) != tables:
            raise ValueError("plan was made for other tables")
        return plan
    names = [t.name for t in tables]
    if isinstance(plan, str):
        if plan not in KINDS:
            raise ValueError(f"plan must be one of {KINDS} or a dict, got {plan!r}")
        entries = {n: (plan, None) for n in names}
    elif isinstance(plan, dict):
        unknown = sorted(set(plan) - set(names))
        if unknown:
            raise ValueError(f"plan names unknown tables {unknown} (tables: {names})")
        missing = [n for n in names if n not in plan]
        if missing:
            raise ValueError(f"plan has no entry for tables {missing}")
        entries = {n: _entry(n, plan[n], W) for n in names}
    else:
        raise TypeError(f"plan must be a string or a dict, got {type(plan).__name__}")

    by_name = {t.name: t for t in tables}
    load = [0] * W
    shards: dict[str, list[TableShard]] = {}
    for n in names:
        kind, rank = entries[n]
        t = by_name[n]
        if kind == "row_wise":
            block = -(-t.num_embeddings // W)
            shards[n] = []
            for r in range(W):
                lo, hi = min(r * block, t.num_embeddings), min((r + 1) * block, t.num_embeddings)
                if hi > lo:
                    shards[n].append(TableShard(n, r, lo, hi))
                    load[r] += (hi - lo) * t.embedding_dim
        elif rank is not None:
            shards[n] = [TableShard(n, rank, 0, t.num_embeddings)]
            load[rank] += t.num_embeddings * t.embedding_dim
    greedy = [n for n in names if entries[n] == ("table_wise", None)]
    # Largest first; sorted() is stable, so equal costs keep table order: deterministic.
    for n in sorted(greedy, key=lambda n: -by_name[n].num_embeddings * by_name[n].embedding_dim):
        t = by_name[n]
        r = min(range(W), key=lambda r: (load[r], r))
        shards[n] = [TableShard(n, r, 0, t.num_embeddings)]
        load[r] += t.num_embeddings * t.embedding_dim

    slots: list[FeatureSlot] = []
    col = 0
    for t, out_names in zip(tables, embedding_names(tables), strict=True):
        kind = entries[t.name][0]
        block = -(-t.num_embeddings // W) if kind == "row_wise" else t.num_embeddings
        for f, name in zip(t.feature_names, out_names, strict=True):
            slots.append(FeatureSlot(name, f, t.name, t.embedding_dim, t.pooling, kind, col, block))
            col += t.embedding_dim

    local: list[tuple[LocalSlot, ...]] = []
    for r in range(W):
        mine = []
        for j, s in enumerate(slots):
            for sh in shards[s.table]:
                if sh.rank == r:
                    mine.append((j, sh, "sum" if s.kind == "row_wise" else s.pooling))
        # Sum lookups before mean lookups: one pooled_lookup call per pooling over a contiguous
        # run of columns and bags.
        mine.sort(key=lambda m: (m[2] != "sum", m[0]))
        c, out = 0, []
        for j, sh, pooling in mine:
            out.append(LocalSlot(j, sh, pooling, c))
            c += slots[j].dim
        local.append(tuple(out))

    all_shards = tuple(sh for n in names for sh in shards[n])
    return ShardingPlan(
        W, tuple(tables), {n: entries[n][0] for n in names}, all_shards, tuple(slots), tuple(local)
    )
