"""The embedded default: procedural shapes, a toy pixel-space diffusion backbone and its release.

Real checkpoints cannot be downloaded everywhere, yet the app, the tests and the
monosemanticity benchmark need a whole pipeline. This package provides the data
(:mod:`.shapes`), the backbone training (:mod:`.backbone_training`) and the
end-to-end release build (:mod:`.pipeline`).
"""

from .shapes import FACTORS, ShapeSpec, image_spec, make_shapes_dataset, object_mask, render

__all__ = ["FACTORS", "ShapeSpec", "image_spec", "make_shapes_dataset", "object_mask", "render"]
