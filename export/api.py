"""Export one fused image graph (ONNX + manifest) per model, method, vocabulary and resolution.

Library entry points (the CLI, benchmarks and tests call these):
    build_fused(spec, clip=None)          -> FusedBuild (the torch module + what the manifest needs)
    write_image_graph(build, out)         -> out.onnx + out.json from a FusedBuild (a frame graph
                                             when spec.frame is set, see export.frame_graph)
    export_image_graph(spec, out)         -> both in one call
`spec` is an ImageExportSpec (clipfuse.export.spec); per-method knowledge comes from
clipfuse.runtime.methods.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import io_spec, manifest_path_for, new_manifest, parse_manifest
from clipfuse.runtime.methods import METHODS, get_method
from clipfuse.runtime.templates import get_templates
from clipfuse.runtime.vocab import Vocabulary, class_of_name, flat_names, validate

from .artifacts import graph_with_manifest
from .classifier import CosineClassifier
from .fused import FusedSegmenter
from .heads import build_dense_head
from .onnxio import release_memory
from .spec import DYNAMO_MIN_OPSET, EXPORTERS, OPSET, VOCAB_MODES, ImageExportSpec
from .text_embed import encode_names
from .trunk import CLIP_MEAN, CLIP_STD, VisionTrunk
from .weights import LoadedClip, load_clip

__all__ = ["OPSET", "VOCAB_MODES", "FusedBuild", "ImageExportSpec", "build_fused", "check_size",
           "export_image_graph", "image_manifest", "write_image_graph"]


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
    spec: ImageExportSpec          # resolved: pretrained and size filled in
    module: FusedSegmenter
    clip: LoadedClip
    head_params: dict              # the DenseHead's effective parameters (manifest head.params)
    weights_info: dict
    vocabulary: Vocabulary
    grid: tuple
    embed_dim: int
    name_embeddings: torch.Tensor

    @property
    def method(self) -> str:
        return self.spec.method

    def release(self) -> None:
        """Drop the torch module and the weights (peak memory of what follows: folding, hashing).

        The tensors' storage is emptied first: onnxscript 0.7's rewrite rules (dynamo exporter)
        are module-level objects that keep their last match, through it the exported graph, and
        through that the module's parameters, so dropping our references alone frees nothing."""
        if self.module is not None:
            with torch.no_grad():
                for tensor in [*self.module.parameters(), *self.module.buffers()]:
                    tensor.data = torch.empty(0, dtype=tensor.dtype)
        self.module = None
        self.clip.model = None
        release_memory()

    @property
    def size(self) -> int:
        return int(self.spec.size)

    @property
    def vocab_mode(self) -> str:
        return self.spec.vocab_mode


def _check_spec(spec: ImageExportSpec) -> Vocabulary:
    """Everything cheap, before any weights are loaded; returns the validated vocabulary."""
    method = get_method(spec.method)
    if spec.vocab_mode not in VOCAB_MODES:
        raise ClipfuseError(f"--vocab must be one of {', '.join(VOCAB_MODES)}, not {spec.vocab_mode!r}")
    get_templates(spec.templates)
    vocabulary = validate([list(names) for names in spec.classes or []], "vocabulary", spec.allow_duplicates)
    check_size(spec.size, patch_size_of(spec.model))
    _check_exporter(spec)
    from .weights import check_pretrained
    check_pretrained(spec.model, spec.pretrained)
    if spec.heads_checkpoint not in (None, "none"):
        if not method.takes_heads_checkpoint:
            raise ClipfuseError(f"--heads only applies to "
                                f"{', '.join(n for n, m in METHODS.items() if m.takes_heads_checkpoint)}, "
                                f"not {spec.method!r}")
        if not Path(spec.heads_checkpoint).is_file():
            raise ClipfuseError(f"CLIP-DINOiser heads checkpoint not found: {spec.heads_checkpoint}")
    return vocabulary


def _check_exporter(spec: ImageExportSpec) -> None:
    if spec.exporter not in EXPORTERS:
        raise ClipfuseError(f"--exporter must be one of {', '.join(EXPORTERS)}, not {spec.exporter!r}")
    if spec.exporter != "dynamo":
        return
    if spec.opset < DYNAMO_MIN_OPSET:
        raise ClipfuseError(f"--exporter dynamo writes opset >= {DYNAMO_MIN_OPSET}, not {spec.opset}")
    if spec.frame is not None:
        raise ClipfuseError("--exporter dynamo exports window graphs; frame graphs use the legacy exporter")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter is built on it)
    except ImportError:
        raise ClipfuseError("--exporter dynamo needs onnxscript: pip install onnxscript") from None


def _dense_head_params(spec: ImageExportSpec, vocabulary: Vocabulary) -> dict:
    # the tower's block-naming defaults (runtime/backbones.py), then the user's overrides
    method = get_method(spec.method)
    params = {k: v for k, v in method.head_params_on(spec.model).items() if method.head_params.get(k) != v}
    params.update(spec.head_params)
    if get_method(spec.method).has_background_rule:
        # The rule forces class 0 where the background head sees no object: only meaningful when
        # class 0 IS background; otherwise it would overwrite a real class.
        params["background_rule"] = (params.get("background_rule", True)
                                     and vocabulary[0][0].lower() == "background")
    return params


def _drop_text_tower(model: torch.nn.Module) -> None:
    """The text tower is done once the class embeddings exist; its weights (0.5 GB for ViT-L/14,
    1.4 GB for ViT-H/14) need not live through the graph export."""
    for name in ("transformer", "token_embedding", "ln_final", "text"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, torch.nn.Identity())
    for name in ("text_projection", "positional_embedding"):
        if isinstance(getattr(model, name, None), torch.nn.Parameter):
            setattr(model, name, None)


def build_fused(spec: ImageExportSpec, *, quiet: bool = True, clip: Optional[LoadedClip] = None,
                drop_text_tower: bool = False) -> FusedBuild:
    """Validate everything cheap first, then load weights and assemble the fused module.

    `clip` reuses already-loaded weights (several heads/sizes of one model); it must have been
    loaded from `spec.model`/`spec.pretrained` for the manifest to describe it. `drop_text_tower`
    frees the text tower of `clip` once the class embeddings are computed (a caller that exports
    one graph from weights it does not reuse).
    """
    spec = spec.resolved()
    vocabulary = _check_spec(spec)
    template_list = get_templates(spec.templates)
    method = get_method(spec.method)

    if clip is None:
        _log(f"loading {spec.model} (pretrained: {spec.pretrained})", quiet)
        clip = load_clip(spec.model, spec.pretrained, quick_gelu=spec.quick_gelu, seed=spec.seed)
    visual = clip.model.visual
    patch = visual.conv1.kernel_size[0]
    grid = (spec.size // patch, spec.size // patch)
    dense_head, weights_info = build_dense_head(spec.method, visual, grid, _dense_head_params(spec, vocabulary),
                                                spec.heads_checkpoint, seed=clip.seed)
    trunk = VisionTrunk(visual, (spec.size, spec.size), method.pos_rule, taps=dense_head.taps)

    names = flat_names(vocabulary)
    _log(f"encoding {len(names)} class names x {len(template_list)} templates", quiet)
    import open_clip
    tokenizer = open_clip.get_tokenizer(clip.model_name)
    t_text = time.perf_counter()
    embeddings = encode_names(clip.model, tokenizer, names, template_list, progress=not quiet)
    _log(f"text embeddings: {time.perf_counter() - t_text:.1f} s", quiet)
    if drop_text_tower:
        _drop_text_tower(clip.model)
        release_memory()        # the text tower's pages go back before the export stacks on them
    if spec.vocab_mode == "dynamic":
        classifier = CosineClassifier(None, None)
    else:
        classifier = CosineClassifier(embeddings, class_of_name(vocabulary))
    module = FusedSegmenter(trunk, dense_head, classifier).eval()
    return FusedBuild(spec=spec, module=module, clip=clip, head_params=dense_head.params(),
                      weights_info=weights_info, vocabulary=vocabulary, grid=grid,
                      embed_dim=int(embeddings.shape[1]), name_embeddings=embeddings)


def image_manifest(build: FusedBuild, onnx_path: Path) -> dict:
    """The manifest of `build` written as `onnx_path`: the spec's keys plus what the build found."""
    method = get_method(build.method)
    size = build.size
    h, w = build.grid
    n_rows = "classes" if build.vocab_mode == "dynamic" else len(build.vocabulary)
    inputs = [io_spec("image", "uint8", ["batch", size, size, 3], "NHWC",
                      description="RGB pixels, 0..255; CLIP normalisation happens in the graph")]
    if build.vocab_mode == "dynamic":
        inputs.append(io_spec("class_embeddings", "float32", ["classes", build.embed_dim], "KE",
                              description="L2-normalised text embedding per class name"))
    outputs = [io_spec("scores", "float32", ["batch", n_rows, h, w], "NCHW",
                       description=f"{method.protocol.score_type} score per class at patch resolution")]
    protocol = method.protocol_on(build.spec.model, size).to_dict()   # window == input_size, by construction
    protocol["background_rule"] = bool(build.head_params.get("background_rule", False))
    fields = build.spec.to_manifest()
    fields.update(
        pretrained=build.clip.pretrained_id,
        seed=build.clip.seed,
        quick_gelu=build.clip.quick_gelu,
        head={"name": build.method, "params": build.head_params},
        heads_checkpoint=build.weights_info.get("heads_checkpoint"),
        classes=build.vocabulary,
        embed_dim=build.embed_dim,
        patch_size=size // h,
        grid=[h, w],
        inputs=inputs,
        outputs=outputs,
        protocol=protocol,
        normalization={"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "in_graph": True},
        precision="fp32",
        onnx_file=onnx_path.name,
        onnx_sha256=None,
    )
    return new_manifest("image", **fields)


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, input_names: List[str],
                 dynamic_axes: dict, opset: int, exporter: str = "legacy") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: pinned on purpose
        if exporter == "dynamo":
            _dynamo_export(module, args, path, input_names, dynamic_axes, opset)
            return
        kwargs = dict(input_names=input_names, output_names=["scores"], dynamic_axes=dynamic_axes,
                      opset_version=opset, do_constant_folding=True)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument and is legacy-only anyway
            torch.onnx.export(module, args, str(path), **kwargs)


def _dynamo_export(module: torch.nn.Module, args: tuple, path: Path, input_names: List[str],
                   dynamic_axes: dict, opset: int) -> None:
    """torch.export + onnxscript, weights written as external data (graph_with_manifest then
    writes one file where the graph fits). The legacy exporter's dynamic axes become torch.export
    dims, one per axis name."""
    dims: Dict[str, object] = {}
    shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=1))
                    for axis, name in dynamic_axes.get(input_name, {}).items()} for input_name in input_names)
    try:
        # optimize: onnxscript's rewriter turns torch.split's SplitToSequence/SequenceAt (not in
        # TensorRT's operator list) into Split, among others
        program = torch.onnx.export(module, args, str(path), dynamo=True, external_data=True,
                                    input_names=input_names, output_names=["scores"], opset_version=opset,
                                    dynamic_shapes=shapes, optimize=True, verbose=False)
        # the graph's initializers wrap aliases of the module's tensors, and onnxscript keeps the
        # graph alive (FusedBuild.release): let go of them now that the file is written
        for value in program.model.graph.initializers.values():
            value.const_value = None
        del program
    except Exception as exc:   # torch.export's and onnxscript's errors are many types, each long
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ClipfuseError(f"the dynamo exporter failed ({type(exc).__name__}: {first}); "
                            "--exporter legacy exports every head") from None


def _shapes_after_casts(model) -> None:
    """Let Shape nodes read a uint8 input through its Cast (same shape). The dynamo exporter reads
    the batch size straight from the uint8 image; TensorRT takes a UInt8 input only into a Cast
    (export.trt_support checks it). Legacy graphs have no such node: nothing changes for them."""
    import onnx

    graph = model.graph
    uint8 = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.UINT8}
    casts = {n.input[0]: n for n in graph.node if n.op_type == "Cast" and n.input and n.input[0] in uint8}
    moved = [(n, casts[n.input[0]]) for n in graph.node
             if n.op_type == "Shape" and n.input and n.input[0] in casts]
    if not moved:
        return
    out = []
    for node in graph.node:
        if any(node is shape for shape, _ in moved):
            continue
        out.append(node)
        for shape, cast in moved:       # right after its Cast: the order stays topological
            if node is cast:
                shape.input[0] = cast.output[0]
                out.append(shape)
    del graph.node[:]
    graph.node.extend(out)


def _declare_output_shape(model, dims: list) -> None:
    """Write the manifest's output shape into the graph: the exporter leaves some dims symbolic
    (e.g. after the synonym reshape), and consumers (TensorRT, C++) want them static."""
    shape = model.graph.output[0].type.tensor_type.shape
    for dim, value in zip(shape.dim, dims):
        if isinstance(value, int):
            dim.ClearField("dim_param")
            dim.dim_value = value
        else:
            dim.ClearField("dim_value")
            dim.dim_param = value


def write_image_graph(build: FusedBuild, out: "str | Path", *, quiet: bool = True, release: bool = False) -> Path:
    """Export an already assembled `build` as `out`.onnx + `out`.json (opset from its spec).

    `release`: drop the build's torch module and weights once the graph is written (before
    folding), for a caller that does not use `build` afterwards (export_image_graph)."""
    onnx_path = _onnx_path_for(out)
    opset = build.spec.opset
    t0 = time.time()
    image = torch.randint(0, 256, (2, build.size, build.size, 3), dtype=torch.uint8)
    args: tuple = (image,)
    input_names = ["image"]
    dynamic_axes = {"image": {0: "batch"}, "scores": {0: "batch"}}
    if build.vocab_mode == "dynamic":
        args = (image, build.name_embeddings)
        input_names.append("class_embeddings")
        dynamic_axes["class_embeddings"] = {0: "classes"}
        dynamic_axes["scores"][1] = "classes"

    manifest = image_manifest(build, onnx_path)
    if build.spec.frame is not None:
        from .frame_graph import export_frame_graph
        return export_frame_graph(build, manifest, tuple(build.spec.frame), onnx_path, opset,
                                  lambda m: _log(m, quiet), dict(build.spec.frame_protocol) or None)
    _log(f"exporting ONNX opset {opset} ({build.method}, {build.size}x{build.size}, "
         f"grid {build.grid[0]}x{build.grid[1]})", quiet)
    dims = list(parse_manifest(manifest).outputs[0].shape)
    def prepare(model) -> None:
        _shapes_after_casts(model)
        _declare_output_shape(model, dims)

    with graph_with_manifest(onnx_path, manifest, prepare=prepare) as tmp_onnx:
        with torch.no_grad():
            _onnx_export(build.module, args, tmp_onnx, input_names, dynamic_axes, opset, build.spec.exporter)
        del args
        if release:
            build.release()     # the graph is on disk: folding should not share memory with torch
    size_mb = onnx_path.stat().st_size / 2 ** 20
    _log(f"wrote {onnx_path} ({size_mb:.1f} MiB) and {manifest_path_for(onnx_path).name} "
         f"in {time.time() - t0:.1f} s", quiet)
    return onnx_path


def _onnx_path_for(out: "str | Path") -> Path:
    out = Path(out)
    onnx_path = out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")
    if onnx_path.parent.exists() and not onnx_path.parent.is_dir():
        raise ClipfuseError(f"output folder {onnx_path.parent} is not a directory")
    return onnx_path


def export_image_graph(spec: ImageExportSpec, out: "str | Path", *, quiet: bool = True,
                       clip: Optional[LoadedClip] = None) -> Path:
    """Write `out`.onnx + `out`.json; returns the .onnx path. Nothing is left behind on failure.

    `clip` reuses already-loaded weights (several heads/sizes of one model); it must have been
    loaded from `spec.model`/`spec.pretrained` for the manifest to describe it.
    """
    _onnx_path_for(out)                       # a bad output folder fails before any loading
    own = clip is None      # weights loaded here are released as early as possible (lean export)
    build = build_fused(spec, quiet=quiet, clip=clip, drop_text_tower=own)
    return write_image_graph(build, out, quiet=quiet, release=own)
