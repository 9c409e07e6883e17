"""Export specs: every parameter of one exported graph, as one typed value per artifact kind.

`ImageExportSpec` (fused image/frame graphs), `TextExportSpec` (the text encoder),
`ReferExportSpec` (Global-Local CLIP's refer-global + refer-local graphs, and the text graph).
Each exporter goes spec -> build -> one writer (clipfuse.export.artifacts.graph_with_manifest),
and `from_manifest` rebuilds the spec of an exported graph from its (typed) manifest.

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

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import FrameManifest, ImageManifest, ReferManifest, TextManifest, parse_manifest
from clipfuse.runtime.methods import get_method

OPSET = 17
# torch.onnx's exporters: "legacy" (TorchScript; the default, whose graphs the identity test pins)
# and "dynamo" (torch.export + onnxscript; opset >= 18). The dynamo exporter writes the weights
# straight from torch's storage into an external-data file; the legacy one serialises the whole
# model in memory (several copies of the weights), which sets the export's peak on big towers.
EXPORTERS = ("legacy", "dynamo")
DYNAMO_MIN_OPSET = 18
VOCAB_MODES = ("baked", "dynamic")
PRECISIONS = ("fp32", "fp16")        # of text and refer graphs (image graphs: fp16 at build time)


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
    exporter: str = "legacy"                       # one of EXPORTERS

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
    def from_manifest(cls, manifest: "ImageManifest | dict") -> "ImageExportSpec":
        """The spec that rebuilds the exported model (same weights source, seed, vocabulary, size).

        Head parameters are the manifest's effective ones restricted to those the method takes
        (the manifest also records derived constants, e.g. CLIP-DINOiser's thresholds).
        """
        meta = parse_manifest(manifest)
        if not isinstance(meta, ImageManifest) or meta.head is None or meta.model is None:
            raise ClipfuseError(f"a {meta.kind!r} manifest does not describe an image graph export")
        method = get_method(meta.head.name)
        params = {k: v for k, v in meta.head.params.items() if k in method.default_head_params()}
        return cls(
            method=method.name,
            model=meta.model,
            pretrained=meta.pretrained_source or meta.pretrained,
            classes=[list(names) for names in meta.classes],
            size=meta.window,
            templates=meta.templates or "imagenet80",
            vocab_mode=meta.vocab,
            heads_checkpoint=meta.heads_checkpoint_source,
            head_params=params,
            quick_gelu=meta.quick_gelu,
            seed=meta.seed or 0,
            opset=meta.opset or OPSET,
            allow_duplicates=True,     # validated at export; SCLIP's files repeat names
            # a frame graph's baked protocol is in its manifest; the spec keeps its frame size
            frame=tuple(meta.frame_size) if isinstance(meta, FrameManifest) else None,
        )


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ClipfuseError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class TextExportSpec:
    """CLIP's text encoder graph (clipfuse.export.text_graph.export_text): tokens -> features.

    Random weights (pretrained "none") come from `seed` exactly as the image exporter draws
    them, so an image graph and a text graph of one seed share one CLIP."""

    model: str = "ViT-B-16"
    pretrained: str = "none"
    quick_gelu: Optional[bool] = None
    seed: int = 0
    opset: int = OPSET
    precision: str = "fp32"

    def validate(self) -> "TextExportSpec":
        _check_precision(self.precision)
        return self

    def to_manifest(self) -> dict:
        """The manifest keys this spec decides (the weights' resolved tag and quick_gelu come
        from the loaded model)."""
        return {"model": self.model, "pretrained_source": self.pretrained, "seed": self.seed,
                "opset": self.opset, "precision": self.precision}

    @classmethod
    def from_manifest(cls, manifest: "TextManifest | dict") -> "TextExportSpec":
        meta = parse_manifest(manifest)
        if not isinstance(meta, TextManifest) or meta.model is None:
            raise ClipfuseError(f"a {meta.kind!r} manifest does not describe a text graph export")
        return cls(model=meta.model, pretrained=meta.pretrained_source or meta.pretrained or "none",
                   quick_gelu=meta.quick_gelu, seed=meta.seed or 0, opset=meta.opset or OPSET,
                   precision=meta.precision or "fp32")


@dataclass(frozen=True)
class ReferExportSpec:
    """Global-Local CLIP's two image graphs (+ the text graph when `text`), exported by
    clipfuse.export.refer_export.export_refer from one loaded CLIP."""

    model: str = "ViT-B-32"
    pretrained: str = "openai"
    normalization: str = "imagenet"        # a key of clipfuse.export.refer_graphs.NORMALIZATIONS
    masked_blocks: int = 3
    alpha: float = 0.95
    fill: str = "public"
    precision: str = "fp32"
    quick_gelu: Optional[bool] = None
    seed: int = 0
    opset: int = OPSET
    text: bool = True

    def validate(self) -> "ReferExportSpec":
        _check_precision(self.precision)
        if self.opset < 17:
            raise ClipfuseError("--opset must be >= 17 (LayerNormalization maps to TensorRT's normalisation layer)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ClipfuseError(f"--alpha must be in [0, 1], got {self.alpha}")
        return self

    def text_spec(self) -> TextExportSpec:
        return TextExportSpec(model=self.model, pretrained=self.pretrained, quick_gelu=self.quick_gelu,
                              seed=self.seed, opset=self.opset, precision=self.precision)

    def refer_section(self) -> dict:
        """The `refer` section of both graphs' manifests (clipfuse.runtime.refer.pipeline)."""
        from clipfuse.runtime.refer.pipeline import refer_section
        return refer_section(self.alpha, self.masked_blocks, self.fill)

    def to_manifest(self) -> dict:
        """The manifest keys this spec decides, in either graph's manifest."""
        return {"model": self.model, "pretrained_source": self.pretrained, "seed": self.seed,
                "opset": self.opset, "precision": self.precision, "refer": self.refer_section()}

    @classmethod
    def from_manifest(cls, manifest: "ReferManifest | dict") -> "ReferExportSpec":
        """The spec of the export a refer-global or refer-local manifest came from (`text` is
        not recorded in them: True, the default)."""
        meta = parse_manifest(manifest)
        if not isinstance(meta, ReferManifest) or meta.model is None or meta.refer is None:
            raise ClipfuseError(f"a {meta.kind!r} manifest does not describe a refer graph export")
        refer = meta.refer
        return cls(model=meta.model, pretrained=meta.pretrained_source or meta.pretrained or "none",
                   normalization=str((meta.normalization or {}).get("name", "imagenet")),
                   masked_blocks=int(refer.get("masked_blocks", 3)), alpha=float(refer.get("alpha", 0.95)),
                   fill=str(refer.get("fill", "public")), precision=meta.precision or "fp32",
                   quick_gelu=meta.quick_gelu, seed=meta.seed or 0, opset=meta.opset or OPSET)
