"""Deterministic per-image noise.

The original Revelio code draws fresh noise on every call, so the same image gives different
features each run. We instead derive a private random stream for every
``(seed, image_id, t, ensemble member)`` from a stable hash, generated on the
CPU: an image's noise then does not depend on the batch it landed in, on the
process that handled it, on the device, or on Python's per-process ``hash``
randomisation.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def noise_seed(seed: int, image_id: int, timestep: int, member: int) -> int:
    """A 63-bit seed from a stable hash of the four integers (blake2b, not Python's ``hash``)."""
    key = f"revelio-noise:{int(seed)}:{int(image_id)}:{int(timestep)}:{int(member)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def image_noise(
    shape: Sequence[int], seed: int, image_id: int, timestep: int, member: int = 0
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (one image, no batch dim), float32 on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(noise_seed(seed, image_id, timestep, member))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def batch_noise(
    shape: Sequence[int], seed: int, image_ids: Sequence[int], timestep: int, member: int = 0
) -> torch.Tensor:
    """Stack :func:`image_noise` for each id: ``len(image_ids)×shape``, float32 on CPU."""
    return torch.stack([image_noise(shape, seed, i, timestep, member) for i in image_ids])
