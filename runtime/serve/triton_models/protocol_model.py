"""Triton Python-backend model written by `clipfuse triton-repo`: the clipfuse protocol (BLS).

image [H, W, 3] uint8 -> labels [H, W] int32, confidence [H, W] float32. Triton batches requests
of equal image size; all windows of a batch go to the windows model (parameter
clipfuse_windows_model) in BLS requests of at most clipfuse_window_batch windows. Class names and
the protocol are the config's parameters. Uses the copy of clipfuse.runtime beside this file.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.methods import Protocol  # noqa: E402
from clipfuse.runtime.serve.core import (INPUT, OUTPUTS, PARAM_PROTOCOL, PARAM_WINDOW,  # noqa: E402
                                         check_images, segment_batch)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.protocol = Protocol.from_dict(json.loads(params[PARAM_PROTOCOL]))
        self.window = int(params[PARAM_WINDOW])
        self.windows_model = params["clipfuse_windows_model"]
        self.window_batch = int(params["clipfuse_window_batch"])
        self.max_pixels = int(params["clipfuse_max_pixels"])
        self.scores_output = params["clipfuse_scores_output"]

    def _infer_windows(self, crops):
        request = pb_utils.InferenceRequest(model_name=self.windows_model,
                                            requested_output_names=[self.scores_output],
                                            inputs=[pb_utils.Tensor(INPUT, np.ascontiguousarray(crops))])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.windows_model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.scores_output).as_numpy()

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []
        for i, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy()
            try:
                check_images(images, self.max_pixels)
                good.append((i, images))
            except ClipfuseError as exc:  # this request only; the others of the batch go on
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if not good:
            return responses
        try:
            results, _ = segment_batch([img for _, arr in good for img in arr], self._infer_windows,
                                       self.protocol, self.window, self.window_batch)
        except Exception as exc:
            for i, _ in good:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            return responses
        start = 0
        for i, arr in good:
            chunk = results[start:start + len(arr)]
            start += len(arr)
            labels = np.stack([r[0] for r in chunk]).astype(np.int32)
            confidence = np.stack([r[1] for r in chunk]).astype(np.float32)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(OUTPUTS[0], labels), pb_utils.Tensor(OUTPUTS[1], confidence)])
        return responses
