"""compression.export: ONNX files that onnxruntime runs to PyTorch's outputs, and a sidecar that
reproduces SSD post-processing; the CLI's ``export`` command and its refusals.

Small models keep the file fast: ssd_vgg_lite at width 1/16 (dense and with filters pruned by
``prune_filters``) and vgg16_cifar at width 1/8, random weights (export does not depend on them).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from compression.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from compression.data.digits import DIGIT_CLASSES, write_digits_voc
from compression.data.transforms import eval_transforms
from compression.data.voc import VOCDetection
from compression.errors import CheckpointError, ConfigError, ModelError
from compression.export import (
    ORT_LAYOUTS,
    deployment_forward,
    deployment_latency,
    deployment_network,
    deployment_speedup,
    export_onnx,
    export_paths,
    fold_batchnorm,
    onnx_detect,
    onnx_flops,
    onnx_parity,
    onnx_session,
    postprocess_onnx_outputs,
    read_sidecar,
)
from compression.metrics import count_flops
from compression.models import SSDNetwork, build_model, ssd_default_boxes
from compression.pruning import build_dependency_graph, prune_filters
from compression.pruning import count_flops as checkpoint_flops
from compression.ssd_fast import preprocess_batch, ssd_detect
from flows.cli import app

CLASSES = list(DIGIT_CLASSES)
LITE_ARGS = {"num_classes": len(CLASSES) + 1, "width_mult": 0.0625}
VGG_ARGS = {"num_classes": len(CLASSES), "width_mult": 0.125}


pytestmark = pytest.mark.usefixtures("one_thread")  # the machine's cores are shared


def _save(folder, name, model_name, args, model):
    ckpt = Checkpoint(model=model, model_name=model_name, model_args=args, class_names=CLASSES)
    return save_checkpoint(ckpt, folder / f"{name}.safetensors")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    lite = build_model("ssd_vgg_lite", **LITE_ARGS)
    pruned = build_model("ssd_vgg_lite", **LITE_ARGS)
    pruned.load_state_dict(lite.state_dict())
    selection = {"backbone.conv1_1": [0, 2], "backbone.conv4_3": [1, 5, 7], "backbone.fc7": [0, 3, 4, 9]}
    prune_filters(pruned, selection, dg=build_dependency_graph(pruned))
    vgg = build_model("vgg16_cifar", **VGG_ARGS)
    return {
        "lite": _save(folder, "lite", "ssd_vgg_lite", LITE_ARGS, lite),
        "pruned": _save(folder, "pruned", "ssd_vgg_lite", LITE_ARGS, pruned),
        "vgg": _save(folder, "vgg", "vgg16_cifar", VGG_ARGS, vgg),
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(path, folder / f"{name}.onnx") for name, path in checkpoints.items()}


def _session(metrics) -> ort.InferenceSession:
    return ort.InferenceSession(metrics["files"]["onnx"], providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["lite", "pruned"])
def test_detector_onnx_matches_pytorch_at_batch_1_and_3(checkpoints, exported, name):
    metrics = exported[name]
    ssd = load_checkpoint(checkpoints[name]).model.eval()
    network = SSDNetwork(ssd, normalize_input=True).eval()
    anchors = np.load(metrics["files"]["anchors"])
    assert anchors.dtype == np.float32 and np.array_equal(anchors, ssd_default_boxes(ssd).numpy())
    assert metrics["flops"] == count_flops(ssd, (128, 128)) and metrics["input_shape"] == ["batch", 3, 128, 128]
    assert onnx.load(metrics["files"]["onnx"]).opset_import[0].version == 17
    session = _session(metrics)
    assert [o.name for o in session.get_outputs()] == ["bbox_regression", "cls_logits"]
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        images = torch.rand(batch, 3, 128, 128, generator=generator)
        boxes, logits = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            ref_boxes, ref_logits = network(images)
        assert boxes.shape == (batch, len(anchors), 4) and logits.shape == (batch, len(anchors), len(CLASSES) + 1)
        np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=1e-4)


def test_pruned_export_is_smaller(exported):
    assert exported["pruned"]["flops"] < exported["lite"]["flops"]
    assert exported["pruned"]["onnx_size_bytes"] < exported["lite"]["onnx_size_bytes"]


@pytest.mark.parametrize("name", ["lite", "pruned", "vgg"])
def test_onnx_flops_equal_the_checkpoints_flops(checkpoints, exported, name):
    # The graphs hold exactly the ops count_flops counts (Conv, Gemm); the input normalisation and SSD's
    # L2Norm (Sub/Div/ReduceL2/Mul) are free in both counts, so they agree exactly, not just within 1%.
    model = load_checkpoint(checkpoints[name]).model
    counted = onnx_flops(exported[name]["files"]["onnx"])
    assert counted == exported[name]["onnx_flops"] == checkpoint_flops(model) == exported[name]["flops"]
    assert counted > 0


def test_onnx_flops_of_gemm_and_batched_matmul_match_torch(tmp_path):
    """Gemm with transA and a broadcast MatMul (dynamic batch counted as 1), against FlopCounterMode."""
    from onnx import TensorProto, helper
    from torch.utils.flop_counter import FlopCounterMode

    a, w, x, y = torch.rand(5, 3), torch.rand(4, 5), torch.rand(1, 3, 6, 7), torch.rand(7, 8)
    with FlopCounterMode(display=False) as counter:
        torch.addmm(torch.zeros(3, 4), a.t(), w.t())  # Gemm(transA=1, transB=1): 3x5 @ 5x4
        torch.matmul(x, y)  # (1, 3, 6, 7) @ (7, 8)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w"], ["gemm"], transA=1, transB=1),
         helper.make_node("MatMul", ["x", "y"], ["matmul"])],
        "products",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 7])],
        [helper.make_tensor_value_info("gemm", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("matmul", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [4, 5], w.flatten().tolist()),
                     helper.make_tensor("y", TensorProto.FLOAT, [7, 8], y.flatten().tolist())],
    )
    path = tmp_path / "products.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert onnx_flops(path) == counter.get_total_flops() == 2 * (3 * 4 * 5 + 3 * 6 * 8 * 7)


def test_onnx_flops_refuse_a_product_of_unknown_shape(tmp_path):
    from onnx import TensorProto, helper

    # NonZero's output length depends on the data: shape inference cannot know it.
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["where"]),
         helper.make_node("Cast", ["where"], ["where_float"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["where_float", "y"], ["out"], name="mystery")],
        "unknown", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("y", TensorProto.FLOAT, [1, 2], [1.0, 2.0])],
    )
    path = tmp_path / "unknown.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match="MatMul node mystery has no static shape"):
        onnx_flops(path)


def test_classifier_onnx_matches_pytorch(checkpoints, exported):
    metrics = exported["vgg"]
    model = load_checkpoint(checkpoints["vgg"]).model.eval()
    assert metrics["output_names"] == ["logits"] and "anchors" not in metrics["files"]
    sidecar = json.loads(open(metrics["files"]["json"]).read())
    assert sidecar["class_names"] == CLASSES and sidecar["task"] == "classification"
    session = _session(metrics)
    for batch in (1, 3):
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(images).numpy(), atol=1e-4, rtol=1e-4)


def _assert_same_detections(ours, reference, atol=1e-4):
    """Same detections in the same order, to float rounding."""
    assert len(ours["scores"]) == len(reference["scores"]) > 0
    np.testing.assert_array_equal(ours["labels"], reference["labels"].numpy())
    np.testing.assert_allclose(ours["scores"], reference["scores"].numpy(), atol=atol)
    np.testing.assert_allclose(ours["boxes"], reference["boxes"].numpy(), atol=atol * 100)


def _assert_best_detections_found(ours, reference, count=20, atol=1e-3):
    """Each of the reference's ``count`` best has a twin (label, score, box) among ours' ``count + 5`` best:
    scores here can lie 1e-7 apart, so outputs 1e-5 apart may swap neighbours."""
    labels, scores, boxes = (ours[k][: count + 5] for k in ("labels", "scores", "boxes"))
    for label, score, box in zip(*(reference[k][:count].numpy() for k in ("labels", "scores", "boxes")), strict=True):
        twin = (labels == label) & (np.abs(scores - score) < atol) & (np.abs(boxes - box).max(axis=1) < atol * 100)
        assert twin.any(), (label, score, box)


def test_sidecar_recipe_reproduces_ssd_detect(checkpoints, exported, tmp_path):
    metrics = exported["pruned"]
    sidecar = json.loads(open(metrics["files"]["json"]).read())
    anchors = np.load(metrics["files"]["anchors"])
    ssd = load_checkpoint(checkpoints["pruned"]).model.eval()
    # A real digits canvas cut to 96x80 (so that x and y scale differently); the deployment resizes it
    # to the model's 128x128 itself.
    devkit = write_digits_voc(tmp_path, image_size=96, num_images={"train": 1, "val": 1, "test": 1})
    image = VOCDetection(devkit, ["2007:train"], DIGIT_CLASSES, transforms=eval_transforms())[0][0]
    image = image.float().div(255).as_subclass(torch.Tensor)[:, :, :80]
    (reference,) = ssd_detect(ssd, image[None])

    # The recipe on the very network outputs ssd_detect post-processes: every detection, to rounding.
    batch, _ = preprocess_batch(ssd, image[None])
    with torch.no_grad():
        boxes, logits = SSDNetwork(ssd)(batch)
    (ours,) = postprocess_onnx_outputs(boxes.numpy(), logits.numpy(), anchors, sidecar, [(96, 80)])
    _assert_same_detections(ours, reference)

    # onnxruntime on the image resized by the deployment (outputs ~1e-5 from PyTorch's): the best detections.
    resized = F.interpolate(image[None], size=(128, 128), mode="bilinear", align_corners=False)
    onnx_boxes, onnx_logits = _session(metrics).run(None, {"images": resized.numpy()})
    (from_onnx,) = postprocess_onnx_outputs(onnx_boxes, onnx_logits, anchors, sidecar, [(96, 80)])
    _assert_best_detections_found(from_onnx, reference)


def test_sidecar_documents_post_processing(exported):
    sidecar = json.loads(open(exported["lite"]["files"]["json"]).read())
    detection = sidecar["detection"]
    assert detection["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert detection["num_anchors"] == len(np.load(exported["lite"]["files"]["anchors"]))
    assert any("softmax" in step for step in detection["postprocess"])
    assert sidecar["input"]["height"] == sidecar["input"]["width"] == 128


def test_refuses_to_overwrite_and_pickles(checkpoints, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export_onnx(checkpoints["vgg"], out)
    assert out.read_text() == "keep me" and not export_paths(out)["json"].exists()

    other = tmp_path / "other.onnx"
    export_paths(other)["anchors"].write_text("keep me too")  # a detector's sidecar is there already
    with pytest.raises(ConfigError, match="anchors.npy: already exists"):
        export_onnx(checkpoints["lite"], other)
    assert not other.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "other.anchors.npy"]

    pickled = tmp_path / "pickled.safetensors"
    torch.save(build_model("vgg16_cifar", **VGG_ARGS).state_dict(), pickled)
    with pytest.raises(CheckpointError, match="pickle"):
        export_onnx(pickled, tmp_path / "pickled.onnx")


def test_cli_export(checkpoints, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(checkpoints["vgg"]), "--format", "tflite"])
    assert result.exit_code == 2 and "'tflite' is not one of" in " ".join(result.output.split())
    out = tmp_path / "cli.onnx"
    result = runner.invoke(app, ["export", str(checkpoints["vgg"]), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnx_size_bytes" in result.output and out.is_file() and out.with_suffix(".json").is_file()


# --------------------------------------------------------------------------------------------
# The deployment graph: BatchNorm folded, channels-last, post-processing settings, ONNX Runtime parity


def _with_trained_like_batchnorm(model):
    """BatchNorm statistics and scales away from their initial 0 / 1, so that folding them changes weights."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("model_name,args,size", [("ssd_vgg_lite", LITE_ARGS, 128), ("vgg16_cifar", VGG_ARGS, 32)])
def test_fold_batchnorm_keeps_outputs_and_flops(model_name, args, size):
    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model(model_name, **args))
    folded = fold_batchnorm(model)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert count_flops(folded, (size, size)) == count_flops(model, (size, size))
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    network, folded_network = deployment_network(model, channels_last=False), deployment_network(model)
    with torch.no_grad():
        reference = SSDNetwork(model, normalize_input=True)(images) if model_name == "ssd_vgg_lite" else (model(images),)
        plain = folded_network(images.contiguous(memory_format=torch.channels_last))
        plain = plain if isinstance(plain, tuple) else (plain,)
        unfolded = network(images)
        unfolded = unfolded if isinstance(unfolded, tuple) else (unfolded,)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in folded_network.parameters() if p.dim() == 4)
    for ours, ref, other in zip(plain, reference, unfolded, strict=True):
        assert float((ours - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
        assert float((other - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))


def test_postprocess_settings_travel_with_checkpoint_and_export(tmp_path):
    torch.manual_seed(0)
    ckpt = Checkpoint(model=build_model("ssd_vgg_lite", **LITE_ARGS), model_name="ssd_vgg_lite", model_args=LITE_ARGS,
                      class_names=CLASSES, extra={"postprocess": {"score_threshold": 0.2, "pre_nms_top_k": 50}})
    path = save_checkpoint(ckpt, tmp_path / "post.safetensors")
    loaded = load_checkpoint(path).model
    assert (loaded.score_thresh, loaded.topk_candidates) == (0.2, 50)
    metrics = export_onnx(path, tmp_path / "post.onnx")
    sidecar, _ = read_sidecar(metrics["files"]["onnx"])
    assert (sidecar["detection"]["score_thresh"], sidecar["detection"]["topk_candidates"]) == (0.2, 50)
    props = {p.key: p.value for p in onnx.load(metrics["files"]["onnx"]).metadata_props}
    assert (float(props["prunepipe.score_threshold"]), int(props["prunepipe.pre_nms_top_k"])) == (0.2, 50)
    # At most 50 boxes per class and image reach NMS: at most 50 detections of each class.
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    detections = onnx_detect(onnx_session(metrics["files"]["onnx"]), sidecar, np.load(metrics["files"]["anchors"]), images)
    for found in detections:
        assert len(found["scores"]) and bool((found["scores"] > 0.2).all())
        assert int(torch.bincount(found["labels"]).max()) <= 50

    bad = Checkpoint(model=build_model("ssd_vgg_lite", **LITE_ARGS), model_name="ssd_vgg_lite", model_args=LITE_ARGS,
                     class_names=CLASSES, extra={"postprocess": {"score_threshold": 2, "pre_nms_top_k": 50}})
    with pytest.raises(CheckpointError, match="score_threshold must be a number in"):
        load_checkpoint(save_checkpoint(bad, tmp_path / "bad.safetensors"))


def test_an_export_records_the_onnx_runtime_layout_it_is_opened_in(tmp_path):
    # ONNX Runtime's blocked layout (its top optimisation level) pads channels to the vector block, so a
    # pruned network can run faster in the plain one: the export records which, and sessions open in it.
    torch.manual_seed(0)
    ckpt = Checkpoint(model=build_model("ssd_vgg_lite", **LITE_ARGS), model_name="ssd_vgg_lite", model_args=LITE_ARGS,
                      class_names=CLASSES)
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    levels = {"nchwc": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "nchw": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}

    timed = export_onnx(path, tmp_path / "timed.onnx")
    sidecar, _ = read_sidecar(timed["files"]["onnx"])
    runtime = sidecar["onnxruntime"]
    assert runtime["chosen_by"] == "timed at export" and set(runtime["network_ms"]) == set(ORT_LAYOUTS)
    assert runtime["layout"] == min(runtime["network_ms"], key=runtime["network_ms"].get) == timed["onnxruntime_layout"]
    props = {p.key: p.value for p in onnx.load(timed["files"]["onnx"]).metadata_props}
    assert props["prunepipe.onnxruntime_layout"] == runtime["layout"]

    for layout in ORT_LAYOUTS:
        fixed = export_onnx(path, tmp_path / f"{layout}.onnx", layout=layout)
        assert read_sidecar(fixed["files"]["onnx"])[0]["onnxruntime"] == {"layout": layout, "chosen_by": "export argument"}
        session = onnx_session(fixed["files"]["onnx"])
        assert session.get_session_options().graph_optimization_level == levels[layout]
        outputs = session.run(None, {"images": np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)})
        assert outputs[1].shape[0] == 2
    # Both layouts compute the same network.
    images = {"images": np.random.default_rng(1).random((2, 3, 128, 128), dtype=np.float32)}
    blocked, plain = (onnx_session(tmp_path / f"{layout}.onnx").run(None, images) for layout in ORT_LAYOUTS)
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(blocked, plain, strict=True))

    # A checkpoint that measured its deployment already names its layout: no second timing.
    measured = save_checkpoint(Checkpoint(model=ckpt.model, model_name="ssd_vgg_lite", model_args=LITE_ARGS,
                                          class_names=CLASSES, metrics={"latency_ort_layout": "nchw"}),
                               tmp_path / "measured.safetensors")
    recorded = read_sidecar(export_onnx(measured, tmp_path / "measured.onnx")["files"]["onnx"])[0]["onnxruntime"]
    assert recorded == {"layout": "nchw", "chosen_by": "the checkpoint's latency measurement"}

    with pytest.raises(ConfigError, match="ONNX Runtime layout 'nhwc' is not one of nchwc, nchw"):
        export_onnx(path, tmp_path / "bad.onnx", layout="nhwc")
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.json").exists()
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "cli.onnx"), "--layout", "nchw"])
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "cli.onnx")[0]["onnxruntime"]["layout"] == "nchw"


def test_onnx_runtime_matches_pytorch_on_the_digits_test_split(tmp_path, digits_devkit):
    """Boxes, scores and labels of ONNX Runtime and PyTorch on every test image of the tiny digits devkit."""
    from compression.config import load_config
    from compression.data.loaders import build_loader

    args = {**LITE_ARGS, "image_size": 64}
    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model("ssd_vgg_lite", **args))
    path = save_checkpoint(Checkpoint(model=model, model_name="ssd_vgg_lite", model_args=args, class_names=CLASSES),
                           tmp_path / "digits.safetensors")
    exported = export_onnx(path, tmp_path / "digits.onnx")
    cfg = load_config("default", [f"data.root={digits_devkit}", "data.builtin=null", "model.image_size=64",
                                  "data.eval_batch_size=4"])
    parity = onnx_parity(path, exported["files"]["onnx"], build_loader(cfg.data, "test", train=False, image_size=64))
    assert parity["images"] == 8 and parity["detections"] > 0
    assert parity["unpaired"] == 0 and parity["label_mismatches"] == 0
    assert parity["max_abs_diff_outputs"] < 1e-4
    assert parity["max_abs_diff_boxes"] < 1e-2 and parity["max_abs_diff_scores"] < 1e-4


def test_the_timed_deployment_path_detects_what_pytorch_does_and_every_checkpoint_records_its_latency(
        tmp_path, digits_devkit):
    """What ``deployment_latency`` times (and ``--budget latency=`` reads) is the deployed detector itself: ONNX
    Runtime plus the batched post-processing returns PyTorch's detections on the digits test images."""
    from compression.config import load_config
    from compression.measure import add_ratios, measure, split_images

    args = {**LITE_ARGS, "image_size": 64}
    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model("ssd_vgg_lite", **args)).eval()
    cfg = load_config("default", [f"data.root={digits_devkit}", "data.builtin=null", "model.image_size=64",
                                  "data.eval_batch_size=4"])
    images = split_images(cfg, 8, (64, 64))
    ours = deployment_forward(model, images)()
    with torch.inference_mode():
        reference = ssd_detect(model, images)
    assert sum(len(d["boxes"]) for d in reference) > 0
    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)
    timing = deployment_latency(model, images, 3, warmup=1, runs=2)
    assert timing["batch_size"] == 3 and timing["clock"] == "thread_cpu" and timing["median_ms"] > 0
    assert timing["layout"] in ORT_LAYOUTS
    assert deployment_latency(model, images, 3, warmup=1, runs=2, layout="nchw")["layout"] == "nchw"
    # A network against itself, end to end in alternation: 1x, each in the layout asked for.
    same = deployment_speedup(model, model, images, 4, layout="nchw", rounds=3)
    assert abs(same["ratio"] - 1) <= 0.25 and same["base_layout"] == same["model_layout"] == "nchw", same

    ckpt = Checkpoint(model=model, model_name="ssd_vgg_lite", model_args=args, class_names=CLASSES)
    base = measure(ckpt, cfg)
    assert 0 < base["latency_ort_net_b32_ms"] < base["latency_ort_b32_ms"]  # the network is part of the whole
    assert base["latency_ort_layout"] in ORT_LAYOUTS
    again = dict(base)
    add_ratios(again, base, "detection")
    assert again["latency_ort_b32_ms_ratio"] == pytest.approx(1.0)


def _resize_voc_image(devkit, image_id: str, size: tuple[int, int]) -> None:
    """Give one image of a VOC devkit another (width, height), its annotation's size and boxes with it."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    root = devkit / "VOC2007"
    jpg, xml = root / "JPEGImages" / f"{image_id}.jpg", root / "Annotations" / f"{image_id}.xml"
    with Image.open(jpg) as image:
        old = image.size
        image.convert("RGB").resize(size).save(jpg)
    tree = ET.parse(xml)
    tree.find("size/width").text, tree.find("size/height").text = str(size[0]), str(size[1])
    for box in tree.iter("bndbox"):
        for tag, axis in (("xmin", 0), ("xmax", 0), ("ymin", 1), ("ymax", 1)):
            element = box.find(tag)
            element.text = str(max(1, round(float(element.text) * size[axis] / old[axis])))
    tree.write(xml)


def test_latency_is_timed_on_images_of_other_sizes_than_the_models_input(tmp_path, digits_devkit):
    """Real VOC's images vary in size, and a model may work at another size than its data's: the timed batch
    holds the split's images resized to the model's input size (as the SSD resizes them), so stacking them
    and feeding the fixed-size ONNX network works, where it failed before."""
    import shutil

    from compression.config import load_config
    from compression.measure import measure, split_images

    devkit = shutil.copytree(digits_devkit, tmp_path / "VOCdevkit")
    test_ids = (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    _resize_voc_image(devkit, test_ids[1], (96, 80))
    cfg = load_config("default", [f"data.root={devkit}", "data.builtin=null", "model.image_size=48",
                                  "data.eval_batch_size=4"])
    original = VOCDetection(devkit, ["2007:test"], CLASSES, transforms=eval_transforms())[1][0]
    assert tuple(original.shape[-2:]) == (80, 96)
    images = split_images(cfg, 3, (48, 48))
    assert images.shape == (3, 3, 48, 48)
    want = F.interpolate(original.float()[None], size=(48, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(images[1], want)

    args = {**LITE_ARGS, "image_size": 48}
    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model("ssd_vgg_lite", **args)).eval()
    metrics = measure(Checkpoint(model=model, model_name="ssd_vgg_lite", model_args=args, class_names=CLASSES), cfg)
    assert 0 < metrics["latency_ort_net_b32_ms"] < metrics["latency_ort_b32_ms"]


def test_mlflow_model_runs_the_deployment_graph_with_the_stored_post_processing(tmp_path):
    from mlflow.pyfunc import PythonModelContext

    from tasks.mlflow_model import PrunepipeModel

    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model("ssd_vgg_lite", **LITE_ARGS))
    settings = {"score_threshold": 0.095, "pre_nms_top_k": 20}
    path = save_checkpoint(Checkpoint(model=model, model_name="ssd_vgg_lite", model_args=LITE_ARGS, class_names=CLASSES,
                                      extra={"postprocess": settings}), tmp_path / "served.safetensors")
    served = PrunepipeModel()
    served.load_context(PythonModelContext(artifacts={"checkpoint": str(path)}, model_config={}))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.model.modules())
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    rows = served.predict(None, images.numpy())
    reference = ssd_detect(load_checkpoint(path).model.eval(), images)
    assert len(rows) == sum(len(found["scores"]) for found in reference) > 0
    assert bool((rows["score"] > 0.095).all()) and int(rows.groupby(["image", "label"]).size().max()) <= 20
    np.testing.assert_allclose(np.sort(rows["score"].to_numpy()),
                               np.sort(torch.cat([found["scores"] for found in reference]).numpy()), atol=1e-4)
