"""What the SAE neurons mean and what they do: atlases, metrics, labels, OOD, attribution, comparison.

* :mod:`~revelio_hub.interpret.atlas_model`: per-neuron statistics and top images (:class:`NeuronAtlas`), search;
  built by :mod:`~revelio_hub.interpret.atlas_builder` from the streaming statistics of
  :mod:`~revelio_hub.interpret.atlas_statistics`, with :mod:`~revelio_hub.interpret.atlas_config` (config, file names)
  and :mod:`~revelio_hub.interpret.atlas_rendering` (thumbnails, heat-map overlays).
* :mod:`~revelio_hub.interpret.metrics`: sigma_label, label entropy, AUROC, rank agreement (defined once; the
  training metrics live in :mod:`revelio_hub.sae.metrics` and :mod:`revelio_hub.diffc.metrics`).
* :mod:`~revelio_hub.interpret.neuron_labels`: the evidence behind a neuron's summary, and when to say "mixed".
* :mod:`~revelio_hub.interpret.claim_calibration`: how often claims like a summary's held on held-out images.
* :mod:`~revelio_hub.interpret.where`: where a token-level neuron peaks on its top images.
* :mod:`~revelio_hub.interpret.ood`: is an image unlike the release's data (reconstruction-error percentile).
* :mod:`~revelio_hub.interpret.reliability`: will Diff-C be wrong on this image (a calibrated score, stored per entry);
  :mod:`~revelio_hub.interpret.calibration` fits and measures it on held-out images and
  :mod:`~revelio_hub.interpret.shifts` (generic image shifts).

* :mod:`~revelio_hub.interpret.ablation`: remove SAE neurons from features, keeping the reconstruction error.
* :mod:`~revelio_hub.interpret.attribution`: which neurons made Diff-C predict a class (exact effects + estimates).
* :mod:`~revelio_hub.interpret.faithfulness`: deletion curves and AOPC, to check an ordering of neurons.
* :mod:`~revelio_hub.interpret.comparison`: the neurons that separate two images.
* :mod:`~revelio_hub.interpret.concepts`: best neuron AUROC for a label value over layers × timesteps.
* :mod:`~revelio_hub.interpret.concept_effects`: "why this class" per named value (groups removed together).
"""

from revelio_hub.interpret.ablation import NeuronCodes, encode_codes, remove_neurons
from revelio_hub.interpret.attribution import Attribution, attribute
from revelio_hub.interpret.comparison import Comparison, NeuronDifference, compare
from revelio_hub.interpret.concept_effects import ConceptEffect, concept_effects
from revelio_hub.interpret.concepts import ConceptMap, concept_map, label_values
from revelio_hub.interpret.faithfulness import DeletionCurve, aopc, deletion_curve

__all__ = [
    "Attribution",
    "Comparison",
    "ConceptEffect",
    "ConceptMap",
    "DeletionCurve",
    "NeuronCodes",
    "NeuronDifference",
    "aopc",
    "attribute",
    "compare",
    "concept_effects",
    "concept_map",
    "deletion_curve",
    "encode_codes",
    "label_values",
    "remove_neurons",
]
