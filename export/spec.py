"""`ImageExportSpec`: every parameter of one fused image graph, as one typed value.

Modelled on open_clip's CLIPVisionCfg: the CLI (`clipfuse export`), the benchmarks and the tests
build one, the exporter (`clipfuse.export.api.build_fused` / `export_image_graph`) consumes it, its
fields are written into the manifest (`to_manifest`), and the PyTorch reference and the torch
backend rebuild the same model from a manifest (`from_manifest`). Torch-free.

    spec = ImageExportSpec("sclip", model="ViT-B-16", classes=[["sky"], ["tree"]], size=448)
    export_image_graph(spec, "engines/sclip")        # -> engines/sclip.onnx + .json
    same = ImageExportSpec.from_manifest(read_manifest("engines/sclip.json"))

`pretrained=None` and `size=None` mean the method's defaults (`resolved()` fills them in, from
clipfuse.runtime.methods: default weights and window).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

from clipfuse.runtime.methods import get_method

OPSET = 17
VOCAB_MODES = ("baked", "dynamic")


@dataclass(frozen=True)
class ImageExportSpec:
    method: str                                    # a key of clipfuse.runtime.methods.METHODS
    model: str = "ViT-B-16"                        # open_clip model name
    pretrained: Optional[str] = None               # tag, checkpoint file or "none"; None: the method's
    classes: Sequence[Sequence[str]] = ()          # vocabulary: one list of synonyms per class
    size: Optional[int] = None                     # export (= window) size; None: the method's window
    templates: str = "imagenet80"
    vocab_mode: str = "baked"                      # "baked" class embeddings or a "dynamic" input
    heads_checkpoint: Optional[str] = None         # the method's own trained weights (`--heads`)
    head_params: Dict[str, object] = field(default_factory=dict)   # overrides of the method's preset
    quick_gelu: Optional[bool] = None              # None: decided from the pretrained tag
    seed: int = 0                                  # random init with pretrained "none"
    opset: int = OPSET
    allow_duplicates: bool = False                 # one name in two classes
    # A frame graph (clipfuse.export.frame_graph) for frames of this (H, W) instead of a window
    # graph, with these protocol fields baked in (logit_scale, prob_thd, area_thd, short_side, stride).
    frame: Optional[Tuple[int, int]] = None
    frame_protocol: Dict[str, float] = field(default_factory=dict)

    def resolved(self) -> "ImageExportSpec":
        """The spec with the method's defaults filled in (pretrained, size)."""
        method = get_method(self.method)
        return replace(self,
                       pretrained=method.default_pretrained if self.pretrained is None else self.pretrained,
                       size=method.protocol_on(self.model).window if self.size is None else int(self.size))

    def to_manifest(self) -> dict:
        """The manifest keys this spec decides (the exporter adds what the build found out)."""
        spec = self.resolved()
        return {
            "model": spec.model,
            "pretrained_source": spec.pretrained,
            "seed": spec.seed,
            "head": {"name": spec.method, "params": dict(spec.head_params)},
            "heads_checkpoint_source": spec.heads_checkpoint,
            "classes": [list(names) for names in spec.classes],
            "templates": spec.templates,
            "vocab": spec.vocab_mode,
            "input_size": [spec.size, spec.size],
            "opset": spec.opset,
        }

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ImageExportSpec":
        """The spec that rebuilds the exported model (same weights source, seed, vocabulary, size).

        Head parameters are the manifest's effective ones restricted to those the method takes
        (the manifest also records derived constants, e.g. CLIP-DINOiser's thresholds).
        """
        method = get_method(manifest["head"]["name"])
        params = {k: v for k, v in manifest["head"]["params"].items() if k in method.default_head_params()}
        return cls(
            method=method.name,
            model=manifest["model"],
            pretrained=manifest.get("pretrained_source") or manifest["pretrained"],
            classes=[list(names) for names in manifest["classes"]],
            size=int(manifest["input_size"][0]),
            templates=manifest["templates"],
            vocab_mode=manifest.get("vocab", "baked"),
            heads_checkpoint=manifest.get("heads_checkpoint_source"),
            head_params=params,
            quick_gelu=manifest.get("quick_gelu"),
            seed=manifest.get("seed", 0),
            opset=manifest.get("opset", OPSET),
            allow_duplicates=True,     # validated at export; SCLIP's files repeat names
            # a frame graph's baked protocol is in its manifest; the spec keeps its frame size
            frame=tuple(int(v) for v in manifest["frame_size"]) if manifest.get("kind") == "frame" else None,
        )
