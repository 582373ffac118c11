"""KeyedJaggedTensor refuses int64 lengths or offsets that only add up because they wrap past 2**63."""

from __future__ import annotations

import pytest
import torch

from blsgpu import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

BIG = 2**62


def test_lengths_whose_sum_wraps_are_refused():
    # 4 * 2**62 = 2**64 wraps to 0: the int64 sum is 5, the number of values.
    lengths = torch.tensor([BIG, BIG, BIG, BIG, 5], dtype=torch.int64)
    assert int(lengths.sum()) == 5
    with pytest.raises(ValueError, match="a length of 4611686018427387904 but there are only 5"):
        KeyedJaggedTensor(["f"], torch.arange(5), lengths=lengths)


def test_offsets_whose_differences_wrap_are_refused():
    # Every difference is >= 0 after wrapping, the first is 0 and the last is len(values).
    offsets = torch.tensor([0, 2**63 - 1, -(2**63) + 10, 5], dtype=torch.int64)
    assert bool(((offsets[1:] - offsets[:-1]) >= 0).all())
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 5\]"):
        KeyedJaggedTensor(["f"], torch.arange(5), offsets=offsets)


def test_the_collection_never_returns_zeros_for_wrapped_lengths():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["f"])], seed=0)
    lengths = torch.tensor([BIG, BIG, BIG, BIG - 2, 7], dtype=torch.int64)  # wraps to 5
    with pytest.raises(ValueError):
        ebc(KeyedJaggedTensor(["f"], torch.arange(5), lengths=lengths))


def test_ordinary_lengths_and_offsets_still_work():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(6), lengths=torch.tensor([1, 2, 0, 3]))
    assert kjt.offsets().tolist() == [0, 1, 3, 3, 6]
    kjt = KeyedJaggedTensor(["a"], torch.arange(3), offsets=torch.tensor([0, 0, 3], dtype=torch.int32))
    assert kjt.lengths().tolist() == [0, 3]
    with pytest.raises(ValueError, match="lengths sum to 4 but there are 3 values"):
        KeyedJaggedTensor(["a"], torch.arange(3), lengths=torch.tensor([1, 3]))
