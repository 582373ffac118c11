"""The dense half of a DLRM inference model, in the shape of facebookresearch/dlrm.

bottom MLP (dense features -> D), dot interaction of the bottom output with the T pooled
embeddings, top MLP (-> 1, sigmoid). The embeddings themselves live elsewhere (sharded).
Arch strings follow the reference's flags: ``--arch-mlp-bot 13-512-256-64`` lists every width
from the dense features to D; ``--arch-mlp-top 512-256-1`` lists the widths after the
interaction, whose width D + T * (T + 1) / 2 is prepended, as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLP", "DLRMArch", "DLRMDense", "interact_dot", "interaction_width", "parse_arch"]


def parse_arch(arch: str | Sequence[int], name: str = "arch") -> tuple[int, ...]:
    """Widths from "13-512-256-64" (or a sequence of ints); every width must be >= 1."""
    if isinstance(arch, str):
        parts = arch.strip().split("-")
        try:
            widths = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name} {arch!r} must be integers joined by '-', like 13-512-256-64") from None
    else:
        widths = tuple(int(w) for w in arch)
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{name} {arch!r} needs at least one width, each >= 1")
    return widths


def interaction_width(sparse_feature_size: int, num_tables: int) -> int:
    """Width of the dot interaction's output: D + T * (T + 1) / 2 (pairs of T + 1 vectors)."""
    return sparse_feature_size + num_tables * (num_tables + 1) // 2


@dataclass(frozen=True)
class DLRMArch:
    """Validated DLRM sizes from the reference's command-line strings.

    Attributes:
        bottom: widths of the bottom MLP, dense features first, D last.
        top: widths of the top MLP, interaction width first, 1 last.
        embedding_sizes: rows of each of the T tables.
    """

    bottom: tuple[int, ...]
    top: tuple[int, ...]
    embedding_sizes: tuple[int, ...]

    @property
    def sparse_feature_size(self) -> int:
        return self.bottom[-1]

    @property
    def num_tables(self) -> int:
        return len(self.embedding_sizes)

    @classmethod
    def parse(
        cls,
        mlp_bot: str | Sequence[int],
        mlp_top: str | Sequence[int],
        embedding_size: str | Sequence[int],
        sparse_feature_size: int | None = None,
        num_dense: int = 13,
    ) -> DLRMArch:
        """Check the flags agree; the top arch gets the interaction width prepended.

        Args:
            sparse_feature_size: D; when given, the bottom MLP must end in it.
        """
        bottom = parse_arch(mlp_bot, "--arch-mlp-bot")
        top_after = parse_arch(mlp_top, "--arch-mlp-top")
        sizes = parse_arch(embedding_size, "--arch-embedding-size")
        if bottom[0] != num_dense:
            raise ValueError(f"--arch-mlp-bot {_s(bottom)} must start with the {num_dense} dense features")
        if len(bottom) < 2:
            raise ValueError(f"--arch-mlp-bot {_s(bottom)} needs at least one layer")
        D = bottom[-1]
        if sparse_feature_size is not None and D != sparse_feature_size:
            raise ValueError(
                f"--arch-mlp-bot {_s(bottom)} ends in {D} but --arch-sparse-feature-size is "
                f"{sparse_feature_size}: the bottom MLP output is one more vector of the dot "
                f"interaction, so it must be D wide"
            )
        if top_after[-1] != 1:
            raise ValueError(f"--arch-mlp-top {_s(top_after)} must end in 1 (the click probability)")
        return cls(bottom, (interaction_width(D, len(sizes)), *top_after), sizes)


def _s(widths: Sequence[int]) -> str:
    return "-".join(map(str, widths))


class MLP(nn.Sequential):
    """Linear layers of the given widths, each followed by ReLU, or by sigmoid if last and asked.

    As in the reference, the bottom MLP's last layer has a ReLU too; the top's has the sigmoid.
    Init is the reference's: weights N(0, sqrt(2 / (fan_in + fan_out))), biases N(0, sqrt(1 /
    fan_out)), drawn from ``generator``.
    """

    def __init__(
        self, arch: str | Sequence[int], sigmoid_last: bool = False, generator: torch.Generator | None = None
    ):
        widths = parse_arch(arch)
        if len(widths) < 2:
            raise ValueError(f"an MLP needs at least two widths, got {_s(widths)}")
        layers: list[nn.Module] = []
        for i, (n, m) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            lin = nn.Linear(n, m)
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(2.0 / (n + m)), generator=generator)
                lin.bias.normal_(0.0, math.sqrt(1.0 / m), generator=generator)
            last = i == len(widths) - 2
            layers += [lin, nn.Sigmoid() if last and sigmoid_last else nn.ReLU()]
        super().__init__(*layers)
        self.widths = widths


def interact_dot(bottom_out: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Dot interaction: [x, strictly-lower-triangle pairwise dots of (x, e_1..e_T)], row-major.

    Args:
        bottom_out: x, [N, D].
        pooled: [N, T * D], the T pooled embeddings side by side.
    Returns:
        [N, D + T * (T + 1) / 2], in the order of the reference's ``interact_features``.
    """
    N, D = bottom_out.shape
    feats = torch.cat([bottom_out, pooled], dim=1).view(N, -1, D)
    z = torch.bmm(feats, feats.transpose(1, 2))
    F = feats.shape[1]
    li, lj = torch.tril_indices(F, F, offset=-1, device=z.device)
    return torch.cat([bottom_out, z[:, li, lj]], dim=1)


class DLRMDense(nn.Module):
    """Bottom MLP, dot interaction and top MLP: (dense, pooled embeddings) -> predictions [N].

    Args:
        arch: a DLRMArch (or use ``DLRMDense.from_flags``).
        seed: the weights are a function of it alone.
    """

    def __init__(self, arch: DLRMArch, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.arch = arch
        self.bot = MLP(arch.bottom, generator=g)
        self.top = MLP(arch.top, sigmoid_last=True, generator=g)

    @classmethod
    def from_flags(
        cls,
        mlp_bot: str | Sequence[int],
        mlp_top: str | Sequence[int],
        embedding_size: str | Sequence[int],
        sparse_feature_size: int | None = None,
        seed: int = 0,
    ) -> DLRMDense:
        return cls(DLRMArch.parse(mlp_bot, mlp_top, embedding_size, sparse_feature_size), seed)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Predictions [N] from dense [N, 13] and pooled [N, T * D] (or T tensors [N, D])."""
        if not isinstance(pooled, torch.Tensor):
            pooled = torch.cat(list(pooled), dim=1)
        N = dense.shape[0]
        want = (N, self.arch.num_tables * self.arch.sparse_feature_size)
        if dense.dim() != 2 or dense.shape[1] != self.arch.bottom[0] or tuple(pooled.shape) != want:
            raise ValueError(
                f"expected dense [N, {self.arch.bottom[0]}] and pooled {list(want)}, got "
                f"{list(dense.shape)} and {list(pooled.shape)}"
            )
        x = self.bot(dense)
        return self.top(interact_dot(x, pooled)).squeeze(1)
