"""Diff-C: the light conv classifier on diffusion feature maps, for transfer learning.

* :mod:`~revelio_hub.diffc.model`: :class:`DiffC` (conv or linear head, Hub loading, ``predict``).
* :mod:`~revelio_hub.diffc.training`: training from cached feature stores (views, resume, evaluation).
* :mod:`~revelio_hub.diffc.sweep`: linear probes over layer × timestep, to pick where to train Diff-C.

Only the model is imported here; training pulls in more and is imported where it is used.
"""

from revelio_hub.diffc.model import DiffC

__all__ = ["DiffC"]
