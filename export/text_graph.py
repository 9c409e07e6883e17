"""CLIP's text encoder as an ONNX graph: tokens int64 [batch, 77] -> text_features float32 [batch, E].

The graph is open_clip's own `encode_text` (no re-implementation, no normalisation):
token_embedding + positional_embedding -> transformer with the causal mask -> ln_final ->
the features at the EOT position (argmax of the token ids) -> @ text_projection.
With it and clipfuse.runtime.tokenizer, the runtime computes class embeddings for any vocabulary
without PyTorch (clipfuse.runtime.text).
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import io_spec, manifest_path_for, new_manifest
from clipfuse.runtime.tokenizer import TOKENIZER_ID, VOCAB_SIZE

from .artifacts import graph_with_manifest
from .spec import OPSET, PRECISIONS, TextExportSpec  # noqa: F401 (PRECISIONS re-exported)
from .weights import LoadedClip, load_clip

INPUT, OUTPUT = "tokens", "text_features"


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"clipfuse: {msg}", file=sys.stderr, flush=True)


class TextEncoder(torch.nn.Module):
    """open_clip's encode_text(normalize=False) as a module with one tensor in, one out."""

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=False)


def check_clip_text_tower(clip: LoadedClip) -> None:
    """Refuse text towers the runtime tokenizer cannot feed (HF tokenizers, other vocabularies)."""
    model = clip.model
    vocab = getattr(getattr(model, "token_embedding", None), "num_embeddings", None)
    if vocab != VOCAB_SIZE or not hasattr(model, "encode_text"):
        raise ClipfuseError(f"model {clip.model_name} has no CLIP-BPE text tower (vocabulary {vocab}, "
                            f"expected {VOCAB_SIZE}); export-text supports OpenAI-style CLIP text encoders")
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        raise ClipfuseError(f"model {clip.model_name} pools text by {pool!r}; the runtime tokenizer "
                            "and this graph assume CLIP's argmax (EOT) pooling")


def text_manifest(clip: LoadedClip, onnx_path: Path, pretrained_arg: str, context_length: int,
                  embed_dim: int, opset: int, precision: str) -> dict:
    return new_manifest(
        "text",
        model=clip.model_name,
        pretrained=clip.pretrained_id,
        pretrained_source=pretrained_arg,
        seed=clip.seed,
        quick_gelu=clip.quick_gelu,
        context_length=context_length,
        tokenizer=TOKENIZER_ID,
        vocab_size=VOCAB_SIZE,
        embed_dim=embed_dim,
        inputs=[io_spec(INPUT, "int64", ["batch", context_length], "NL",
                        description="CLIP BPE ids: SOT, text, EOT, zero padding "
                                    "(clipfuse.runtime.tokenizer.tokenize)")],
        outputs=[io_spec(OUTPUT, "float32", ["batch", embed_dim], "NE",
                         description="open_clip encode_text output, NOT L2-normalised")],
        opset=opset,
        precision=precision,
        onnx_file=onnx_path.name,
        onnx_sha256=None,
    )


def _onnx_export(module: torch.nn.Module, tokens: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: pinned on purpose
        kwargs = dict(input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
        try:
            torch.onnx.export(module, (tokens,), str(path), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument and is legacy-only anyway
            torch.onnx.export(module, (tokens,), str(path), **kwargs)


def _keep_projection_fp32(fp16_model, fp32_model):
    """After the FP16 pass: compute the final `@ text_projection` in FP32 from FP32 weights.

    The generic pass (clipfuse.export.fp16) keeps LayerNorm and Softmax in FP32 but has no reason
    to keep a projection that no L2 norm follows inside this graph; its output is the embedding
    itself, so it stays FP32: the pooled EOT features are cast up, the weight is the original one.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = fp16_model.graph
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(OUTPUT)
    if node is not None and node.op_type == "Cast":  # the pass's cast back to the float32 output
        matmul = producers.get(node.input[0])
    else:
        return fp16_model
    if matmul is None or matmul.op_type != "MatMul":
        return fp16_model
    fp32_inits = {t.name: t for t in fp32_model.graph.initializer}
    data, weight = matmul.input
    weight32 = next((n for n in (weight, weight.removesuffix("__fp16")) if n in fp32_inits), None)
    if weight32 is None:
        return fp16_model
    weight_fp32 = numpy_helper.from_array(numpy_helper.to_array(fp32_inits[weight32]), f"{weight32}__fp32")
    graph.initializer.append(weight_fp32)
    up = helper.make_node("Cast", [data], [f"{data}__proj_fp32"], to=TensorProto.FLOAT,
                          name="cast_fp32/text_projection_in")
    matmul.input[:] = [up.output[0], weight_fp32.name]
    matmul.output[0] = OUTPUT
    nodes = [n for n in graph.node if n is not node]
    nodes.insert(next(i for i, n in enumerate(nodes) if n is matmul), up)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return fp16_model


def convert_text_fp16(src: Path, dst: Path) -> dict:
    """FP32 text graph -> FP16 with FP32 LayerNorm/Softmax (clipfuse.export.fp16) + FP32 projection."""
    import onnx

    from .fp16 import convert_to_fp16

    fp32 = onnx.load(str(src))
    fp16, report = convert_to_fp16(fp32)
    fp16 = _keep_projection_fp32(fp16, fp32)
    onnx.checker.check_model(fp16)
    onnx.save(fp16, str(dst))
    info = report.to_dict()
    info["fp32_extra"] = ["text_projection"]
    return info


def export_text_graph(out: "str | Path", model: str = "ViT-B-16", pretrained: str = "none",
                      quick_gelu: Optional[bool] = None, seed: int = 0, opset: int = OPSET,
                      precision: str = "fp32", quiet: bool = True,
                      clip: Optional[LoadedClip] = None) -> Path:
    """export_text with the spec's fields as keywords (the CLI's and the tests' form)."""
    spec = TextExportSpec(model=model, pretrained=pretrained, quick_gelu=quick_gelu, seed=seed, opset=opset,
                          precision=precision)
    return export_text(spec, out, quiet=quiet, clip=clip)


def export_text(spec: TextExportSpec, out: "str | Path", quiet: bool = True,
                clip: Optional[LoadedClip] = None) -> Path:
    """Write `out`.onnx + `out`.json (the text encoder of `spec`); returns the .onnx path.

    `clip` reuses an already loaded model (then the spec's model/pretrained/quick_gelu/seed are
    not read: refer export shares one CLIP between its graphs).
    """
    spec.validate()
    model, pretrained, opset, precision = spec.model, spec.pretrained, spec.opset, spec.precision
    out = Path(out)
    onnx_path = out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")
    if onnx_path.parent.exists() and not onnx_path.parent.is_dir():
        raise ClipfuseError(f"output folder {onnx_path.parent} is not a directory")
    t0 = time.time()
    pretrained_arg = pretrained if clip is None else clip.pretrained_id
    if clip is None:
        _log(f"loading {model} ({pretrained})", quiet)
        clip = load_clip(model, pretrained, quick_gelu=spec.quick_gelu, seed=spec.seed)
    check_clip_text_tower(clip)
    context_length = int(clip.model.positional_embedding.shape[0])
    embed_dim = int(clip.model.text_projection.shape[-1])
    module = TextEncoder(clip.model).eval()
    # Example: two rows with EOT at different positions, so pooling is traced as a gather by argmax.
    tokens = torch.zeros(2, context_length, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    tokens[1, :5] = torch.tensor([49406, 320, 1125, 539, 49407])

    manifest = text_manifest(clip, onnx_path, pretrained_arg, context_length, embed_dim, opset, precision)
    _log(f"exporting text encoder ONNX opset {opset} ({precision}, context {context_length}, E={embed_dim})", quiet)
    with graph_with_manifest(onnx_path, manifest) as tmp_onnx:
        with torch.no_grad():
            _onnx_export(module, tokens, tmp_onnx, opset)
        if precision == "fp16":
            manifest.update(fp16=convert_text_fp16(tmp_onnx, tmp_onnx))
    size_mb = onnx_path.stat().st_size / 2 ** 20
    _log(f"wrote {onnx_path} ({size_mb:.1f} MiB) and {manifest_path_for(onnx_path).name} "
         f"in {time.time() - t0:.1f} s", quiet)
    return onnx_path
