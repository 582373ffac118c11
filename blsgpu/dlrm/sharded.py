"""The DLRM sharded over a process group (``DLRM``) and its unsharded reference.

Bottom MLP, a table-wise ShardedEmbeddingBagCollection, dot interaction, top MLP; every weight is a
function of the seed alone, so every bound (and the unsharded reference) computes the same model.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from blsgpu.dlrm.data import Batch
from blsgpu.dlrm.model import DLRMArch, DLRMDense

__all__ = ["DLRM", "make_tables", "reference_predictions"]


def make_tables(arch: DLRMArch, pooling: str = "sum") -> list:
    """The T embedding tables of an arch: table ``t{i}`` of D columns looks up feature ``cat_{i}``."""
    from blsgpu.embedding import EmbeddingBagConfig  # the embedding layer loads lazily

    D = arch.sparse_feature_size
    return [
        EmbeddingBagConfig(f"t{i}", n, D, [f"cat_{i}"], pooling) for i, n in enumerate(arch.embedding_sizes)
    ]


def _kjt(batch: Batch, device: torch.device):
    from blsgpu.embedding import KeyedJaggedTensor

    if device.type == "cpu":
        return KeyedJaggedTensor(list(batch.keys), batch.values, batch.weights, lengths=batch.lengths)

    # Pinned and still on the host: the sharded collection checks it there and copies it to the
    # GPU without blocking.
    def pin(t):
        return None if t is None else t.pin_memory()

    return KeyedJaggedTensor(
        list(batch.keys), pin(batch.values), pin(batch.weights), lengths=pin(batch.lengths)
    )


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    from blsgpu.embedding._jagged import to_device  # the embedding layer loads lazily

    return to_device(t, device)


class DLRM(nn.Module):
    """DLRM inference sharded over a process group: (batch of N samples) -> click probabilities [N].

    Args:
        arch: sizes (``DLRMArch.parse`` of the reference's flags).
        bound: B of both exchanges of the sharded embeddings.
        seed: the dense weights and every table are functions of it alone, whatever the bound,
            the world size and the plan.
        group, device, plan: as ShardedEmbeddingBagCollection's. Construction is collective.
    """

    def __init__(
        self,
        arch: DLRMArch,
        bound: int = 4,
        seed: int = 0,
        group=None,
        device=None,
        plan="table_wise",
        timeout=None,
    ):
        super().__init__()
        from blsgpu.embedding import ShardedEmbeddingBagCollection

        self.arch = arch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dense = DLRMDense(arch, seed).to(self.device).requires_grad_(False)
        self.ebc = ShardedEmbeddingBagCollection(
            make_tables(arch), plan, group, bound, self.device, seed=seed, timeout=timeout
        )

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Blocking: both exchanges of this batch complete before it returns (lock step)."""
        pooled = self.ebc(_kjt(batch, self.device)).values()
        return self.dense(_to(batch.dense, self.device), pooled)

    def pipeline(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Yields (batch, predictions) in order, with up to B+1 batches in flight per exchange."""
        pending: collections.deque[Batch] = collections.deque()

        def kjts():
            for b in batches:
                pending.append(b)
                yield _kjt(b, self.device)

        for kt in self.ebc.pipeline(kjts()):
            b = pending.popleft()
            with torch.no_grad():
                yield b, self.dense(_to(b.dense, self.device), kt.values())

    def stats(self) -> dict[str, dict]:
        return self.ebc.stats()

    def close(self) -> None:
        self.ebc.close()


def reference_predictions(arch: DLRMArch, seed: int, batches: Iterable[Batch]) -> torch.Tensor:
    """Predictions [K, N] of the unsharded model (EmbeddingBagCollection + DLRMDense), on one rank."""
    from blsgpu.embedding import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(make_tables(arch), seed=seed)
    dense = DLRMDense(arch, seed).requires_grad_(False)
    with torch.no_grad():
        return torch.stack([dense(b.dense, ebc(_kjt(b, torch.device("cpu"))).values()) for b in batches])
