"""PyTorch reference backend (`--backend torch`): the exporter's eager model, rebuilt from the manifest.

For parity checks and benchmarks only (needs the `export` extra: torch + open_clip). It opens the
same manifest as the ONNX/engine artifact but never reads the graph: the model is rebuilt from the
recorded weights/seed/head, so it is an independent check of the exported graph.

It lives in the export package (it IS the exporter's reference) and registers with the runtime's
backend registry through the `clipfuse.backends` entry-point group (pyproject.toml), so the runtime
never imports clipfuse.export. Torch is imported when the backend is opened, not here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from clipfuse.runtime.backends.base import Backend
from clipfuse.runtime.errors import ClipfuseError


class TorchReferenceBackend(Backend):
    name = "torch"
    suffixes = (".onnx", ".engine")    # the manifest beside either names the weights

    def __init__(self, artifact: Path, manifest: dict, backend: str = "torch", **options) -> None:
        super().__init__(artifact, manifest, **options)
        try:
            import torch  # noqa: F401
            from .reference import ReferenceModel
        except ImportError as exc:
            raise ClipfuseError(f"backend 'torch' needs the export extra (pip install 'clipfuse[export]'): "
                                f"{exc}") from None
        self.model = ReferenceModel.from_manifest(manifest)
        self.output_name = self.meta.output_name

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch
        image = feeds["image"]
        if "class_embeddings" in feeds:
            # Dynamic-vocabulary graph semantics: one output row per embedding row (no synonym max).
            rows = np.asarray(feeds["class_embeddings"], dtype=np.float32)
            self.model.text = torch.from_numpy(rows.copy())
            self.model.vocabulary = [[str(r)] for r in range(len(rows))]
            self.model.class_of_name = list(range(len(rows)))
        with torch.inference_mode():
            scores = self.model(image)
        return {self.output_name: np.asarray(scores, dtype=np.float32)}
