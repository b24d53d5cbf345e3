"""Interpreting predictions with the SAE: attribution, faithfulness, comparison, concept maps.

* :mod:`~revelio_hub.interpret.ablation`: remove SAE neurons from features, keeping the reconstruction error.
* :mod:`~revelio_hub.interpret.attribution`: which neurons made Diff-C predict a class (exact effects + estimates).
* :mod:`~revelio_hub.interpret.faithfulness`: deletion curves and AOPC, to check an ordering of neurons.
* :mod:`~revelio_hub.interpret.comparison`: the neurons that separate two images.
* :mod:`~revelio_hub.interpret.concepts`: best neuron AUROC for a label value over layers × timesteps.
"""

from revelio_hub.interpret.ablation import NeuronCodes, encode_codes, remove_neurons
from revelio_hub.interpret.attribution import Attribution, attribute
from revelio_hub.interpret.comparison import Comparison, NeuronDifference, compare
from revelio_hub.interpret.concepts import ConceptMap, concept_map, label_values
from revelio_hub.interpret.faithfulness import DeletionCurve, aopc, deletion_curve

__all__ = [
    "Attribution",
    "Comparison",
    "ConceptMap",
    "DeletionCurve",
    "NeuronCodes",
    "NeuronDifference",
    "aopc",
    "attribute",
    "compare",
    "concept_map",
    "deletion_curve",
    "encode_codes",
    "label_values",
    "remove_neurons",
]
