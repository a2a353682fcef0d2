"""RayTrainer: real Ray Train (2 CPU workers, DDP over gloo) on the built-in digits data.

One local Ray serves the whole module. The fits are tiny (32 images, 1-2 epochs); their cost is Ray
Train's fixed start-up per fit (controller + worker processes), printed with ``-s``.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from tasks.env import apply_env_defaults

apply_env_defaults()

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import FLOAT32  # noqa: E402

from compression.checkpoint import load_checkpoint, read_metadata  # noqa: E402
from compression.config import ComputeConfig, OptimConfig, load_config  # noqa: E402
from compression.data.digits import write_digits_voc  # noqa: E402
from compression.jobs import LocalTrainer, TrainJob, initial_checkpoint  # noqa: E402
from compression.pruning import resolve_layers  # noqa: E402
from compression.train import TrainState, make_optimizer, make_scheduler  # noqa: E402
from tasks.ray_trainer import (  # noqa: E402
    ComputeError,
    RayTrainer,
    check_ray_address,
    ensure_ray,
    load_train_state,
    run_name,
    save_train_state,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    devkit = write_digits_voc(tmp_path_factory.mktemp("digits"), image_size=64,
                              num_images={"train": 32, "val": 8, "test": 8})
    # data.root relative to the driver's working directory, as in the presets: Ray Train workers run
    # elsewhere, so the trainer must hand them an absolute path.
    return load_config("default", [
        f"data.root={os.path.relpath(devkit)}", "data.builtin=null", "data.batch_size=8",
        "model.width_mult=0.0625", "model.image_size=64", *FLOAT32,
        "stages.pretrain.epochs=1", "stages.pretrain.warmup_epochs=0",
        f"workdir={tmp_path_factory.mktemp('work')}", "compute.max_failures=0",
    ])


@pytest.fixture(scope="module")
def ray_session(cfg):
    started = time.perf_counter()
    info = ensure_ray(cfg.compute)
    print(f"\nensure_ray: {time.perf_counter() - started:.1f}s ({info.cpus:g} CPUs, started here: {info.started_here})")
    yield info
    # Session-wide Ray: other modules may reuse it; Ray stops at interpreter exit.


def pretrain_job(cfg, out, epochs: int) -> TrainJob:
    stage_cfg = cfg.model_copy(deep=True)
    stage_cfg.stages.pretrain.epochs = epochs
    return TrainJob(stage="pretrain", config=stage_cfg.model_dump(mode="json"),
                    optim=stage_cfg.stages.pretrain.model_dump(mode="json", include=set(OptimConfig.model_fields)),
                    input_checkpoint=None, output_checkpoint=str(out))


@pytest.fixture(scope="module")
def first_fit(cfg, ray_session, tmp_path_factory):
    trainer = RayTrainer(cfg.compute, tmp_path_factory.mktemp("ray-storage"))
    out = tmp_path_factory.mktemp("out") / "ray_e1.safetensors"
    result = trainer.fit(pretrain_job(cfg, out, epochs=1))
    print(f"\nRay fit, 1 epoch: {trainer.fits[-1].seconds:.1f}s")
    return trainer, result


def test_ray_fit_writes_the_same_kind_of_checkpoint_as_local(cfg, first_fit, tmp_path):
    _, result = first_fit
    ray_meta = read_metadata(result.output_checkpoint)
    local_out = tmp_path / "local.safetensors"
    torch.set_num_threads(1)
    local = LocalTrainer(device="cpu", progress=False).fit(pretrain_job(cfg, local_out, epochs=1))
    local_meta = read_metadata(local.output_checkpoint)

    for key in ("format", "model_name", "model_args", "class_names", "stage", "module_shapes"):
        assert ray_meta[key] == local_meta[key], key
    ray_ckpt, local_ckpt = load_checkpoint(result.output_checkpoint), load_checkpoint(local.output_checkpoint)
    ray_state, local_state = ray_ckpt.model.state_dict(), local_ckpt.model.state_dict()
    assert ray_state.keys() == local_state.keys()
    assert all(ray_state[k].shape == local_state[k].shape for k in ray_state)
    # Both trained: the weights moved away from the same seeded initialisation.
    initial = initial_checkpoint(cfg).model.state_dict()
    for trained in (ray_state, local_state):
        assert any(not torch.equal(trained[k], initial[k]) for k in initial if initial[k].is_floating_point())
    # ... and report one epoch of history with the loss terms.
    assert [h["epoch"] for h in result.history] == [1] == [h["epoch"] for h in local.history]
    assert result.history[0]["train_loss"] > 0


@pytest.mark.long  # two more fits (about 20 s): `make test` stays under 15 minutes
def test_group_norm_sparsity_regularises_every_ddp_worker(cfg, first_fit, tmp_path):
    """The group_norm criterion's sparsity job in Ray Train: GroupNormPruner's regulariser runs in each DDP
    worker (after the gradients are averaged), so the phase's groups shrink as they do in-process."""
    _, pretrained = first_fit
    layers = list(cfg.stages.phases[0].layers)
    optim = cfg.stages.sparsity.model_dump(mode="json", include=set(OptimConfig.model_fields))

    def job(out, reg: float) -> TrainJob:
        return TrainJob(stage="sparsity", config=cfg.model_dump(mode="json"), optim={**optim, "epochs": 2},
                        input_checkpoint=pretrained.output_checkpoint, output_checkpoint=str(out), phase="phase1",
                        sparsity_layers=layers, group_norm_reg=reg)

    def norm(path) -> float:
        ckpt = load_checkpoint(path)
        return sum(float(layer.weight.detach().pow(2).sum())
                   for _, layer in resolve_layers(ckpt.model, ckpt.model_name, layers))

    torch.set_num_threads(1)
    plain = LocalTrainer(device="cpu", progress=False).fit(job(tmp_path / "plain.safetensors", 0.0))
    trainer = RayTrainer(cfg.compute, tmp_path / "ray-storage")
    regularised = trainer.fit(job(tmp_path / "group_norm.safetensors", 1.0))
    assert norm(regularised.output_checkpoint) < 0.95 * norm(plain.output_checkpoint)


def test_more_epochs_resume_from_the_last_reported_checkpoint(cfg, first_fit, tmp_path):
    trainer, first = first_fit
    job = pretrain_job(cfg, tmp_path / "ray_e2.safetensors", epochs=2)
    assert run_name(job) == trainer.fits[0].run_name  # the epoch count is not part of the run's name
    second = trainer.fit(job)
    print(f"\nRay fit, resumed for 1 more epoch: {trainer.fits[-1].seconds:.1f}s")

    timing = trainer.fits[-1]
    assert (timing.resumed_from_epoch, timing.epochs_trained) == (1, 1)
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # epoch 1 came back from the checkpoint, not retrained
    assert load_checkpoint(second.output_checkpoint).model_name == cfg.model.name


def test_a_ray_fit_relays_progress_to_the_driver_and_stops_on_validation(cfg, ray_session, tmp_path, caplog):
    stage_cfg = cfg.model_copy(deep=True)
    stage_cfg.stages.pretrain = stage_cfg.stages.pretrain.model_copy(
        update={"early_stopping": True, "patience": 1, "eval_every": 1})
    stage_cfg.compute.log_every_steps = 2  # 32 images, 8 a step over 2 workers: 4 steps an epoch
    job = pretrain_job(stage_cfg, tmp_path / "ray_es.safetensors", epochs=3)
    records: list[dict] = []
    trainer = RayTrainer(stage_cfg.compute, tmp_path / "ray-storage", on_progress=records.append)

    with caplog.at_level(logging.INFO, logger="tasks.ray_trainer"):
        result = trainer.fit(job)

    # Lines logged in the driver process (the Prefect task's log when the fit runs in a task).
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.ray_trainer"]
    precision = "bf16 autocast off (compute.amp_bf16=false) / channels-last off (compute.channels_last=false)"
    assert f"stage pretrain on cpu: precision: {precision}" in lines
    assert any(line.startswith("stage pretrain epoch 1/3 step 2/4: loss ") and "ETA" in line for line in lines)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [h["epoch"] for h in result.history]
    assert all(r["loss"] > 0 and r["eta_s"] >= 0 and r["images_per_s"] > 0 for r in epochs)
    assert sum(line.startswith("stage pretrain epoch ") and "val map_voc07" in line for line in lines) == len(epochs)
    # Every rank took the same decision (the fit ended cleanly), and the curve is in the checkpoint.
    stop = read_metadata(result.output_checkpoint)["extra"]["early_stopping"]
    curve = [h["val_map_voc07"] for h in result.history]
    assert stop["best_epoch"] == curve.index(max(curve)) + 1
    assert len(curve) == (stop["best_epoch"] + 1 if stop["stopped_early"] else 3)
    assert result.precision["reason"] == precision == trainer.fits[-1].precision["reason"]


def test_train_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    optim_cfg = load_config("default").stages.pretrain.model_copy(update={"optimizer": "adamw", "epochs": 2})
    optimizer = make_optimizer(model.parameters(), optim_cfg)
    scheduler = make_scheduler(optimizer, optim_cfg, steps_per_epoch=3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    best = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainState(epoch=1, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       history=[{"epoch": 1, "train_loss": 0.5, "val_map_voc07": 0.25}], best_epoch=1,
                       best_metric=0.25, best_weights=best, stopped=True)

    save_train_state(tmp_path, model.state_dict(), state)
    weights, loaded = load_train_state(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["objective.safetensors", "state.json", "state.safetensors"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert (loaded.epoch, loaded.history, loaded.scheduler) == (1, state.history, state.scheduler)
    assert (loaded.best_epoch, loaded.best_metric, loaded.stopped) == (1, 0.25, True)
    assert all(torch.equal(loaded.best_weights[k], v) for k, v in best.items())
    fresh = make_optimizer(model.parameters(), optim_cfg)
    fresh.load_state_dict(loaded.optimizer)  # the restored structure is what torch expects
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][0][key]), torch.as_tensor(value)), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_use_gpu_without_a_gpu_is_one_clear_error_before_ray():
    with pytest.raises(ComputeError, match="use_gpu is true but no CUDA GPU is visible") as err:
        ensure_ray(ComputeConfig(use_gpu=True))
    assert "\n" not in str(err.value)


def test_a_ray_address_that_does_not_answer_is_one_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free again once closed: nothing listens there
    with pytest.raises(ComputeError, match=f"127.0.0.1:{port}: no Ray cluster answers there") as err:
        check_ray_address(f"127.0.0.1:{port}")
    assert "\n" not in str(err.value)
    with pytest.raises(ComputeError, match="expected HOST:PORT"):
        check_ray_address("not-an-address")
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_configured_batch_is_the_global_batch_split_over_the_workers():
    from tasks.ray_trainer import per_worker_batch

    assert per_worker_batch({"batch_size": 32, "num_workers": 1}, 2) == {"batch_size": 16, "num_workers": 1}
    assert per_worker_batch({"batch_size": 33}, 3)["batch_size"] == 11
    assert per_worker_batch({"batch_size": 5}, 2)["batch_size"] == 3  # never fewer samples than asked
    assert per_worker_batch({"batch_size": 8}, 1)["batch_size"] == 8
