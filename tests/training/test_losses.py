import math

import pytest
import torch

from de3bert.model.heads import HeadOutput
from de3bert.training.losses import (LossConfig, distance_aware_regularizer, early_exit_loss, layer_loss, layer_weights,
                                     prototype_cross_entropy)


def test_dar_hand_computed():
    distances = torch.tensor([[1.0, 3.0], [4.0, 1.0], [4.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # 1/(1+3), 4/(4+1), 1/(1+4)
    assert torch.allclose(distance_aware_regularizer(distances, labels), torch.tensor([0.25, 0.8, 0.2]))


def test_dar_uses_nearest_other_prototype():
    distances = torch.tensor([[2.0, 6.0, 2.0]])
    assert distance_aware_regularizer(distances, torch.tensor([1])).item() == pytest.approx(6 / 8)
    assert distance_aware_regularizer(torch.tensor([[0.0, 5.0]]), torch.tensor([0])).item() == 0.0
    assert distance_aware_regularizer(torch.tensor([[5.0, 5.0]]), torch.tensor([0])).item() == pytest.approx(0.5)


def test_prototype_cross_entropy_is_softmax_of_negative_distances():
    assert prototype_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(math.log(2))
    value = prototype_cross_entropy(torch.tensor([[1.0, 3.0]]), torch.tensor([1])).item()
    assert value == pytest.approx(-math.log(math.exp(-3) / (math.exp(-1) + math.exp(-3))))


def test_layer_weights():
    assert torch.allclose(layer_weights(3, "linear"), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert torch.allclose(layer_weights(4, "uniform"), torch.full((4,), 0.25))
    assert torch.equal(layer_weights(3, "last"), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(layer_weights(3, "internal"), torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="unknown layer weighting"):
        layer_weights(3, "quadratic")


def test_layer_loss_combines_terms_and_switches_them_off():
    output = HeadOutput(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 3.0]]))
    labels = torch.tensor([0])
    ce = math.log(2)
    proto_ce = -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-3)))
    dar = 0.25
    assert layer_loss(output, labels, LossConfig(1.0, 1.0)).item() == pytest.approx(ce + proto_ce + dar, rel=1e-5)
    assert layer_loss(output, labels, LossConfig(0.5, 2.0)).item() == pytest.approx(ce + 0.5 * proto_ce + 2 * dar, rel=1e-5)
    assert layer_loss(output, labels, LossConfig(0.0, 0.0)).item() == pytest.approx(ce, rel=1e-5)


def test_regression_layer_loss_is_mse():
    output = HeadOutput(torch.tensor([[1.0], [3.0]]))
    assert layer_loss(output, torch.tensor([2.0, 2.0]), LossConfig()).item() == pytest.approx(1.0)


def test_early_exit_loss_weights_deeper_layers_more():
    labels = torch.tensor([0])
    good = HeadOutput(torch.tensor([[10.0, -10.0]]))
    bad = HeadOutput(torch.tensor([[0.0, 0.0]]))
    config = LossConfig(0.0, 0.0, "linear")
    # layer 1 loss log 2 with weight 1/3, layer 2 loss ~0 with weight 2/3
    assert early_exit_loss([bad, good], labels, config).item() == pytest.approx(math.log(2) / 3, rel=1e-4)
    assert early_exit_loss([good, bad], labels, config).item() == pytest.approx(2 * math.log(2) / 3, rel=1e-4)
    assert early_exit_loss([good, bad], labels, LossConfig(0.0, 0.0, "last")).item() == pytest.approx(math.log(2), rel=1e-4)
