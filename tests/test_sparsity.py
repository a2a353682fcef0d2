"""compression.sparsity: the L1 penalty, per-layer thresholds and the choice of α."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compression.data.classification import build_classification_dataset
from compression.data.digits import write_digits_cls
from compression.errors import ConfigError
from compression.sparsity import choose_alpha, l1_penalty, threshold_weights, weight_sparsity

LAYERS = ["0", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits_loader(tmp_path_factory):
    root = write_digits_cls(tmp_path_factory.mktemp("digits_cls"), num_images={"train": 64, "val": 10, "test": 10})
    dataset = build_classification_dataset("imagefolder", root, "train", train_aug=False)
    return DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_l1_penalty_covers_conv_weights_only():
    net = small_net()
    penalty = l1_penalty(net, LAYERS)
    assert penalty.detach().item() == pytest.approx(
        float((net[0].weight.abs().sum() + net[3].weight.abs().sum()).detach()), rel=1e-6
    )
    penalty.backward()
    assert net[0].weight.grad is not None and net[3].weight.grad is not None
    assert net[0].bias.grad is None and net[1].weight.grad is None and net[7].weight.grad is None
    torch.testing.assert_close(net[3].weight.grad, torch.sign(net[3].weight.detach()))
    with pytest.raises(ConfigError, match="no module 'nope'"):
        l1_penalty(net, ["nope"])


def test_threshold_uses_alpha_times_each_layers_mean_and_copies():
    net = small_net()
    original = net[0].weight.detach().clone()
    thresholded, taus = threshold_weights(net, LAYERS, alpha=1.5)
    assert torch.equal(net[0].weight, original)  # the input model is untouched
    for name in LAYERS:
        weight = net.get_submodule(name).weight.detach()
        tau = 1.5 * weight.abs().mean().item()
        assert taus[name] == pytest.approx(tau)
        expected = torch.where(weight.abs() < tau, 0.0, weight)
        assert torch.equal(thresholded.get_submodule(name).weight.detach(), expected)
    assert torch.equal(thresholded[0].bias, net[0].bias) and torch.equal(thresholded[7].weight, net[7].weight)
    sparsity = weight_sparsity(thresholded, LAYERS)
    assert 0.5 < sparsity["0"] < 1 and weight_sparsity(net, LAYERS) == {"0": 0.0, "3": 0.0}


def _train(net: nn.Module, loader: DataLoader, l1_lambda: float, steps: int = 48) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    done = 0
    while done < steps:
        for images, labels in loader:
            loss = F.cross_entropy(net(images), labels)
            if l1_lambda:
                loss = loss + l1_lambda * l1_penalty(net, LAYERS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def _near_zero(net: nn.Module, limit: float = 2e-3) -> float:
    weights = torch.cat([net.get_submodule(n).weight.detach().flatten() for n in LAYERS])
    return float((weights.abs() < limit).float().mean())


def test_l1_training_raises_weight_sparsity(digits_loader):
    plain, sparse = small_net(), small_net()
    _train(plain, digits_loader, l1_lambda=0.0)
    _train(sparse, digits_loader, l1_lambda=0.02)
    near_plain, near_sparse = _near_zero(plain), _near_zero(sparse)
    print(f"near-zero weights: plain {near_plain:.3f}, L1 {near_sparse:.3f}")
    assert near_sparse > near_plain + 0.2, (near_plain, near_sparse)
    # At the same α the thresholded L1 model is sparser too.
    at_alpha = [sum(weight_sparsity(threshold_weights(net, LAYERS, 1.0)[0], LAYERS).values()) for net in (plain, sparse)]
    assert at_alpha[1] > at_alpha[0]


def test_choose_alpha_takes_the_largest_alpha_within_max_drop():
    net = small_net()
    grid = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
    calls = []

    def evaluate(model: nn.Module) -> float:  # accuracy falls with the fraction of zeroed weights
        zeros = sum(weight_sparsity(model, LAYERS).values()) / len(LAYERS)
        calls.append(zeros)
        return 0.9 - 0.5 * zeros

    result = choose_alpha(net, LAYERS, grid, max_drop=0.2, evaluate_fn=evaluate)
    alpha = result["alpha"]
    assert alpha in grid and result["val_metric_l1"] == pytest.approx(0.9)
    assert result["val_metric_l1"] - result["val_metric_thresholded"] <= 0.2
    larger = grid[grid.index(alpha) + 1]
    assert 0.9 - evaluate(threshold_weights(net, LAYERS, larger)[0]) > 0.2  # the next α fails
    assert [t["alpha"] for t in result["tried"]] == sorted((a for a in grid if a >= alpha), reverse=True)
    assert [t["ok"] for t in result["tried"]] == [False] * (len(result["tried"]) - 1) + [True]
    assert result["taus"]["3"] == pytest.approx(alpha * net[3].weight.abs().mean().item())
    assert result["sparsity_before"] == {"0": 0.0, "3": 0.0}
    assert 0 < result["sparsity_after"]["0"] < 1
    assert len(calls) == 1 + len(result["tried"]) + 1  # no α below the chosen one was evaluated


def test_choose_alpha_without_a_passing_alpha_does_not_threshold():
    net = small_net()

    def broken(model: nn.Module) -> float:
        return 0.8 if model is net else math.nan

    result = choose_alpha(net, LAYERS, [0.5, 1.0], max_drop=0.05, evaluate_fn=broken)
    assert result["alpha"] is None and result["taus"] == {"0": 0.0, "3": 0.0}
    assert result["val_metric_thresholded"] == 0.8 and len(result["tried"]) == 2
    with pytest.raises(ConfigError, match="alpha_grid"):
        choose_alpha(net, LAYERS, [0.0, 1.0], max_drop=0.05, evaluate_fn=broken)
