"""EmbeddingBagConfig: one table's shape, features and pooling (TorchRec's config accepted too)."""

from __future__ import annotations

from dataclasses import dataclass, field

POOLINGS = ("sum", "mean")


def _pooling_name(pooling) -> str:
    # TorchRec's PoolingType is an Enum whose value is "SUM" / "MEAN" / "NONE".
    raw = getattr(pooling, "value", pooling)
    if not isinstance(raw, str) or raw.lower() not in POOLINGS:
        raise ValueError(
            f"pooling must be one of {POOLINGS} (or TorchRec's PoolingType.SUM/MEAN), got {pooling!r}"
        )
    return raw.lower()


@dataclass
class EmbeddingBagConfig:
    """One embedding table: num_embeddings rows of embedding_dim, pooled per feature.

    feature_names: the KJT keys looked up in this table; empty means [name], as in TorchRec.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)
    pooling: str = "sum"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        for attr in ("num_embeddings", "embedding_dim"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"table {self.name!r}: {attr} must be a positive int, got {value!r}")
        if isinstance(self.feature_names, str):
            raise ValueError(
                f"table {self.name!r}: feature_names must be a list of strings, "
                f"got the string {self.feature_names!r}"
            )
        names = list(self.feature_names or [self.name])
        for f in names:
            if not isinstance(f, str) or not f:
                raise ValueError(f"table {self.name!r}: feature names must be non-empty strings, got {f!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name!r}: duplicate feature names in {names}")
        self.feature_names = names
        self.pooling = _pooling_name(self.pooling)

    @classmethod
    def from_any(cls, config) -> EmbeddingBagConfig:
        """Converts a TorchRec EmbeddingBagConfig (or anything with the same attributes)."""
        if isinstance(config, cls):
            return config
        missing = [a for a in ("name", "num_embeddings", "embedding_dim") if not hasattr(config, a)]
        if missing:
            raise TypeError(
                f"expected an EmbeddingBagConfig, got {type(config).__name__} "
                f"(no attribute {', '.join(missing)})"
            )
        data_type = getattr(config, "data_type", None)
        dt = getattr(data_type, "value", data_type)
        if dt is not None and dt not in ("FP32", "FP16"):
            # Other TorchRec data types (int8 etc.) are a storage choice we do not mirror here.
            raise ValueError(f"table {config.name!r}: data_type {dt} is not supported (FP32 or FP16)")
        return cls(
            name=config.name,
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            feature_names=list(getattr(config, "feature_names", None) or []),
            pooling=getattr(config, "pooling", "sum"),
        )

    def to_torchrec(self):
        """This table as TorchRec's EmbeddingBagConfig (the inverse of from_any; needs torchrec)."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig as TorchRecConfig
        from torchrec.modules.embedding_configs import PoolingType

        return TorchRecConfig(
            name=self.name,
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            feature_names=list(self.feature_names),
            pooling=PoolingType.MEAN if self.pooling == "mean" else PoolingType.SUM,
        )


def embedding_names(tables: list[EmbeddingBagConfig]) -> list[list[str]]:
    """Output key per (table, feature), as TorchRec names them: a feature looked up in more than
    one table becomes "feature@table"."""
    seen: dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            seen[f] = seen.get(f, 0) + 1
    return [[f"{f}@{t.name}" if seen[f] > 1 else f for f in t.feature_names] for t in tables]


def as_configs(tables) -> list[EmbeddingBagConfig]:
    """Converts and checks a list of tables: at least one, unique names."""
    if isinstance(tables, (EmbeddingBagConfig, str)) or not hasattr(tables, "__iter__"):
        raise TypeError(f"tables must be a list of EmbeddingBagConfig, got {type(tables).__name__}")
    configs = [EmbeddingBagConfig.from_any(t) for t in tables]
    if not configs:
        raise ValueError("tables is empty")
    names = [t.name for t in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate table names: {dup}")
    return configs
