"""KeyedJaggedTensor / KeyedTensor with TorchRec's constructors and accessors, validated eagerly.

Layout as TorchRec: a KJT with F keys and stride N holds F*N bags, key-major (key 0's N bags, then
key 1's, ...); values[offsets[i]:offsets[i+1]] are bag i's ids. A KeyedTensor concatenates per-key
dense blocks along key_dim (pooled embeddings: [N, sum(D)] with key_dim=1).

TorchRec's own objects are accepted wherever these are (see as_kjt / as_kt): we duck-type on the
accessor methods and never import torchrec unless asked to convert to it.
"""

from __future__ import annotations

import torch

from blsgpu.transport.sizes import offsets


def _check_keys(keys) -> list[str]:
    if isinstance(keys, str) or not hasattr(keys, "__iter__"):
        raise TypeError(f"keys must be a list of strings, got {type(keys).__name__}")
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"keys must be strings, got {k!r}")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys: {dup}")
    return keys


def _check_1d(name: str, t, *, integer: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    is_int = not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
    if integer and not is_int:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor goes to a GPU through pinned memory, without blocking the
    host (the pinned copy stays alive until the transfer is done: torch's host allocator sees to it)."""
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _lengths_from_offsets(offsets: torch.Tensor, n_values: int, what: str) -> torch.Tensor:
    if offsets.numel() == 0:
        raise ValueError(f"{what}: offsets must have at least one element (a leading 0)")
    # One read on the host (one sync on a GPU).
    first, last, low, high = (
        torch.stack([offsets[0], offsets[-1], offsets.min(), offsets.max()]).long().tolist()
    )
    if first != 0:
        raise ValueError(f"{what}: offsets must start at 0, got {first}")
    if last != n_values:
        raise ValueError(f"{what}: offsets end at {last} but there are {n_values} values")
    if low < 0 or high > n_values:
        # Also keeps the differences below from wrapping around (int64 offsets near 2**63).
        raise ValueError(
            f"{what}: offsets must lie in [0, {n_values}] (the number of values), "
            f"got values in [{low}, {high}]"
        )
    lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"{what}: offsets must be non-decreasing")
    return lengths


_INT64_MAX = 2**63 - 1


def _check_lengths(lengths: torch.Tensor, n_values: int, what: str) -> None:
    low, high, total = 0, 0, 0
    if lengths.numel():  # one read on the host (one sync on a GPU)
        low, high, total = torch.stack(
            [lengths.min().long(), lengths.max().long(), lengths.sum().long()]
        ).tolist()
    if low < 0:
        raise ValueError(f"{what}: lengths must be non-negative")
    # No bag can hold more than all the values; and int64 lengths whose sum wraps past 2**63
    # could otherwise add up to len(values) (their offsets then go negative).
    if high > n_values:
        raise ValueError(f"{what}: a length of {high} but there are only {n_values} values")
    if high * lengths.numel() > _INT64_MAX:  # the int64 sum may have wrapped: add exactly
        total = sum(lengths.tolist())
    if total != n_values:
        raise ValueError(f"{what}: lengths sum to {total} but there are {n_values} values")


def offsets_of(lengths: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[0, cumsum(lengths)] in `dtype` (default the lengths'; the lookup wants the ids')."""
    out = torch.zeros(lengths.numel() + 1, dtype=dtype or lengths.dtype, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def _check_weights(weights, n_values: int, what: str):
    if weights is None:
        return None
    _check_1d("weights", weights, integer=False)
    if weights.numel() != n_values:
        raise ValueError(
            f"{what}: weights has {weights.numel()} elements but there are "
            f"{n_values} values (one weight per id)"
        )
    return weights


class _JaggedAccessors:
    """values / lengths / offsets / weights accessors shared by JaggedTensor and KeyedJaggedTensor."""

    _values: torch.Tensor
    _lengths: torch.Tensor
    _offsets: torch.Tensor | None
    _weights: torch.Tensor | None

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = offsets_of(self._lengths)
        return self._offsets

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError(f"this {type(self).__name__} has no weights")
        return self._weights

    def weights_or_none(self) -> torch.Tensor | None:
        return self._weights

    def lengths_or_none(self) -> torch.Tensor | None:
        return self._lengths

    def offsets_or_none(self) -> torch.Tensor | None:
        return self._offsets


class JaggedTensor(_JaggedAccessors):
    """One key's bags: values, lengths (and offsets), optional per-id weights."""

    def __init__(self, values, weights=None, lengths=None, offsets=None):
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError(f"values must be a 1-D tensor, got {values!r:.80}")
        if lengths is None and offsets is None:
            raise ValueError("JaggedTensor needs lengths or offsets")
        if lengths is not None:
            _check_1d("lengths", lengths, integer=True)
            _check_lengths(lengths, values.numel(), "JaggedTensor")
        else:
            _check_1d("offsets", offsets, integer=True)
            lengths = _lengths_from_offsets(offsets, values.numel(), "JaggedTensor")
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = _check_weights(weights, values.numel(), "JaggedTensor")

    def to_dense(self) -> list[torch.Tensor]:
        """One tensor per bag."""
        return list(torch.split(self._values, self._lengths.tolist()))

    def __repr__(self) -> str:
        return f"JaggedTensor({[b.tolist() for b in self.to_dense()]})"


class KeyedJaggedTensor(_JaggedAccessors):
    """Jagged ids for F keys and N samples (TorchRec layout: bags key-major).

    Construction checks everything (a device sync on GPU): lengths non-negative and summing to
    len(values), offsets starting at 0, non-decreasing and ending at len(values), one weight per
    id, len(lengths) a multiple of len(keys).
    """

    def __init__(self, keys, values, weights=None, lengths=None, offsets=None, stride=None):
        keys = _check_keys(keys)
        _check_1d("values", values, integer=True)
        what = "KeyedJaggedTensor"
        if lengths is None and offsets is None:
            raise ValueError(f"{what} needs lengths or offsets")
        if lengths is not None:
            _check_1d("lengths", lengths, integer=True)
            _check_lengths(lengths, values.numel(), what)
            if offsets is not None:
                _check_1d("offsets", offsets, integer=True)
                if offsets.numel() != lengths.numel() + 1 or not torch.equal(
                    offsets.to(lengths.dtype), offsets_of(lengths)
                ):
                    raise ValueError(f"{what}: offsets are not the running sum of lengths")
        else:
            _check_1d("offsets", offsets, integer=True)
            lengths = _lengths_from_offsets(offsets, values.numel(), what)
        n_bags = lengths.numel()
        if keys:
            if n_bags % len(keys):
                raise ValueError(
                    f"{what}: {n_bags} lengths is not a multiple of {len(keys)} keys "
                    f"(expected len(keys) * batch size)"
                )
            n = n_bags // len(keys)
            if stride is not None and stride != n:
                raise ValueError(
                    f"{what}: stride={stride} but {n_bags} lengths over "
                    f"{len(keys)} keys means a batch size of {n}"
                )
        else:
            if n_bags:
                raise ValueError(f"{what}: no keys but {n_bags} lengths")
            n = int(stride or 0)
        self._keys = keys
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = _check_weights(weights, values.numel(), what)
        self._stride = n
        self._length_per_key = None

    @classmethod
    def from_lengths_sync(cls, keys, values, lengths, weights=None, stride=None):
        return cls(keys, values, weights=weights, lengths=lengths, stride=stride)

    @classmethod
    def from_offsets_sync(cls, keys, values, offsets, weights=None, stride=None):
        return cls(keys, values, weights=weights, offsets=offsets, stride=stride)

    @classmethod
    def from_jt_dict(cls, jt_dict) -> KeyedJaggedTensor:
        """Builds a KJT from {key: JaggedTensor}, all with the same number of bags."""
        keys = list(jt_dict)
        jts = [jt_dict[k] for k in keys]
        if not jts:
            raise ValueError("from_jt_dict needs at least one key")
        sizes = {jt.lengths().numel() for jt in jts}
        if len(sizes) != 1:
            raise ValueError(f"from_jt_dict: keys have different batch sizes {sorted(sizes)}")
        has_w = [jt.weights_or_none() is not None for jt in jts]
        if any(has_w) and not all(has_w):
            raise ValueError("from_jt_dict: either every key has weights or none has")
        weights = torch.cat([jt.weights() for jt in jts]) if all(has_w) else None
        return cls(
            keys,
            torch.cat([jt.values() for jt in jts]),
            weights=weights,
            lengths=torch.cat([jt.lengths() for jt in jts]),
        )

    def keys(self) -> list[str]:
        return self._keys

    def stride(self) -> int:
        """Batch size N: bags per key."""
        return self._stride

    def variable_stride_per_key(self) -> bool:
        return False

    def device(self) -> torch.device:
        return self._values.device

    def length_per_key(self) -> list[int]:
        """Number of ids per key."""
        if self._length_per_key is None:
            if not self._keys:
                self._length_per_key = []
            else:
                per_key = self._lengths.view(len(self._keys), self._stride).sum(1)
                self._length_per_key = [int(x) for x in per_key.tolist()]
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        return offsets(self.length_per_key())

    def index_per_key(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self._keys)}

    def __getitem__(self, key: str) -> JaggedTensor:
        try:
            i = self._keys.index(key)
        except ValueError:
            raise KeyError(f"{key!r} is not a key of this KeyedJaggedTensor (keys: {self._keys})") from None
        start, end = self.offset_per_key()[i], self.offset_per_key()[i + 1]
        n = self._stride
        w = None if self._weights is None else self._weights[start:end]
        return JaggedTensor(self._values[start:end], weights=w, lengths=self._lengths[i * n : (i + 1) * n])

    def to_dict(self) -> dict[str, JaggedTensor]:
        return {k: self[k] for k in self._keys}

    def to(self, device, non_blocking: bool = False) -> KeyedJaggedTensor:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        out = KeyedJaggedTensor.__new__(KeyedJaggedTensor)
        out.__dict__.update(self.__dict__)
        out._values, out._lengths = move(self._values), move(self._lengths)
        out._offsets, out._weights = move(self._offsets), move(self._weights)
        return out

    def to_torchrec(self):
        """The same data as a torchrec.KeyedJaggedTensor (imports torchrec)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchrecKJT

        return TorchrecKJT(
            keys=self._keys,
            values=self._values,
            weights=self._weights,
            lengths=self._lengths,
            stride=self._stride,
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {[b.tolist() for b in self[k].to_dense()]}" for k in self._keys)
        return f"KeyedJaggedTensor({{{body}}})"


class KeyedTensor:
    """Per-key dense blocks concatenated along key_dim (pooled embeddings: [N, sum(D)])."""

    def __init__(self, keys, length_per_key, values, key_dim: int = 1):
        keys = _check_keys(keys)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        length_per_key = [int(n) for n in length_per_key]
        if len(length_per_key) != len(keys):
            raise ValueError(f"KeyedTensor: {len(keys)} keys but {len(length_per_key)} lengths")
        if any(n < 0 for n in length_per_key):
            raise ValueError(f"KeyedTensor: negative length in {length_per_key}")
        if not 0 <= key_dim < max(values.dim(), 1):
            raise ValueError(f"KeyedTensor: key_dim={key_dim} but values has {values.dim()} dims")
        if values.shape[key_dim] != sum(length_per_key):
            raise ValueError(
                f"KeyedTensor: values has {values.shape[key_dim]} entries along dim "
                f"{key_dim} but length_per_key sums to {sum(length_per_key)}"
            )
        self._keys = keys
        self._length_per_key = length_per_key
        self._values = values
        self._key_dim = key_dim

    @classmethod
    def from_tensor_list(cls, keys, tensors, key_dim: int = 1) -> KeyedTensor:
        return cls(keys, [t.shape[key_dim] for t in tensors], torch.cat(tensors, key_dim), key_dim)

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def length_per_key(self) -> list[int]:
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        return offsets(self._length_per_key)

    def device(self) -> torch.device:
        return self._values.device

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            i = self._keys.index(key)
        except ValueError:
            raise KeyError(f"{key!r} is not a key of this KeyedTensor (keys: {self._keys})") from None
        return self._values.narrow(self._key_dim, self.offset_per_key()[i], self._length_per_key[i])

    def to_dict(self) -> dict[str, torch.Tensor]:
        parts = torch.split(self._values, self._length_per_key, dim=self._key_dim)
        return dict(zip(self._keys, parts, strict=True))

    def to(self, device, non_blocking: bool = False) -> KeyedTensor:
        return KeyedTensor(
            self._keys,
            self._length_per_key,
            self._values.to(device, non_blocking=non_blocking),
            self._key_dim,
        )

    def to_torchrec(self):
        """The same data as a torchrec.KeyedTensor (imports torchrec)."""
        from torchrec.sparse.jagged_tensor import KeyedTensor as TorchrecKT

        return TorchrecKT(
            keys=self._keys, length_per_key=self._length_per_key, values=self._values, key_dim=self._key_dim
        )

    def __repr__(self) -> str:
        return (
            f"KeyedTensor(keys={self._keys}, length_per_key={self._length_per_key}, "
            f"values={tuple(self._values.shape)})"
        )


def as_kjt(obj) -> KeyedJaggedTensor:
    """Our KeyedJaggedTensor for ours or TorchRec's (or any object with the same accessors)."""
    if isinstance(obj, KeyedJaggedTensor):
        return obj
    if not all(callable(getattr(obj, m, None)) for m in ("keys", "values", "lengths")):
        raise TypeError(f"expected a KeyedJaggedTensor, got {type(obj).__name__}")
    vbe = getattr(obj, "variable_stride_per_key", None)
    if callable(vbe) and vbe():
        raise ValueError(
            "KeyedJaggedTensor with a variable batch size per key (TorchRec VBE) is "
            "not supported: every key needs the same batch size"
        )
    get_w = getattr(obj, "weights_or_none", None)
    weights = get_w() if callable(get_w) else None
    stride = obj.stride() if callable(getattr(obj, "stride", None)) else None
    return KeyedJaggedTensor(
        list(obj.keys()), obj.values(), weights=weights, lengths=obj.lengths(), stride=stride
    )


def as_kt(obj) -> KeyedTensor:
    """Our KeyedTensor for ours or TorchRec's (or any object with the same accessors)."""
    if isinstance(obj, KeyedTensor):
        return obj
    if not all(callable(getattr(obj, m, None)) for m in ("keys", "values", "length_per_key")):
        raise TypeError(f"expected a KeyedTensor, got {type(obj).__name__}")
    kd = getattr(obj, "key_dim", None)
    return KeyedTensor(
        list(obj.keys()), list(obj.length_per_key()), obj.values(), kd() if callable(kd) else 1
    )
