"""Metrics on hand-computable examples."""

import math

import pytest
import torch

from revelio_hub.diffc import metrics as diffc_metrics
from revelio_hub.interpret import metrics
from revelio_hub.sae import metrics as sae_metrics


def test_fvu_is_centred():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total centred SS = 2
    assert sae_metrics.fvu(x, x) == 0.0
    # predicting the mean explains nothing
    assert sae_metrics.fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # residual SS = 1
    assert sae_metrics.fvu(x, x_hat) == pytest.approx(0.5)
    assert sae_metrics.explained_variance(x, x_hat) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        sae_metrics.fvu(x, x[:, :1])


def test_l0_and_cosine():
    codes = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    assert sae_metrics.l0(codes) == pytest.approx(1.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert sae_metrics.reconstruction_cosine(x, torch.tensor([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_dead_tracker_window():
    tr = sae_metrics.DeadLatentTracker(4, window=10)
    tr.update_from_indices(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), n_samples=6)
    # latent 1 had value 0: it did not fire
    assert tr.since_fired.tolist() == [0, 6, 6, 6]
    assert tr.fraction() == 0.0
    tr.update_from_indices(torch.tensor([[2, 0]]), torch.tensor([[1.0, 1.0]]), n_samples=4)
    assert tr.dead_mask.tolist() == [False, True, False, True]
    assert tr.fraction() == 0.5
    assert sae_metrics.dead_fraction(torch.tensor([0, 3, 0, 1])) == 0.5


def test_label_purity_and_entropy():
    top = torch.tensor([[2, 2, 2, 2], [0, 2, 0, 2]])
    assert metrics.label_purity(top, top=4).tolist() == [0.0, 1.0]
    # the more active neuron is the impure one
    assert metrics.mean_label_purity(top, activity=torch.tensor([1.0, 5.0]), n_neurons=1, top=4) == 1.0
    assert metrics.label_entropy(top, num_classes=3, top=4).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="class ids"):
        metrics.label_entropy(top, num_classes=2)


def test_auroc_ranks_and_ties():
    labels = torch.tensor([1, 1, 0, 0])
    assert metrics.auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert metrics.auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    # all tied: 0.5; one positive tied with one negative: (3 + 0.5) / 4
    assert metrics.auroc(torch.zeros(4), labels) == 0.5
    assert metrics.auroc(torch.tensor([0.5, 0.9, 0.5, 0.1]), labels) == pytest.approx(0.875)
    many = metrics.auroc(torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.1, 0.0], [0.2, 0.0]]), labels)
    assert many.tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="positive and one negative"):
        metrics.auroc(torch.ones(3), torch.ones(3))


def test_classification_accuracies():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 1])
    assert diffc_metrics.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert diffc_metrics.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    acc = diffc_metrics.per_class_accuracy(logits, labels)
    assert acc[0] == 1.0 and acc[1] == 0.0 and acc[2] == 0.0
    acc = diffc_metrics.per_class_accuracy(torch.tensor([0, 0]), torch.tensor([0, 2]), num_classes=3)
    assert acc[0] == 1.0 and math.isnan(acc[1]) and acc[2] == 0.0
