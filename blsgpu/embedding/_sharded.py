"""Sharded EmbeddingBagCollection: TorchRec's sharded forward with both alltoallvs on BLS channels.

One batch (a KJT of N local samples on every rank) goes through:
  input dist   one integer message per destination r: [N, id count of each of r's slots, their
               lengths (N each), their ids, their weights when the collection is weighted] (the
               head of N and counts is all the receiver reads on the host, in one read for all
               sources; row-wise: only the ids in r's row
               block, shifted to local rows). int32 when every table has fewer than 2^31 rows (half
               the bytes of TorchRec's int64 ids), else int64; fp32 weights travel bit for bit
               inside it (as int32, or as fp64 in an int64 message).
  lookup       rank r pools, for every sample of every rank, the slots it holds, straight into the
               send buffer of the output channel: rows grouped by the sample's rank, in comm_dtype.
  output dist  rank r sends [N_p, D_r] to every rank p; rank p copies each block into its columns
               of [N, sum(D)] (row-wise partial sums are added in rank order, then mean divides by
               the bag length).
forward(kjt) runs one batch through; pipeline(batches) keeps up to B+1 batches in flight on both
channels, which is what lets a fast rank run up to B+1 batches ahead of a slow one.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from blsgpu._trace import span
from blsgpu.embedding._collection import check_features, init_weight
from blsgpu.embedding._config import as_configs
from blsgpu.embedding._input_dist import bucket_row_wise, ids_as_weights, weights_as_ids
from blsgpu.embedding._jagged import KeyedJaggedTensor, KeyedTensor, as_kjt, offsets_of, to_device
from blsgpu.embedding._plan import make_plan
from blsgpu.embedding._shard import LocalShard
from blsgpu.exchange.channel import BoundedLagAllToAll
from blsgpu.lookup import pooled_lookup
from blsgpu.transport.sizes import offsets

_COMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(eq=False)
class _Batch:
    """One batch on its way through the two exchanges."""

    kjt: KeyedJaggedTensor
    key_index: list[int]
    ids_send: torch.Tensor
    ids_splits: list[int]
    h_ids: Any = None
    h_out: Any = None


class ShardedEmbeddingBagCollection(nn.Module):
    """EmbeddingBagCollection sharded over a process group, exchanging on BLS channels.

    Args:
        tables: EmbeddingBagConfigs (ours or TorchRec's), the same on every rank.
        plan: "table_wise", "row_wise", a dict table name -> entry, or a ShardingPlan
            (see blsgpu.embedding._plan).
        group: the process group (None: default). Construction is collective: it creates the
            channels, so every rank builds its sharded collections in the same order.
        bound: B, how many batches a rank may run ahead of its slowest peer.
        device: where the shards live and outputs are returned (default CPU).
        comm_dtype: dtype of pooled embeddings on the wire (float32 default, float16, bfloat16).
        is_weighted: use the KJT's per-id weights (as TorchRec's is_weighted).
        dtype: table dtype: float32, float16, bfloat16, or int8 for row-wise quantized tables
            (blsgpu.QuantizedTable: D + 8 bytes a row instead of 4 D).
        seed: with a seed, each table holds exactly the rows EmbeddingBagCollection(tables,
            seed=seed) would (each rank draws the whole table once to slice its rows).
    """

    def __init__(
        self,
        tables,
        plan="table_wise",
        group=None,
        bound: int = 4,
        device=None,
        comm_dtype: torch.dtype | None = None,
        *,
        is_weighted: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        timeout=None,
        _init: bool = True,
    ):
        super().__init__()
        configs = as_configs(tables)
        if comm_dtype is None:
            comm_dtype = torch.float32
        if comm_dtype not in _COMM_DTYPES:
            raise ValueError(f"comm_dtype must be one of {_COMM_DTYPES}, got {comm_dtype}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
            raise ValueError(f"dtype must be float32, float16, bfloat16 or int8, got {dtype}")
        quantized = dtype == torch.int8
        if quantized:
            dtype = torch.float32  # drawn in float, then quantized row-wise
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call "
                "dist.init_process_group first (or use blsgpu.run_world)"
            )
        self._group = group
        self._rank = dist.get_rank(group)
        W = dist.get_world_size(group)
        self.plan = make_plan(configs, plan, W)
        self._tables = configs
        self._W = W
        self._bound = bound
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if self._device.type == "cuda" and self._device.index is None:
            # "cuda" != "cuda:0" for torch: without an index every batch would look misplaced.
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._comm_dtype = comm_dtype
        self._is_weighted = bool(is_weighted)

        self.embedding_bags = nn.ModuleDict()
        for i, t in enumerate(configs):
            for sh in self.plan.shards:
                if sh.table == t.name and sh.rank == self._rank:
                    if not _init:
                        w = torch.zeros(sh.rows, t.embedding_dim, dtype=dtype, device=self._device)
                    elif seed is not None:
                        w = init_weight(t, i, seed, dtype)[sh.row_start : sh.row_end]
                        w = w.to(self._device).clone()
                    else:
                        bound_ = (1.0 / t.num_embeddings) ** 0.5
                        w = torch.empty(sh.rows, t.embedding_dim).uniform_(-bound_, bound_)
                        w = w.to(device=self._device, dtype=dtype)
                    self.embedding_bags[t.name] = LocalShard(w, sh.row_start, sh.row_end, quantized)

        slots = self.plan.slots
        self._features = [s.feature for s in slots]
        self._rows: dict[str, int] = {}
        for t in configs:
            for f in t.feature_names:
                self._rows[f] = min(self._rows.get(f, t.num_embeddings), t.num_embeddings)
        self._local = self.plan.local[self._rank]
        self._local_dim = [self.plan.local_dim(r) for r in range(W)]
        # Lookup runs: (first slot, end slot, pooling) over this rank's local slots.
        self._runs: list[tuple[int, int, str]] = []
        for i, ls in enumerate(self._local):
            if self._runs and self._runs[-1][2] == ls.pooling:
                self._runs[-1] = (self._runs[-1][0], i + 1, ls.pooling)
            else:
                self._runs.append((i, i + 1, ls.pooling))
        # Output assembly: per source rank, runs of its columns that land side by side in the
        # output, (first local column, end, first output column, add). Row-wise partials add.
        self._moves: list[list[tuple[int, int, int, bool]]] = []
        for r in range(W):
            moves: list[list] = []
            for ls in self.plan.local[r]:
                s = slots[ls.slot]
                add = s.kind == "row_wise"
                last = moves[-1] if moves else None
                if last and last[1] == ls.col and last[2] + last[1] - last[0] == s.col and last[3] == add:
                    last[1] += s.dim
                else:
                    moves.append([ls.col, ls.col + s.dim, s.col, add])
            self._moves.append([tuple(m) for m in moves])
        self._any_row_wise = any(s.kind == "row_wise" for s in slots)
        self._mean_rw = [
            (j, s.col, s.dim) for j, s in enumerate(slots) if s.kind == "row_wise" and s.pooling == "mean"
        ]
        # Ids (and lengths, and N) fit int32 unless a table has 2^31 rows or more.
        self._id_dtype = (
            torch.int32
            if max((t.num_embeddings for t in configs), default=0) <= torch.iinfo(torch.int32).max
            else torch.int64
        )

        # Channels are collective: the same ones, in the same order, on every rank.
        kw = dict(group=group, bound=bound, device=self._device, timeout=timeout)
        self._ch_ids = BoundedLagAllToAll(name="ebc_ids", **kw)
        # The pooled rows' receive splits always follow from the batch (every exchange passes
        # them), so on the GPU path no header needs to travel before them.
        self._ch_out = BoundedLagAllToAll(name="ebc_pooled", known_splits=True, **kw)
        transport = self._ch_ids.transport
        staging = transport.staging(self._device)
        if staging is not None:
            warnings.warn(
                f"the sharded collection on {self._device} runs on {transport.name}: {staging}",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------- public API

    def embedding_bag_configs(self):
        return list(self._tables)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def table_nbytes(self) -> int:
        """Bytes of the table shards this rank holds."""
        return sum(s.weight.numel() * s.weight.element_size() for s in self.embedding_bags.values())

    def forward(self, features) -> KeyedTensor:
        """Pooled embeddings of this rank's batch: [N, sum(D)] float32, keys in table order."""
        return next(self.pipeline([features], bound=0))

    def pipeline(self, batches: Iterable, bound: int | None = None) -> Iterator[KeyedTensor]:
        """Yields one KeyedTensor per batch, in order, keeping up to B+1 batches in flight on each
        channel: after posting the ids of batch k it looks up batch k-B (posting its pooled rows)
        and then yields batch k-2B. Results equal forward's bit for bit. Every rank must feed the
        same number of batches; `bound` may lower B for this call.
        """
        B = self._bound if bound is None else min(bound, self._bound)
        in_q: deque[_Batch] = deque()
        out_q: deque[_Batch] = deque()
        for features in batches:
            b = self._prepare(features)  # raises on bad input before anything is sent
            self._post_input(b)
            in_q.append(b)
            if len(in_q) > B:
                b0 = in_q.popleft()
                self._lookup(b0)
                out_q.append(b0)
                if len(out_q) > B:
                    yield self._assemble(out_q.popleft())
        while in_q:
            b0 = in_q.popleft()
            self._lookup(b0)
            out_q.append(b0)
            if len(out_q) > B:
                yield self._assemble(out_q.popleft())
        while out_q:
            yield self._assemble(out_q.popleft())

    def stats(self) -> dict[str, dict]:
        """Engine counters of the channels: ids (with lengths and weights) and pooled."""
        return {"ids": self._ch_ids.stats(), "pooled": self._ch_out.stats()}

    def close(self) -> None:
        """Delivers what was posted and closes the channels (collective in effect)."""
        self._ch_ids.close()
        self._ch_out.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the unsharded collection's state (each rank slices its rows) or this rank's own
        shards. Tables this rank does not hold are skipped."""
        names = {f"embedding_bags.{t.name}.weight": t for t in self._tables}
        missing = [k for k, t in names.items() if t.name in self.embedding_bags and k not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for key, t in names.items():
                if t.name not in self.embedding_bags or key not in state_dict:
                    continue
                self.embedding_bags[t.name].load_saved(key, state_dict[key], t)
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------------------- one batch

    def _prepare(self, features) -> _Batch:
        """Checks the batch and writes its input-dist message into the ids channel's send buffer
        (nothing is sent: a bad batch raises here and the channels stay in step)."""
        kjt = as_kjt(features)
        key_index = check_features(kjt, self._features, self._rows, self._is_weighted)
        if kjt.device() != self._device:
            # From pinned host memory this copy does not block the host (DLRM's batches are).
            kjt = kjt.to(self._device, non_blocking=True)
        n = kjt.stride()
        # Once per batch in the message's dtype, so that one cat writes the message.
        lengths = kjt.lengths().to(self._id_dtype)
        values = kjt.values().to(self._id_dtype)
        weights = kjt.weights() if self._is_weighted else None
        if weights is not None:
            weights = weights_as_ids(weights, self._id_dtype)
        opk = kjt.offset_per_key()
        slots = self.plan.slots
        buckets = bucket_row_wise(self.plan, key_index, values, lengths, weights, opk, n, self._id_dtype)

        heads: list[int] = []  # per destination: N, then the id count of each of its slots
        parts: list[tuple[int, list[torch.Tensor]]] = []  # (head length, tensors) per destination
        ids_splits: list[int] = []
        for r in range(self._W):
            local = self.plan.local[r]
            if not local:
                ids_splits.append(0)
                continue
            len_p, id_p, w_p, cnt = [], [], [], []
            for ls in local:
                j, ki = ls.slot, key_index[ls.slot]
                if slots[j].kind == "row_wise":
                    counts, local_ids, w, starts = buckets[j]
                    len_p.append(counts[r])
                    id_p.append(local_ids[starts[r] : starts[r + 1]])
                    cnt.append(starts[r + 1] - starts[r])
                    if w is not None:
                        w_p.append(w[starts[r] : starts[r + 1]])
                else:
                    len_p.append(lengths[ki * n : (ki + 1) * n])
                    id_p.append(values[opk[ki] : opk[ki + 1]])
                    cnt.append(opk[ki + 1] - opk[ki])
                    if weights is not None:
                        w_p.append(weights[opk[ki] : opk[ki + 1]])
            heads += [n, *cnt]
            parts.append((1 + len(local), [*len_p, *id_p, *w_p]))
            ids_splits.append(1 + len(local) * (1 + n) + sum(cnt) * (2 if weights is not None else 1))
        send = self._ch_ids.send_buffer((sum(ids_splits),), self._id_dtype)
        if parts:
            head = to_device(torch.tensor(heads, dtype=self._id_dtype), values.device)
            pieces = []
            for (_, r_parts), (a, b) in zip(parts, pairwise(offsets(k for k, _ in parts)), strict=True):
                pieces += [head[a:b], *r_parts]
            if send.device == values.device:
                torch.cat(pieces, out=send)
            else:
                send.copy_(torch.cat(pieces))
        return _Batch(kjt, key_index, send, ids_splits)

    def _post_input(self, b: _Batch) -> None:
        b.h_ids = self._ch_ids.exchange(b.ids_send, b.ids_splits)

    def _lookup(self, b: _Batch) -> None:
        """Waits for the batch's ids, pools them into the output send buffer, posts it."""
        # The host reads the head of these ids next: wait for them on the host (on a GPU that
        # counts the time as waiting for data, not as this rank's work).
        recv, rsplits = b.h_ids.wait(blocking=True)
        W, S, D = self._W, len(self._local), self._local_dim[self._rank]
        n_me = b.kjt.stride()
        if S == 0:
            ns = [0] * W
            send = self._ch_out.send_buffer((0,), self._comm_dtype)
        else:
            weighted = self._is_weighted
            starts = offsets(rsplits)
            # Every source's head [N, id count per slot], read on the host in one go.
            head = torch.cat([recv[st : st + 1 + S] for st in starts[:-1]]).view(W, 1 + S).tolist()
            ns = [h[0] for h in head]
            cnt = [[head[p][1 + s] for p in range(W)] for s in range(S)]  # [S][W]
            lens, id_lo = [], []
            for p in range(W):
                lo = starts[p] + 1 + S
                lens.append(recv[lo : lo + S * ns[p]].view(S, ns[p]))
                id_lo.append(lo + S * ns[p])
            lengths = torch.cat(lens, 1)  # [S, sum(ns)]: slot-major, then source rank, then sample
            # Reorder ids from (source, slot) to (slot, source) so that the bags of one slot are
            # contiguous.
            n_tot = sum(ns)
            # per source, per slot: first id in recv
            id_start = [[id_lo[p] + a for a in offsets(cnt[s][p] for s in range(S))] for p in range(W)]
            ids = torch.cat(
                [recv[id_start[p][s] : id_start[p][s] + cnt[s][p]] for s in range(S) for p in range(W)]
            )
            if ids.numel() > torch.iinfo(torch.int32).max:  # int32 offsets would overflow
                ids = ids.long()
            weights = None
            if weighted:  # each source's weights follow its ids
                n_ids = [sum(cnt[s][p] for s in range(S)) for p in range(W)]
                weights = ids_as_weights(
                    torch.cat(
                        [
                            recv[id_start[p][s] + n_ids[p] : id_start[p][s] + n_ids[p] + cnt[s][p]]
                            for s in range(S)
                            for p in range(W)
                        ]
                    )
                )
            slot_ids = offsets(sum(c) for c in cnt)
            bag_offsets = offsets_of(lengths.view(-1), ids.dtype)
            send = self._ch_out.send_buffer((n_tot * D,), self._comm_dtype)
            dev = self._device
            out = (
                send.view(n_tot, D)
                if send.device == dev
                else torch.empty(n_tot, D, dtype=self._comm_dtype, device=dev)
            )
            with span("lookup", self._ch_out.name, b.h_ids.iteration):
                self._pool(ids, bag_offsets, weights, slot_ids, n_tot, out)
            if out.data_ptr() != send.data_ptr():
                send.view(n_tot, D).copy_(out)
        recv_splits = [n_me * self._local_dim[r] for r in range(W)]
        b.h_out = self._ch_out.exchange(send, [x * D for x in ns], recv_splits)

    def _pool(self, ids, offsets, weights, slot_ids, n_tot, out) -> None:
        """The fused lookup of every local slot run, straight into `out` (the send buffer)."""
        for s0, s1, pooling in self._runs:
            tables = [
                self.embedding_bags[self.plan.slots[ls.slot].table].table() for ls in self._local[s0:s1]
            ]
            c0 = self._local[s0].col
            c1 = self._local[s1 - 1].col + self.plan.slots[self._local[s1 - 1].slot].dim
            i0, i1 = slot_ids[s0], slot_ids[s1]
            offs = offsets[s0 * n_tot : s1 * n_tot + 1]
            pooled_lookup(
                tables,
                ids[i0:i1],
                offs - i0 if i0 else offs,
                per_sample_weights=None if weights is None else weights[i0:i1],
                pooling=pooling,
                out=out[:, c0:c1],
                validate=False,
            )

    def _assemble(self, b: _Batch) -> KeyedTensor:
        recv, _ = b.h_out.wait()
        n = b.kjt.stride()
        slots = self.plan.slots
        # Every table-wise column is copied from exactly one rank; row-wise columns add up.
        new = torch.zeros if self._any_row_wise else torch.empty
        out = new(n, self.plan.total_dim, dtype=torch.float32, device=self._device)
        at = offsets(n * d for d in self._local_dim)
        # Rank order: row-wise partial sums add in the same order in forward and pipeline.
        for r in range(self._W):
            d = self._local_dim[r]
            if d:
                block = recv[at[r] : at[r + 1]].view(n, d)
                if block.device != out.device:
                    block = block.to(out.device)
                for l0, l1, c0, add in self._moves[r]:
                    dst = out[:, c0 : c0 + l1 - l0]
                    if add:
                        dst.add_(block[:, l0:l1])  # in fp32, as the comm dtype promotes
                    else:
                        dst.copy_(block[:, l0:l1])
        if self._mean_rw:
            lengths = b.kjt.lengths()
            for j, col, dim in self._mean_rw:
                ki = b.key_index[j]
                lj = lengths[ki * n : (ki + 1) * n].clamp(min=1).to(out.dtype).unsqueeze(1)
                out[:, col : col + dim] /= lj
        return KeyedTensor([s.name for s in slots], [s.dim for s in slots], out)


def shard(ebc, plan="table_wise", group=None, bound: int = 4, **kwargs) -> ShardedEmbeddingBagCollection:
    """Shards an unsharded EmbeddingBagCollection (blsgpu's or TorchRec's), weights included.

    Collective: every rank of the group calls it with the same collection. kwargs go to
    ShardedEmbeddingBagCollection (device, comm_dtype, timeout).
    """
    if not callable(getattr(ebc, "embedding_bag_configs", None)):
        raise TypeError(f"expected an EmbeddingBagCollection, got {type(ebc).__name__}")
    state = ebc.state_dict()
    configs = as_configs(ebc.embedding_bag_configs())
    first = state.get(f"embedding_bags.{configs[0].name}.weight")
    kwargs.setdefault("dtype", first.dtype if first is not None else torch.float32)
    if first is not None and first.device.type != "meta":
        kwargs.setdefault("device", first.device)  # a collection on a GPU shards onto it
    is_weighted = getattr(ebc, "is_weighted", None)
    kwargs.setdefault("is_weighted", bool(is_weighted()) if callable(is_weighted) else False)
    out = ShardedEmbeddingBagCollection(configs, plan, group, bound, _init=False, **kwargs)
    out.load_state_dict(state)
    return out
