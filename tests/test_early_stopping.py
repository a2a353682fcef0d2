"""Early stopping of pretraining on the validation split, and the training loop's progress records."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import FLOAT32
from torch import nn

from compression.checkpoint import load_checkpoint, read_metadata
from compression.config import OptimConfig, load_config
from compression.data.digits import write_digits_voc
from compression.jobs import LocalTrainer, TrainJob
from compression.train import TrainState, Validation, format_progress, train_model


class Regression(nn.Module):
    """y = w·x fitted by mean squared error (the objective interface of ``train_model``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": ((self.w * inputs - targets) ** 2).mean()}


def test_training_stops_when_validation_stops_improving_and_keeps_the_best_weights(one_thread):
    # Full-batch gradient descent pulls w from 0 towards the training slope 2 (w = 2 - 2·0.8^t); the
    # validation data has slope 1, so its error falls until w passes 1 (epoch 3: w = 0.976) and rises after.
    x = torch.tensor([-1.0, 1.0]).repeat(8)
    model = Regression()
    cfg = OptimConfig(epochs=20, lr=0.1, momentum=0, weight_decay=0, optimizer="sgd", schedule="constant")
    weights: dict[int, float] = {}
    records: list[dict] = []

    def validation_error() -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -float(((model.w * x - x) ** 2).mean())}

    state = train_model(
        model, [(x, 2 * x)], cfg, validation=Validation(validation_error, "neg_mse", every=1, patience=3),
        callbacks=[lambda epoch, metrics, s: weights.__setitem__(epoch, float(model.w.detach()))],
        on_progress=records.append, context="fit", progress=False,
    )

    assert [round(w, 4) for w in weights.values()] == [0.4, 0.72, 0.976, 1.1808, 1.3446, 1.4757]
    assert (state.best_epoch, state.epoch, state.stopped) == (3, 6, True)
    assert float(model.w.detach()) == pytest.approx(weights[3])  # the best epoch's weights, not the last one's
    curve = [h["val_neg_mse"] for h in state.history]
    assert len(curve) == 6 and curve.index(max(curve)) == 2
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    assert all(r["epochs"] == 20 and r["eta_s"] >= 0 and r["loss"] > 0 for r in epochs)
    assert epochs[-1]["stopped"] and epochs[-1]["best_epoch"] == 3
    assert "early stop: no better validation value since epoch 3" in format_progress(epochs[-1])


def test_evaluating_every_second_epoch_counts_patience_in_epochs(one_thread):
    x = torch.tensor([-1.0, 1.0]).repeat(8)
    model = Regression()
    cfg = OptimConfig(epochs=9, lr=0.1, momentum=0, weight_decay=0, optimizer="sgd", schedule="constant")
    evaluated: list[float] = []

    def validation_error() -> dict[str, float]:
        evaluated.append(float(model.w.detach()))
        return {"neg_mse": -float(((model.w.detach() * x - x) ** 2).mean())}

    state = train_model(model, [(x, 2 * x)], cfg, progress=False,
                        validation=Validation(validation_error, "neg_mse", every=2, patience=4))

    # evaluated after epochs 2, 4 (best: w = 1.18 is nearer 1 than 0.72) and 6, 8; stopped at 8 = 4 + 4
    assert len(evaluated) == 4 and (state.best_epoch, state.epoch, state.stopped) == (4, 8, True)
    assert float(model.w.detach()) == pytest.approx(evaluated[1])
    assert ["val_neg_mse" in h for h in state.history] == [False, True] * 4


def test_a_resumed_run_that_stopped_early_trains_no_further(one_thread):
    model = Regression()
    cfg = OptimConfig(epochs=20, lr=0.1, momentum=0, weight_decay=0, optimizer="sgd", schedule="constant")
    best = {"w": torch.tensor([1.25])}
    state = TrainState(epoch=5, best_epoch=2, best_metric=-0.01, best_weights=best, stopped=True)
    x = torch.linspace(-1, 1, 16)

    state = train_model(model, [(x, 2 * x)], cfg, state=state, progress=False,
                        validation=Validation(lambda: {"m": 0.0}, "m", patience=3))

    assert state.epoch == 5 and float(model.w.detach()) == 1.25


def test_progress_records_every_n_steps_carry_loss_throughput_and_eta(one_thread):
    x = torch.linspace(-1, 1, 16)
    records: list[dict] = []
    cfg = OptimConfig(epochs=2, lr=0.1, momentum=0, weight_decay=0, optimizer="sgd", schedule="constant")
    train_model(Regression(), [(x, 2 * x)] * 6, cfg, on_progress=records.append, log_every_steps=2,
                context="stage pretrain", progress=False)

    assert [(r["kind"], r["epoch"], r["step"]) for r in records] == [
        ("step", 1, 2), ("step", 1, 4), ("epoch", 1, 6), ("step", 2, 2), ("step", 2, 4), ("epoch", 2, 6)]
    assert all(r["images_per_s"] > 0 and r["eta_s"] >= 0 for r in records)
    assert records[-1]["eta_s"] == 0
    line = format_progress(records[0])
    assert line.startswith("stage pretrain epoch 1/2 step 2/6: loss ") and "img/s, ETA " in line


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    return write_digits_voc(tmp_path_factory.mktemp("digits"), image_size=64,
                            num_images={"train": 32, "val": 8, "test": 8})


def test_pretraining_with_early_stopping_reads_the_validation_split_only(devkit, tmp_path):
    torch.set_num_threads(1)
    # test_sets names an image set that does not exist: reading the test split would fail the run.
    cfg = load_config("default", [
        f"data.root={os.path.relpath(devkit)}", "data.builtin=null", "data.batch_size=8", "data.eval_batch_size=8",
        "data.test_sets=['2007:absent']", "model.width_mult=0.0625", "model.image_size=64", *FLOAT32,
        "stages.pretrain.epochs=3", "stages.pretrain.warmup_epochs=0", "stages.pretrain.early_stopping=true",
        "stages.pretrain.patience=1", "stages.pretrain.eval_every=1", f"workdir={tmp_path}",
    ])
    job = TrainJob(stage="pretrain", config=cfg.model_dump(mode="json"),
                   optim=cfg.stages.pretrain.model_dump(mode="json", include=set(OptimConfig.model_fields)),
                   input_checkpoint=None, output_checkpoint=str(tmp_path / "base.safetensors"))
    records: list[dict] = []

    result = LocalTrainer(device="cpu", progress=False, on_progress=records.append).fit(job)

    extra = read_metadata(result.output_checkpoint)["extra"]
    curve = [h["val_map_voc07"] for h in extra["history"]]
    stop = extra["early_stopping"]
    assert len(curve) == stop["epochs_trained"] and all(0 <= v <= 1 for v in curve)
    assert stop["best_epoch"] == curve.index(max(curve)) + 1 and stop["best_value"] == max(curve)
    # patience 1: the run ends one epoch after its best one, or at the maximum
    assert stop["epochs_trained"] == (stop["best_epoch"] + 1 if stop["stopped_early"] else 3)
    assert result.precision == {"amp_bf16": False, "channels_last": False, "reason":
                                "bf16 autocast off (compute.amp_bf16=false) / channels-last off "
                                "(compute.channels_last=false)"}
    assert records[0]["kind"] == "start" and records[0]["precision"] == result.precision
    assert load_checkpoint(result.output_checkpoint).stage == "pretrain"
