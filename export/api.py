"""Export one fused image graph (ONNX + manifest) per model, head, vocabulary and resolution."""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import io_spec, manifest_path_for, new_manifest
from clipfuse.runtime.methods import get_method
from clipfuse.runtime.templates import get_templates
from clipfuse.runtime.vocab import Vocabulary, class_of_name, flat_names, validate

from .artifacts import graph_with_manifest
from .classifier import CosineClassifier
from .fused import FusedSegmenter
from .heads import POS_RULES, build_head
from .text_embed import encode_names
from .trunk import CLIP_MEAN, CLIP_STD, VisionTrunk
from .weights import LoadedClip, load_clip

OPSET = 17
VOCAB_MODES = ("baked", "dynamic")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"clipfuse: {msg}", file=sys.stderr, flush=True)


def check_size(size: int, patch: int) -> None:
    if size <= 0 or size % patch:
        raise ClipfuseError(f"--size {size} is not a positive multiple of the patch size {patch}")


def patch_size_of(model: str) -> int:
    from .weights import _check_model_name, _open_clip
    cfg = _check_model_name(_open_clip(), model)
    return int(cfg["vision_cfg"]["patch_size"])


@dataclass
class FusedBuild:
    """Everything that went into a fused module; the manifest is written from it."""
    module: FusedSegmenter
    clip: LoadedClip
    head: str
    head_params: dict
    weights_info: dict
    vocab: Vocabulary
    templates: str
    vocab_mode: str
    size: int
    grid: tuple
    embed_dim: int
    name_embeddings: torch.Tensor


def build_fused(head: str, model: str = "ViT-B-16", pretrained: Optional[str] = None,
                classes: Optional[Vocabulary] = None, size: Optional[int] = None, templates: str = "imagenet80",
                vocab: str = "baked", heads_ckpt: Optional[str] = None, head_params: Optional[dict] = None,
                quick_gelu: Optional[bool] = None, seed: int = 0, quiet: bool = True,
                clip: Optional[LoadedClip] = None, allow_duplicates: bool = False) -> FusedBuild:
    """Validate everything cheap first, then load weights and assemble the fused module."""
    spec = get_method(head)
    pretrained = spec.default_pretrained if pretrained is None else pretrained
    size = spec.default_size if size is None else int(size)
    if vocab not in VOCAB_MODES:
        raise ClipfuseError(f"--vocab must be one of {', '.join(VOCAB_MODES)}, not {vocab!r}")
    template_list = get_templates(templates)
    vocabulary = validate([list(names) for names in (classes or [])], "vocabulary", allow_duplicates)
    check_size(size, patch_size_of(model))
    from .weights import check_pretrained
    check_pretrained(model, pretrained)
    if heads_ckpt not in (None, "none"):
        if head != "clip-dinoiser":
            raise ClipfuseError(f"--heads only applies to clip-dinoiser, not {head!r}")
        if not Path(heads_ckpt).is_file():
            raise ClipfuseError(f"CLIP-DINOiser heads checkpoint not found: {heads_ckpt}")

    if clip is None:
        _log(f"loading {model} (pretrained: {pretrained})", quiet)
        clip = load_clip(model, pretrained, quick_gelu=quick_gelu, seed=seed)
    visual = clip.model.visual
    patch = visual.conv1.kernel_size[0]
    grid = (size // patch, size // patch)
    head_params = dict(head_params or {})
    if head == "clip-dinoiser":
        # The rule forces class 0 where the background head sees no object: only meaningful when
        # class 0 IS background; otherwise it would overwrite a real class.
        head_params["background_rule"] = (head_params.get("background_rule", True)
                                          and vocabulary[0][0].lower() == "background")
    dense_head, weights_info = build_head(head, visual, grid, head_params, heads_ckpt, seed=clip.seed)
    trunk = VisionTrunk(visual, (size, size), POS_RULES[head], guide_block=dense_head.guide_block)

    names = flat_names(vocabulary)
    _log(f"encoding {len(names)} class names x {len(template_list)} templates", quiet)
    import open_clip
    tokenizer = open_clip.get_tokenizer(clip.model_name)
    embeddings = encode_names(clip.model, tokenizer, names, template_list, progress=not quiet)
    if vocab == "dynamic":
        classifier = CosineClassifier(None, None)
    else:
        classifier = CosineClassifier(embeddings, class_of_name(vocabulary))
    module = FusedSegmenter(trunk, dense_head, classifier).eval()
    return FusedBuild(module=module, clip=clip, head=head, head_params=dense_head.params(),
                      weights_info=weights_info, vocab=vocabulary, templates=templates, vocab_mode=vocab,
                      size=size, grid=grid, embed_dim=int(embeddings.shape[1]), name_embeddings=embeddings)


def image_manifest(build: FusedBuild, onnx_path: Path, pretrained_arg: str, heads_ckpt: Optional[str],
                   opset: int) -> dict:
    spec = get_method(build.head)
    h, w = build.grid
    n_rows = "classes" if build.vocab_mode == "dynamic" else len(build.vocab)
    inputs = [io_spec("image", "uint8", ["batch", build.size, build.size, 3], "NHWC",
                      description="RGB pixels, 0..255; CLIP normalisation happens in the graph")]
    if build.vocab_mode == "dynamic":
        inputs.append(io_spec("class_embeddings", "float32", ["classes", build.embed_dim], "KE",
                              description="L2-normalised text embedding per class name"))
    outputs = [io_spec("scores", "float32", ["batch", n_rows, h, w], "NCHW",
                       description=f"{spec.protocol.score_type} score per class at patch resolution")]
    protocol = spec.protocol.to_dict()
    if build.size != spec.protocol.window:  # a non-default export size is a new window size
        protocol.update(window=build.size, stride=build.size // 2,
                        short_side=max(spec.protocol.short_side, build.size))
    protocol["background_rule"] = bool(build.head_params.get("background_rule", False))
    return new_manifest(
        "image",
        model=build.clip.model_name,
        pretrained=build.clip.pretrained_id,
        pretrained_source=pretrained_arg,
        seed=build.clip.seed,
        quick_gelu=build.clip.quick_gelu,
        head={"name": build.head, "params": build.head_params},
        heads_checkpoint=build.weights_info.get("heads_checkpoint"),
        heads_checkpoint_source=heads_ckpt,
        classes=build.vocab,
        templates=build.templates,
        vocab=build.vocab_mode,
        embed_dim=build.embed_dim,
        input_size=[build.size, build.size],
        patch_size=build.size // h,
        grid=[h, w],
        inputs=inputs,
        outputs=outputs,
        protocol=protocol,
        normalization={"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "in_graph": True},
        opset=opset,
        precision="fp32",
        onnx_file=onnx_path.name,
        onnx_sha256=None,
    )


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, input_names: List[str],
                 dynamic_axes: dict, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: pinned on purpose
        kwargs = dict(input_names=input_names, output_names=["scores"], dynamic_axes=dynamic_axes,
                      opset_version=opset, do_constant_folding=True)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument and is legacy-only anyway
            torch.onnx.export(module, args, str(path), **kwargs)


def _declare_output_shape(path: Path, dims: list) -> None:
    """Write the manifest's output shape into the graph: the exporter leaves some dims symbolic
    (e.g. after the synonym reshape), and consumers (TensorRT, C++) want them static."""
    import onnx

    model = onnx.load(str(path))
    shape = model.graph.output[0].type.tensor_type.shape
    for dim, value in zip(shape.dim, dims):
        if isinstance(value, int):
            dim.ClearField("dim_param")
            dim.dim_value = value
        else:
            dim.ClearField("dim_value")
            dim.dim_param = value
    onnx.save(model, str(path))


def export_image_graph(head: str, out: "str | Path", model: str = "ViT-B-16", pretrained: Optional[str] = None,
                       classes: Optional[Vocabulary] = None, size: Optional[int] = None,
                       templates: str = "imagenet80", vocab: str = "baked", heads_ckpt: Optional[str] = None,
                       head_params: Optional[dict] = None, quick_gelu: Optional[bool] = None, seed: int = 0,
                       opset: int = OPSET, quiet: bool = True, allow_duplicates: bool = False,
                       clip: Optional[LoadedClip] = None, frame: Optional[tuple] = None,
                       frame_protocol: Optional[dict] = None) -> Path:
    """Write `out`.onnx + `out`.json; returns the .onnx path. Nothing is left behind on failure.

    `frame` (H, W): write a frame graph instead (export.frame_graph: frames in, labels out);
    `frame_protocol`: protocol fields baked into it (logit_scale, prob_thd, area_thd, ...).

    `clip` reuses already-loaded weights (several heads/sizes of one model); it must have been
    loaded from `model`/`pretrained` for the manifest to describe it.
    """
    out = Path(out)
    onnx_path = out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")
    if onnx_path.parent.exists() and not onnx_path.parent.is_dir():
        raise ClipfuseError(f"output folder {onnx_path.parent} is not a directory")
    spec = get_method(head)
    pretrained_arg = spec.default_pretrained if pretrained is None else pretrained
    t0 = time.time()
    build = build_fused(head, model, pretrained_arg, classes, size, templates, vocab, heads_ckpt, head_params,
                        quick_gelu, seed, quiet, clip=clip, allow_duplicates=allow_duplicates)
    image = torch.randint(0, 256, (2, build.size, build.size, 3), dtype=torch.uint8)
    args: tuple = (image,)
    input_names = ["image"]
    dynamic_axes = {"image": {0: "batch"}, "scores": {0: "batch"}}
    if build.vocab_mode == "dynamic":
        args = (image, build.name_embeddings)
        input_names.append("class_embeddings")
        dynamic_axes["class_embeddings"] = {0: "classes"}
        dynamic_axes["scores"][1] = "classes"

    manifest = image_manifest(build, onnx_path, pretrained_arg, heads_ckpt, opset)
    if frame is not None:
        from .frame_graph import export_frame_graph
        return export_frame_graph(build, manifest, frame, onnx_path, opset, lambda m: _log(m, quiet),
                                  frame_protocol)
    _log(f"exporting ONNX opset {opset} ({head}, {build.size}x{build.size}, grid {build.grid[0]}x{build.grid[1]})",
         quiet)
    with graph_with_manifest(onnx_path, manifest) as tmp_onnx:
        with torch.no_grad():
            _onnx_export(build.module, args, tmp_onnx, input_names, dynamic_axes, opset)
        _declare_output_shape(tmp_onnx, manifest["outputs"][0]["shape"])
    size_mb = onnx_path.stat().st_size / 2 ** 20
    _log(f"wrote {onnx_path} ({size_mb:.1f} MiB) and {manifest_path_for(onnx_path).name} "
         f"in {time.time() - t0:.1f} s", quiet)
    return onnx_path
