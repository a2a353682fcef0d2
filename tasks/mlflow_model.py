"""The registered model: a prunepipe safetensors checkpoint served as an MLflow pyfunc ("models from code").

MLflow logs this file as the model's code (nothing is pickled) and the checkpoint as an artifact;
``mlflow.pyfunc.load_model(uri).predict(images)`` takes a float32 array (N, 3, H, W) with values in [0, 1]
and returns a DataFrame: one row per detection (image, label, score, x1, y1, x2, y2) for a detector, one
row per image (image, label, score) for a classifier. ``label`` is the class name. It runs the deployment
graph (``compression.export.fold_batchnorm``, channels-last) with the post-processing settings stored in
the checkpoint (``export.score_threshold``, ``export.pre_nms_top_k``).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class PrunepipeModel(PythonModel):
    def load_context(self, context):
        from compression.checkpoint import load_checkpoint
        from compression.export import fold_batchnorm

        self.checkpoint = load_checkpoint(context.artifacts["checkpoint"])
        # The deployment graph: BatchNorm folded into the convs, channels-last tensors on the CPU.
        self.model = fold_batchnorm(self.checkpoint.model.cpu().float()).to(memory_format=torch.channels_last)

    # No type hints on predict: MLflow would turn them into a (list-typed) schema.
    def predict(self, context, model_input, params=None):
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.dim() == 3:
            images = images.unsqueeze(0)
        names = ["background", *self.checkpoint.class_names]
        with torch.inference_mode():
            if self.checkpoint.task == "detection":
                from compression.ssd_fast import ssd_detect

                rows = []
                for index, found in enumerate(ssd_detect(self.model, images, channels_last=True)):
                    for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                                 found["labels"].tolist(), strict=True):
                        rows.append({"image": index, "label": names[label], "score": float(score),
                                     "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]})
                columns = ["image", "label", "score", "x1", "y1", "x2", "y2"]
                return pd.DataFrame(rows, columns=columns)
            probabilities = self.model(images.contiguous(memory_format=torch.channels_last)).softmax(dim=1)
            scores, labels = probabilities.max(dim=1)
        return pd.DataFrame({"image": range(len(labels)), "label": [self.checkpoint.class_names[i] for i in labels],
                             "score": scores.tolist()})


mlflow.models.set_model(PrunepipeModel())
