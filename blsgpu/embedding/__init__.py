"""TorchRec-style embedding collections: KJT / KT, configs, plans, unsharded and sharded EBC."""

from blsgpu.embedding._collection import EmbeddingBagCollection
from blsgpu.embedding._config import EmbeddingBagConfig
from blsgpu.embedding._jagged import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from blsgpu.embedding._plan import ShardingPlan, TableShard, make_plan
from blsgpu.embedding._sharded import ShardedEmbeddingBagCollection, shard

__all__ = [
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "ShardedEmbeddingBagCollection",
    "ShardingPlan",
    "TableShard",
    "make_plan",
    "shard",
]
