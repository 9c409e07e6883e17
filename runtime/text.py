"""Class embeddings on the device, without PyTorch: names -> prompts -> tokens -> text graph.

For every class name: fill each template, encode with the exported text graph
(`clipfuse export-text`), L2-normalise each prompt embedding, average over the templates,
L2-normalise again. This is the computation the exporter bakes into an image graph
(clipfuse.export.text_embed.encode_names), so a dynamic-vocabulary graph fed these rows gives the
baked graph's scores.

    enc = TextEncoder.open("engines/vitb16-text.onnx")           # or .engine (TensorRT)
    emb = class_embeddings(enc, [["sky"], ["tree", "bush"]], "imagenet80")
    segmenter.set_class_embeddings(emb.embeddings, emb.classes)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from .artifact import open_artifact
from .backends import open_backend
from .errors import ClipfuseError
from .manifest import TextManifest, parse_manifest
from .templates import fill, get_templates
from .tokenizer import TOKENIZER_ID, tokenize
from .vocab import Vocabulary, class_of_name, flat_names, validate

L2_EPS = 1e-12  # torch.nn.functional.normalize's eps: x / max(||x||, eps)
DEFAULT_CHUNK = 256  # prompts per graph call (bounded by an engine's max batch)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    return (x / np.maximum(norm, L2_EPS)).astype(np.float32)


class TextEncoder:
    """An exported text graph (tokens int64 [B, L] -> text_features float32 [B, E]) + the tokenizer."""

    def __init__(self, artifact: Path, manifest: "dict | TextManifest", runner) -> None:
        self.artifact = artifact
        meta = parse_manifest(manifest, Path(artifact).name)
        if not isinstance(meta, TextManifest) or not meta.inputs or not meta.outputs:
            raise ClipfuseError(f"{Path(artifact).name} is not a text graph (kind {meta.kind!r})")
        self.meta: TextManifest = meta
        self.manifest = meta.to_dict() if isinstance(manifest, TextManifest) else manifest   # the JSON form
        self.runner = runner
        self.context_length = meta.context_length
        self.embed_dim = meta.embed_dim or None
        self.input_name = meta.inputs[0].name
        self.output_name = meta.outputs[0].name

    @classmethod
    def open(cls, artifact: "str | Path", backend: str = "auto", verify: bool = True,
             backend_options: Optional[dict] = None) -> "TextEncoder":
        """Open a text graph (.onnx, or a built .engine) with its manifest beside it."""
        opened = open_artifact(artifact, kinds=("text",), verify=verify, what="text graph",
                               hint="class embeddings need a text graph from `clipfuse export-text`")
        artifact, meta = opened.path, opened.meta
        if meta.tokenizer != TOKENIZER_ID:
            raise ClipfuseError(f"{artifact.name} expects tokenizer {meta.tokenizer!r}; "
                                f"this runtime has {TOKENIZER_ID!r}")
        return cls(artifact, meta, open_backend(artifact, opened.manifest, backend, **(backend_options or {})))

    def encode(self, texts: Sequence[str], chunk: int = DEFAULT_CHUNK, progress: bool = False) -> np.ndarray:
        """Raw (not normalised) text features, float32 [len(texts), E]."""
        step = max(1, min(chunk, getattr(self.runner, "max_batch", None) or chunk))
        starts = range(0, len(texts), step)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="text embeddings", unit="batch", leave=False)
        outs = []
        for start in starts:
            tokens = tokenize(list(texts[start:start + step]), context_length=self.context_length)
            outs.append(np.asarray(self.runner.run({self.input_name: tokens})[self.output_name], np.float32))
        if not outs:
            return np.zeros((0, self.embed_dim or 0), np.float32)
        return np.concatenate(outs, axis=0)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ClassEmbeddings:
    embeddings: np.ndarray   # float32 [N_names, E], L2-normalised rows, names in vocabulary order
    names: List[str]         # flat names, one per row
    class_of_name: List[int]  # row -> class index
    classes: Vocabulary      # the vocabulary they were computed for
    templates: str


def encode_names(encoder: TextEncoder, names: Sequence[str], templates: Sequence[str],
                 chunk: int = DEFAULT_CHUNK, progress: bool = False) -> np.ndarray:
    """[len(names), E]: per name, the L2-normalised mean of its L2-normalised template embeddings."""
    templates = tuple(templates)
    prompts = [p for name in names for p in fill(templates, name)]
    per_prompt = l2_normalize(encoder.encode(prompts, chunk=chunk, progress=progress))
    per_name = per_prompt.reshape(len(names), len(templates), -1).mean(axis=1)
    return l2_normalize(per_name)


def class_embeddings(encoder: TextEncoder, vocab: Vocabulary, templates: Union[str, Sequence[str]] = "imagenet80",
                     chunk: int = DEFAULT_CHUNK, progress: bool = False) -> ClassEmbeddings:
    """Embeddings of every name of `vocab` (classes of synonyms) with a template set or list."""
    vocab = validate([list(names) for names in vocab])
    template_list = get_templates(templates) if isinstance(templates, str) else tuple(templates)
    if not template_list or any("{}" not in t for t in template_list):
        raise ClipfuseError("every template needs one '{}' where the class name goes")
    names = flat_names(vocab)
    emb = encode_names(encoder, names, template_list, chunk=chunk, progress=progress)
    return ClassEmbeddings(embeddings=emb, names=names, class_of_name=class_of_name(vocab), classes=vocab,
                           templates=templates if isinstance(templates, str) else "custom")
