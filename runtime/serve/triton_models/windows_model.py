"""Triton Python-backend model written by `clipfuse triton-repo --windows-backend python`:
runs the exported graph (beside this file, with its manifest) with clipfuse's own backends, for
Triton builds without the ONNX Runtime / TensorRT backends. windows [B, S, S, 3] -> scores."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from clipfuse.runtime.backends.base import open_backend  # noqa: E402
from clipfuse.runtime.artifact import open_artifact  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = os.path.join(HERE, params["clipfuse_artifact"])
        # `triton-repo` hashed the artifact when it wrote the repository (unless --no-verify); here
        # the kind and the contract (cheap) catch a manifest swapped or edited in the repository.
        opened = open_artifact(artifact, kinds=("image", "frame"), verify=False)
        self.backend = open_backend(artifact, opened.manifest, params.get("clipfuse_backend", "auto"))
        self.input = opened.meta.inputs[0].name
        self.outputs = [t.name for t in opened.meta.outputs]  # a frame graph has several

    def execute(self, requests):
        # Triton's dynamic batcher hands several requests at once: one backend call for all.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        try:
            results = self.backend.run({self.input: np.concatenate(arrays, axis=0)})
        except Exception as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in requests]
        responses, start = [], 0
        for arr in arrays:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name][start:start + len(arr)]))
                       for name in self.outputs]
            start += len(arr)
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.backend.close()
