"""The input dist's message parts: row-wise features' ids bucketed by owning rank, and per-sample
weights carried bit for bit as the message's integers."""

from __future__ import annotations

import torch

from blsgpu.transport.sizes import offsets


def bucket_row_wise(plan, key_index, values, lengths, weights, opk, n: int, id_dtype: torch.dtype) -> dict:
    """{slot: (per-owner bag counts [W, n], local ids ordered by owner, their weights or None,
    where each owner's ids start)} for every row-wise slot some rank holds."""
    slots = plan.slots
    # Row-wise features: ids bucketed by owner (stable, so bag order survives), shifted to
    # local rows; per owner the per-bag counts and the id range. Counted with index_add_
    # (bincount reads its input's range on the host) and every slot's id count per owner read
    # on the host in one go.
    buckets: dict[int, tuple] = {}
    row_wise = sorted({ls.slot for local in plan.local for ls in local if slots[ls.slot].kind == "row_wise"})
    if row_wise:
        found = []
        for j in row_wise:
            s, ki = slots[j], key_index[j]
            ids = values[opk[ki] : opk[ki + 1]]
            owner = torch.div(ids, s.block, rounding_mode="floor")
            bag = torch.repeat_interleave(
                torch.arange(n, device=ids.device), lengths[ki * n : (ki + 1) * n], output_size=ids.numel()
            )
            counts = torch.zeros(plan.world_size * n, dtype=torch.int64, device=ids.device)
            counts.index_add_(0, owner.long() * n + bag, torch.ones_like(bag))
            found.append((j, ki, s, ids, owner, counts.view(plan.world_size, n)))
        per_owner = torch.stack([c.sum(1) for *_, c in found]).tolist()
        for (j, ki, s, ids, owner, counts), sums in zip(found, per_owner, strict=True):
            starts = offsets(sums)
            perm = torch.argsort(owner, stable=True)
            local_ids = ids[perm] - owner[perm] * s.block
            w = None if weights is None else weights[opk[ki] : opk[ki + 1]][perm]
            buckets[j] = (counts.to(id_dtype), local_ids, w, starts)
    return buckets


def weights_as_ids(weights: torch.Tensor, id_dtype: torch.dtype) -> torch.Tensor:
    """fp32 weights as the message's integers, bit for bit (via fp64 in an int64 message)."""
    weights = weights.to(torch.float32)
    if id_dtype == torch.int32:
        return weights.view(torch.int32)
    return weights.to(torch.float64).view(torch.int64)


def ids_as_weights(bits: torch.Tensor) -> torch.Tensor:
    if bits.dtype == torch.int32:
        return bits.view(torch.float32)
    return bits.view(torch.float64).to(torch.float32)
