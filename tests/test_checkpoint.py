"""Checkpoints: safetensors + JSON round trip, pruned shapes, refusal of unsafe or broken files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from compression.checkpoint import Checkpoint, load_checkpoint, load_weights, read_metadata, save_checkpoint
from compression.errors import CheckpointError
from compression.models import build_model
from compression.pruning import prune_filters


def _lite():
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", num_classes=11)
    return Checkpoint(model=model, model_name="ssd_vgg_lite", model_args={"num_classes": 11},
                      class_names=[str(i) for i in range(10)], stage="pretrain", metrics={"map_voc07": 0.5})


def test_round_trip_keeps_weights_metadata_and_outputs(tmp_path):
    ckpt = _lite()
    path = save_checkpoint(ckpt, tmp_path / "a.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.model_name == "ssd_vgg_lite" and loaded.class_names == ckpt.class_names
    assert loaded.metrics == {"map_voc07": 0.5} and loaded.stage == "pretrain"
    for (k, a), (_, b) in zip(ckpt.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(1, 3, 128, 128)
    ckpt.model.eval(), loaded.model.eval()
    with torch.no_grad():
        for a, b in zip(ckpt.model.backbone(x).values(), loaded.model.backbone(x).values(), strict=True):
            assert torch.equal(a, b)


def test_pruned_shapes_are_rebuilt_on_load(tmp_path):
    ckpt = _lite()
    conv = ckpt.model.get_submodule("backbone.conv1_1")
    prune_filters(ckpt.model, {"backbone.conv1_1": list(range(3, conv.out_channels))}, model_name="ssd_vgg_lite")
    path = save_checkpoint(ckpt, tmp_path / "p.safetensors")
    meta = read_metadata(path)
    assert meta["module_shapes"]["backbone.conv1_1"]["out_channels"] == 3
    loaded = load_checkpoint(path)
    conv = loaded.model.get_submodule("backbone.conv1_1")
    assert conv.out_channels == 3 and conv.weight.shape[0] == 3
    assert loaded.model.get_submodule("backbone.conv1_2").in_channels == 3
    loaded.model.eval()
    with torch.no_grad():
        out = loaded.model([torch.rand(3, 128, 128)])
    assert "boxes" in out[0]


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(build_model("ssd_vgg_lite", num_classes=11).state_dict(), path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint(_lite(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(cut)


def test_other_architecture_is_refused(tmp_path):
    path = save_checkpoint(_lite(), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="ssd300_vgg16"):
        load_checkpoint(path, expect_model="ssd300_vgg16")
    # Weights of one model under another model's metadata: the loader notices the mismatch.
    cls = build_model("vgg16_cifar", num_classes=10)
    meta = read_metadata(path)
    forged = tmp_path / "forged.safetensors"
    save_file({k: v.contiguous() for k, v in cls.state_dict().items()}, forged, metadata={"prunepipe": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(forged)


def test_failed_write_keeps_the_existing_file(tmp_path):
    ckpt = _lite()
    path = save_checkpoint(ckpt, tmp_path / "a.safetensors")
    before = path.read_bytes()
    ckpt.metrics = {"bad": object()}  # not JSON-serialisable: the write fails
    with pytest.raises(TypeError):
        save_checkpoint(ckpt, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_load_weights_refuses_pickle_objects(tmp_path):
    model = build_model("vgg16_cifar", num_classes=10)
    good = tmp_path / "w.pt"
    torch.save(model.state_dict(), good)
    load_weights(model, good)  # a plain tensor state dict is fine with weights_only=True

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_weights(model, bad)
