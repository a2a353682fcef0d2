"""compression.sparsity: the L1 penalty, per-layer thresholds and the choice of α, through BatchNorm."""

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
from compression.pruning import build_dependency_graph
from compression.selection import filter_sparsity_scores
from compression.sparsity import (
    SparsityTarget,
    choose_alpha,
    effective_weight,
    l1_penalty,
    sparsity_penalty,
    sparsity_targets,
    threshold_weights,
    weight_sparsity,
)

LAYERS = ["0", "3"]
TARGETS = [SparsityTarget("0", "1"), SparsityTarget("3", None), SparsityTarget("7", None)]  # "7" reads "3"


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed: int = 0) -> nn.Sequential:
    """conv "0" -> BatchNorm "1" -> relu -> conv "3" -> relu -> pool -> Linear "7" (BN statistics not at 0/1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    net.image_size = 32  # the input size the dependency graph is traced at
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_var.uniform_(0.2, 2.0)
        net[1].running_mean.uniform_(-0.2, 0.2)
    return net.eval()


def _effective(net: nn.Module, name: str) -> torch.Tensor:
    scale = torch.ones(net.get_submodule(name).weight.shape[0])
    if name == "0":
        scale = net[1].weight / (net[1].running_var + net[1].eps).sqrt()
    weight = net.get_submodule(name).weight
    return (weight * scale.view(-1, *[1] * (weight.dim() - 1))).detach()


@pytest.fixture(scope="module")
def digits_loader(tmp_path_factory):
    root = write_digits_cls(tmp_path_factory.mktemp("digits_cls"), num_images={"train": 64, "val": 10, "test": 10})
    dataset = build_classification_dataset("imagefolder", root, "train", train_aug=False)
    return DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_targets_are_the_layers_and_their_consumers_with_the_batchnorm_after_each():
    net = small_net()
    assert sparsity_targets(net, LAYERS) == TARGETS
    assert sparsity_targets(net, ["0"]) == TARGETS[:2]  # conv "3" reads "0": L1-trained and thresholded too


def test_l1_penalty_is_the_effective_filters_l1_norm():
    net = small_net()
    penalty = l1_penalty(net, TARGETS)
    assert penalty.item() == pytest.approx(sum(_effective(net, n).abs().sum().item() for n in ("0", "3", "7")), rel=1e-6)
    penalty.backward()
    assert net[0].weight.grad is not None and net[3].weight.grad is not None and net[7].weight.grad is not None
    assert net[1].weight.grad is not None  # γ: the output scale BN cannot hand back to W
    assert net[0].bias.grad is None and net[1].bias.grad is None
    torch.testing.assert_close(net[3].weight.grad, torch.sign(net[3].weight.detach()))
    assert sparsity_penalty(net, LAYERS, 0.5)().item() == pytest.approx(0.5 * penalty.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="no module 'nope'"):
        sparsity_targets(net, ["nope"])


def _rescale_behind_batchnorm(net: nn.Module, filters: list[int], factor: float) -> None:
    """Scale filters of conv "0" by ``factor`` and let BN "1" compensate exactly (inference outputs unchanged)."""
    with torch.no_grad():
        net[0].weight[filters] *= factor
        net[0].bias[filters] *= factor
        net[1].running_mean[filters] *= factor
        net[1].running_var[filters] *= factor**2
        net[1].eps = 0.0  # so that the compensation is exact


def test_filters_shrunk_behind_batchnorm_are_not_called_sparse():
    net, shrunk = small_net(), small_net()
    net[1].eps = 0.0
    _rescale_behind_batchnorm(shrunk, [0, 1, 2], 0.1)
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(shrunk(images), net(images))  # the same function
    # Raw weights would call the three filters 100 % zeros at α = 1 ...
    raw = shrunk[0].weight.detach()
    assert ((raw[:3].abs() < raw.abs().mean()).float().mean(dim=(1, 2, 3)) == 1).all()
    # ... the effective filters are unchanged, so are the thresholds and every statistic.
    scores = []
    for model in (net, shrunk):
        thresholded, taus = threshold_weights(model, LAYERS, alpha=1.0)
        scores.append((filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), LAYERS), taus))
    assert scores[1][0] == scores[0][0]
    assert scores[1][1] == pytest.approx(scores[0][1])
    assert max(scores[1][0]["0"]["s_out"][:3]) < 0.9


def test_a_filter_with_zero_gamma_is_all_zeros():
    net = small_net()
    with torch.no_grad():
        net[1].weight[5] = 0.0
    for alpha in (0.0, 1.0):  # even without thresholding: its effective weights are exactly zero
        thresholded, _ = threshold_weights(net, LAYERS, alpha=alpha)
        scores = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), LAYERS)
        assert scores["0"]["s_out"][5] == 1.0
        assert max(s for f, s in enumerate(scores["0"]["s_out"]) if f != 5) < 1.0


def test_rescaling_cannot_make_the_penalty_or_its_pull_vanish():
    net, shrunk = small_net(), small_net()
    net[1].eps = 0.0
    _rescale_behind_batchnorm(shrunk, list(range(8)), 1e-3)
    penalties = []
    for model in (net, shrunk):
        penalty = l1_penalty(model, TARGETS[:1])
        penalty.backward()
        penalties.append((penalty.item(), model[1].weight.grad.clone()))
    assert penalties[1][0] == pytest.approx(penalties[0][0], rel=1e-4)  # a raw ‖W‖₁ would be 1000x smaller
    torch.testing.assert_close(penalties[1][1], penalties[0][1], rtol=1e-4, atol=0)
    assert (penalties[1][1].abs() > 0).all()  # every γ is still pulled towards 0


def test_threshold_uses_alpha_times_each_layers_effective_mean_and_copies():
    net = small_net()
    original = net[0].weight.detach().clone()
    thresholded, taus = threshold_weights(net, LAYERS, alpha=1.5)
    assert torch.equal(net[0].weight, original)  # the input model is untouched
    assert set(taus) == {"0", "3", "7"}
    for name in taus:
        effective = _effective(net, name)
        tau = 1.5 * effective.abs().mean().item()
        assert taus[name] == pytest.approx(tau, rel=1e-5)
        weight = net.get_submodule(name).weight.detach()
        expected = torch.where(effective.abs() < taus[name], 0.0, weight)
        assert torch.equal(thresholded.get_submodule(name).weight.detach(), expected)
    assert torch.equal(thresholded[0].bias, net[0].bias) and torch.equal(thresholded[7].bias, net[7].bias)
    sparsity = weight_sparsity(thresholded, LAYERS)
    assert 0.5 < sparsity["0"] < 1 and weight_sparsity(net, LAYERS) == {"0": 0.0, "3": 0.0}
    assert effective_weight(net, TARGETS[0]).shape == net[0].weight.shape


def _train(net: nn.Module, loader: DataLoader, l1_lambda: float, steps: int = 48) -> None:
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    done = 0
    while done < steps:
        for images, labels in loader:
            loss = F.cross_entropy(net(images), labels)
            if l1_lambda:
                loss = loss + l1_lambda * l1_penalty(net, TARGETS)
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
    assert result["taus"]["0"] == pytest.approx(alpha * _effective(net, "0").abs().mean().item(), rel=1e-5)
    assert result["layers"] == ["0", "3", "7"]
    assert result["sparsity_before"] == {"0": 0.0, "3": 0.0, "7": 0.0}
    assert 0 < result["sparsity_after"]["0"] < 1
    assert len(calls) == 1 + len(result["tried"]) + 1  # no α below the chosen one was evaluated


def test_choose_alpha_without_a_passing_alpha_does_not_threshold():
    net = small_net()

    def broken(model: nn.Module) -> float:
        return 0.8 if model is net else math.nan

    result = choose_alpha(net, LAYERS, [0.5, 1.0], max_drop=0.05, evaluate_fn=broken)
    assert result["alpha"] is None and result["taus"] == {"0": 0.0, "3": 0.0, "7": 0.0}
    assert result["val_metric_thresholded"] == 0.8 and len(result["tried"]) == 2
    with pytest.raises(ConfigError, match="alpha_grid"):
        choose_alpha(net, LAYERS, [0.0, 1.0], max_drop=0.05, evaluate_fn=broken)
