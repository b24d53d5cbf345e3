"""Synthetic data with known atoms, and the score of how well an SAE recovers them.

Why: on real features nobody knows the true dictionary, so "this SAE found the
right features" cannot be checked. Here every sample is a sparse non-negative
combination of known unit atoms; an SAE that learned the data's structure has
decoder rows pointing along those atoms. The score is the mean correlation
coefficient (MCC) as SAELens's synthetic evaluation defines it: match true atoms
to decoder rows one-to-one by the Hungarian algorithm on |cosine|, average the
matched |cosine|s (1 = every atom found).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["SyntheticAtoms", "make_synthetic", "atom_mcc"]


@dataclass(frozen=True)
class SyntheticAtoms:
    """The recipe of a synthetic set (the defaults: 512 atoms in d 128, 5–10 active per sample).

    Attributes:
        d: sample dimension.
        n_atoms: dictionary size (4× overcomplete by default: atoms cannot be orthogonal).
        min_active / max_active: atoms per sample, uniform in [min, max].
        magnitude: (low, high) of the uniform coefficient of each active atom.
        noise: std of isotropic Gaussian noise added to every sample.
        seed: seeds the atoms; samples are drawn from ``seed + 1 + chunk``.
    """

    d: int = 128
    n_atoms: int = 512
    min_active: int = 5
    max_active: int = 10
    magnitude: tuple[float, float] = (0.5, 1.5)
    noise: float = 0.01
    seed: int = 0

    def atoms(self) -> torch.Tensor:
        """The true dictionary, n_atoms × d, unit rows."""
        g = torch.Generator().manual_seed(self.seed)
        a = torch.randn(self.n_atoms, self.d, generator=g)
        return a / a.norm(dim=1, keepdim=True)


def make_synthetic(spec: SyntheticAtoms, n: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples n×d, atoms n_atoms×d)``; a fixed ``spec`` gives the same data every time."""
    if not 1 <= spec.min_active <= spec.max_active <= spec.n_atoms:
        raise ValueError(f"need 1 ≤ min_active ≤ max_active ≤ n_atoms, got {spec}")
    atoms = spec.atoms()
    out = torch.empty(n, spec.d)
    lo, hi = spec.magnitude
    for c, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        g = torch.Generator().manual_seed(spec.seed + 1 + c)
        # max_active distinct atoms per row (the top of a random score); the first `count` are active
        order = torch.rand(m, spec.n_atoms, generator=g).topk(spec.max_active, dim=1).indices
        count = torch.randint(spec.min_active, spec.max_active + 1, (m, 1), generator=g)
        coef = lo + (hi - lo) * torch.rand(m, spec.max_active, generator=g)
        coef = coef * (torch.arange(spec.max_active) < count)
        x = torch.nn.functional.embedding_bag(order, atoms, mode="sum", per_sample_weights=coef)
        out[start : start + m] = x + spec.noise * torch.randn(m, spec.d, generator=g)
    return out, atoms


def atom_mcc(decoder_rows: torch.Tensor, atoms: torch.Tensor) -> float:
    """Mean |cosine| of the Hungarian one-to-one matching of true atoms to decoder rows (SAELens's MCC).

    Averages over min(n_atoms, n_rows) matched pairs: with more latents than
    atoms, every atom gets its own latent and unused latents cost nothing.
    """
    a = torch.nn.functional.normalize(atoms.double(), dim=1)
    b = torch.nn.functional.normalize(decoder_rows.detach().double().cpu(), dim=1)
    cos = (a @ b.T).abs()
    rows, cols = linear_sum_assignment((1 - cos).numpy())
    return float(cos[rows, cols].mean())
