"""Registers the torch.distributed backend "bls" when torch is imported, without importing blsgpu.

The package's entry point in group ``torch.backends`` names :func:`register`, which torch calls at
``import torch`` (unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``). So ``dist.init_process_group("bls")``
works in code that never imports blsgpu. Torch calls it half-way through its own import, so it only
registers a creator; the backend (and the engine behind it) is imported when a "bls" group is
created. Nothing here may fail: an exception would make ``import torch`` fail.
"""

from __future__ import annotations

from blsgpu._env import BACKEND_DEVICES, BACKEND_NAME


def _create(store, rank: int, world_size: int, timeout):
    from blsgpu.backend import BLSProcessGroup  # imported when first used

    return BLSProcessGroup(store, rank, world_size, timeout)


def register() -> None:
    """Register "bls" with torch.distributed once; a torch without distributed support is skipped."""
    try:
        import torch.distributed as dist

        if not dist.is_available() or BACKEND_NAME.upper() in dist.Backend._plugins:
            return
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=BACKEND_DEVICES)
    except Exception as e:  # never break `import torch`; say why "bls" will be unknown
        import warnings

        warnings.warn(
            f"blsgpu: the torch.distributed backend 'bls' was not registered: {type(e).__name__}: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
