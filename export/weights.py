"""Load an unmodified open_clip CLIP: by open_clip tag, from a local checkpoint, or random.

Every dense head reuses these weights as they are. The one decision made here is the activation:
OpenAI weights need QuickGELU, LAION weights GELU, and open_clip 3.x only warns on a mismatch
(a wrong choice moves features by ~0.5 % and nothing fails). It is decided from what the weights
say, never guessed: an open_clip tag (its pretrained config), an OpenAI-format file (TorchScript
archive or state dict with OpenAI's extra entries: QuickGELU), a `*-quickgelu` architecture, or
random init (the config's own), or a file in the Hugging Face cache folder of a published tag
(models--timm--vit_base_patch32_clip_224.openai/...: that tag's config). Any other open_clip-format
state dict of a plain architecture records no activation (OpenAI weights converted to it have the
very same keys, and open_clip publishes no hashes of these files), so there the caller must say
which (`quick_gelu`, the CLIs' `--quick-gelu on|off`).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import QUICKGELU_TAGS

_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False
# Keys the OpenAI release stores beside the weights; open_clip drops them too.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class LoadedClip:
    model: torch.nn.Module
    model_name: str
    pretrained_id: str      # what the manifest records: tag, "file:NAME@sha256:...", or "none"
    quick_gelu: bool
    checkpoint_format: str  # "tag", "open_clip", "openai-jit", "openai-state-dict", "random"
    seed: int = 0


def _open_clip():
    global _registered
    import open_clip
    if not _registered:
        # ViT-T-16-test / ViT-T-14-test: tiny real-architecture ViTs (patch 16 / 14) for smoke tests and CI.
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
    return open_clip


@contextlib.contextmanager
def _quiet_logging():
    """open_clip and huggingface_hub log retries and 'initialized randomly' at WARNING/ERROR;
    clipfuse reports the outcome itself in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_model_name(open_clip, model_name: str) -> dict:
    names = open_clip.list_models()
    if model_name not in names:
        close = difflib.get_close_matches(model_name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ClipfuseError(f"unknown model {model_name!r}{hint} (`python -c \"import open_clip; "
                            f"print(open_clip.list_models())\"` lists all)")
    cfg = open_clip.get_model_config(model_name)
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int) \
            or cfg.get("custom_text") is not None and "hf_model_name" in cfg.get("text_cfg", {}):
        raise ClipfuseError(f"model {model_name!r} is not a plain open_clip ViT; dense heads need "
                            "the VisionTransformer tower (e.g. ViT-B-16, ViT-L-14)")
    return cfg


def _file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}@sha256:{digest.hexdigest()[:16]}"


def read_checkpoint(path: Path) -> "tuple[Dict[str, torch.Tensor], str]":
    """State dict + format name of an open_clip or OpenAI checkpoint file."""
    if zipfile.is_zipfile(path):
        try:  # OpenAI's release is a TorchScript archive
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # torch's jit deprecation notice, on every zip tried
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "openai-jit"
        except Exception:
            pass
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClipfuseError(f"cannot read checkpoint {path}: not a torch checkpoint "
                            f"({type(exc).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipfuseError(f"checkpoint {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    fmt = "openai-state-dict" if any(k in obj for k in _OPENAI_EXTRA_KEYS) else "open_clip"
    return obj, fmt


def check_state_dict(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with a one-line error naming the first offending key."""
    for key, ref in expected.items():
        if key not in got:
            raise ClipfuseError(f"{source}: missing key {key!r} (expected shape {list(ref.shape)})")
        if tuple(got[key].shape) != tuple(ref.shape):
            raise ClipfuseError(f"{source}: key {key!r} has shape {list(got[key].shape)}, "
                                f"expected {list(ref.shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ClipfuseError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all); "
                            "is this a checkpoint of another architecture?")


def _hub_cache_tag_activation(path: Path, model_name: str) -> Optional[bool]:
    """A file inside the Hugging Face cache folder of one of open_clip's published tags
    (models--ORG--REPO/snapshots/...) is that tag's weights: its pretrained config knows the
    activation. None for any other path (a renamed or copied file stays undecided)."""
    open_clip = _open_clip()
    parts = set(path.resolve().parts)
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        repo = (cfg.get("hf_hub") or "").strip("/")
        if repo and "models--" + repo.replace("/", "--") in parts:
            return tag in QUICKGELU_TAGS or bool(cfg.get("quick_gelu", False))
    return None


def quick_gelu_of_file(path: Path, fmt: str, model_name: str, config_qg: bool) -> Optional[bool]:
    """The activation a checkpoint file's weights were trained with; None when the file does not
    tell (see the module docstring)."""
    if fmt.startswith("openai") or config_qg:     # OpenAI's release, or a *-quickgelu architecture
        return True
    return _hub_cache_tag_activation(path, model_name)


def raise_undecided_activation(path: Path, model_name: str) -> None:
    variant = f"{model_name}-quickgelu"
    alt = f" (or --model {variant})" if variant in _open_clip().list_models() else ""
    raise ClipfuseError(f"checkpoint {path.name} is an open_clip state dict, which does not record whether "
                        "its weights were trained with QuickGELU (OpenAI weights: yes) or GELU (LAION, "
                        f"DataComp); pass --quick-gelu on|off{alt}")


def check_pretrained(model_name: str, pretrained: str) -> None:
    """Cheap validation of `pretrained` (before any weights are loaded or downloaded)."""
    open_clip = _open_clip()
    _check_model_name(open_clip, model_name)
    if pretrained.lower() == "none" or Path(pretrained).is_file():
        return
    if any(sep in pretrained for sep in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ClipfuseError(f"checkpoint file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ClipfuseError(f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: "
                            f"{', '.join(tags) or '(none)'}; or pass a checkpoint file, or 'none'")


def load_clip(model_name: str = "ViT-B-16", pretrained: str = "none",
              quick_gelu: Optional[bool] = None, seed: int = 0) -> LoadedClip:
    """Build `model_name` and fill it from `pretrained` (tag, checkpoint path, or "none").

    `seed` makes random init ("none") reproducible: the manifest records it, so any later stage
    (the PyTorch reference backend, a text graph export) rebuilds the very same random weights.

    `quick_gelu=None` decides by the weights: True for OpenAI weights (tag `openai`, OpenAI-format
    files), else the architecture config's own setting (`*-quickgelu` names set it); an
    open_clip-format file of a plain architecture cannot be decided and raises ClipfuseError.
    """
    open_clip = _open_clip()
    torch.manual_seed(seed)
    cfg = _check_model_name(open_clip, model_name)
    config_qg = bool(cfg.get("quick_gelu", False))
    path = Path(pretrained)

    if pretrained.lower() == "none":
        qg = config_qg if quick_gelu is None else quick_gelu
        with _quiet_logging():
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=qg)
        source_id, fmt = "none", "random"
    elif path.is_file():
        state, fmt = read_checkpoint(path)
        qg = quick_gelu if quick_gelu is not None else quick_gelu_of_file(path, fmt, model_name, config_qg)
        for key in _OPENAI_EXTRA_KEYS:
            state.pop(key, None)
        with _quiet_logging():  # undecided: keys are checked first (GELU here changes no key)
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(qg))
        expected = model.state_dict()
        # TorchScript archives also hold non-persistent buffers (the text causal attn_mask)
        transient = {name for name, _ in model.named_buffers()} - set(expected)
        state = {k: v for k, v in state.items() if k not in transient}
        # OpenAI ships fp16 weights; open_clip's format may lack logit_bias-free extras. Shapes decide.
        check_state_dict(expected, state, f"checkpoint {path.name}")
        if qg is None:
            raise_undecided_activation(path, model_name)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        source_id = _file_id(path)
    else:
        check_pretrained(model_name, pretrained)
        tag_qg = pretrained in QUICKGELU_TAGS or bool(
            open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
        qg = tag_qg if quick_gelu is None else quick_gelu
        try:
            with _quiet_logging():
                model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=qg)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ClipfuseError(f"could not fetch weights {model_name}/{pretrained} ({reason}); on an offline "
                                "machine pass a local checkpoint file to --pretrained, or 'none'") from None
        source_id, fmt = pretrained, "tag"

    model = model.float().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedClip(model=model, model_name=model_name, pretrained_id=source_id, quick_gelu=qg,
                      checkpoint_format=fmt, seed=seed)
