"""k-sparse autoencoders (TopK SAEs) on diffusion features.

* :mod:`~revelio_hub.sae.model`: :class:`KSparseAutoencoder` (encode, decode, heat maps, Hub loading, import of the original Revelio code's checkpoints).
* :mod:`~revelio_hub.sae.kernels`: the sparse TopK encoder/decoder kernels whose backward touches only active latents.
* :mod:`~revelio_hub.sae.training`: :func:`~revelio_hub.sae.training.train_sae` (AuxK, dead-latent tracking, resume).

Only the model is imported here, so ``from revelio_hub.sae import KSparseAutoencoder`` stays light.
"""

from revelio_hub.sae.model import KSparseAutoencoder

__all__ = ["KSparseAutoencoder"]
