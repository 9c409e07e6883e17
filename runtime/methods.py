"""Everything clipfuse knows about each method, as data, in one torch-free table.

`METHODS[name]` is a frozen `MethodSpec`; every layer reads it and nothing else:
  - the exporter: `head_family` picks the DenseHead class, `head_params` its preset (attention form,
    Gaussian sigma, residual, FFN; or CLIP-DINOiser's background rule), `pos_rule` how the positional
    table is resized, `takes_heads_checkpoint` whether `--heads` applies, `default_pretrained`;
  - the reference (export/reference.py) reads the same preset and rule;
  - the runtime: `protocol` (sliding window incl. score type and logit scale), `dataset_protocol`;
  - eval: `class_names` (which shipped name files), `background_rule_datasets`, `published_miou`;
  - `clipfuse heads` prints it (no torch needed).

The window is the one source of truth for the size: `default_size` IS `protocol.window`, and a
graph exported at another size gets `protocol_at(size)` (window = size) in its manifest.

Each head family's parameters are a frozen dataclass here (torch-free: `clipfuse heads` prints them,
`clipfuse export` generates its flags from their `cli` metadata, eval compares them); a method's
preset is an instance. Adding a self-correlation head (a new attention form aside) is one entry in
METHODS; a new head family adds its parameter dataclass here and its module in export/heads/
(docs/architecture.md). Numbers are those of the methods' public code (docs/methods.md#sources).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

from .cliargs import block_indices, non_negative_float, on_off
from .errors import ClipfuseError


@dataclass(frozen=True)
class Protocol:
    """Sliding-window inference protocol of a method (all sizes in pixels)."""

    short_side: int
    window: int
    stride: int
    long_side_max: Optional[int] = None
    # "cosine": raw cosine logits, runtime applies logit_scale + softmax after averaging windows.
    # "probability": the graph already emits probabilities (CLIP-DINOiser).
    score_type: str = "cosine"
    logit_scale: float = 1.0
    prob_thd: float = 0.0
    area_thd: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Protocol":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# DenseHead families (export/heads/): which module class a method's preset parameterises.
SELF_CORRELATION = "self-correlation"
CLIP_DINOISER = "clip-dinoiser"
SC_CLIP = "sc-clip"
RCS = "rcs"


def param(default: Any, flag: Optional[str] = None, help: str = "", *, type: Optional[Callable[[str], Any]] = None,
          choices: Optional[tuple] = None, metavar: Optional[str] = None, sets: Any = None,
          convert: Optional[Callable[[Any], Any]] = None) -> Any:
    """A head parameter; with `flag`, `clipfuse export` gets that flag to override it
    (export/head_args.py). `sets`: a store-true flag setting this value; `convert`: applied to
    the parsed value (e.g. 0 -> None)."""
    meta = {} if flag is None else {"cli": dict(flag=flag, help=help, type=type, choices=choices, metavar=metavar,
                                                sets=sets, convert=convert)}
    return field(default=default, metadata=meta)


class HeadParams:
    """Base of the families' parameter dataclasses: typed fields, read-only mapping access too
    (`params["lam"]`, `"background_rule" in params`) for code that treats a preset as data."""

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in fields(self))

    def keys(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self else default

    def items(self) -> Tuple[Tuple[str, Any], ...]:
        return tuple((k, getattr(self, k)) for k in self.keys())


ATTENTION_FORMS = ("qk", "qq", "kk", "qq+kk", "identity")
_SIGMA_HELP = "self-correlation heads, rcs: Gaussian spatial bias sigma (0 = none)"


@dataclass(frozen=True)
class SelfCorrelationParams(HeadParams):
    """MaskCLIP, SCLIP, ClearCLIP, NACLIP: attention form, Gaussian sigma, residual and FFN."""

    attn: str = param("qq+kk", "--attn", "self-correlation heads: override the attention form",
                      choices=ATTENTION_FORMS)
    gaussian_sigma: Optional[float] = param(None, "--gaussian-sigma", _SIGMA_HELP, type=non_negative_float,
                                            convert=lambda v: v or None)
    residual: bool = param(True, "--residual", "self-correlation heads: keep the last block's residual",
                           type=on_off, metavar="on|off")
    ffn: bool = param(True, "--ffn", "self-correlation heads: keep the last block's FFN", type=on_off,
                      metavar="on|off")


@dataclass(frozen=True)
class ClipDinoiserParams(HeadParams):
    background_rule: bool = param(True, "--no-background-rule",
                                  "clip-dinoiser: do not apply the background rule in the graph", sets=False)


@dataclass(frozen=True)
class ScClipParams(HeadParams):
    """Block indices are those of a 12-block ViT-B/16 (the public code's constants)."""

    pre_adjust_block: int = 8
    post_adjust_block: int = 3
    multi_start: int = 3
    multi_stop: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    lof_k: int = 30
    lof_quantile: float = 0.95
    attn_sharpen: float = 3.0


@dataclass(frozen=True)
class RcsParams(HeadParams):
    lam: float = param(0.3, "--rcs-lambda",
                       "rcs: weight of the mean attention of blocks 5..8 (baked into the graph); ResCLIP's per "
                       "dataset: VOC21/Context60/ADE20k 0.3, COCO-Object/Context59/COCO-Stuff 0.4, VOC20 0.6, "
                       "Cityscapes 0.2 (default 0.3)", type=non_negative_float, metavar="LAM")
    tau: float = 2.0
    gaussian_sigma: Optional[float] = param(5.0, "--gaussian-sigma", _SIGMA_HELP, type=non_negative_float,
                                            convert=lambda v: v or None)
    attention_blocks: Tuple[int, ...] = param((5, 6, 7, 8), "--rcs-blocks",
                                              "rcs: 0-based blocks whose attention probabilities are averaged "
                                              "(ResCLIP, ViT-B/16: 5,6,7,8; other depths are not specified by "
                                              "ResCLIP)", type=block_indices, metavar="I,J,..")


def param_flag(params: Any, name: str) -> Optional[str]:
    """The `clipfuse export` flag of parameter `name` of a parameter dataclass, if it has one."""
    for f in fields(params):
        if f.name == name and "cli" in f.metadata and f.metadata["cli"]["sets"] is None:
            return f.metadata["cli"]["flag"]
    return None


def params_dict(params: Any) -> Dict[str, Any]:
    """A parameter dataclass as a fresh dict (shallow: tuples stay tuples)."""
    return {f.name: getattr(params, f.name) for f in fields(params)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    default_pretrained: str
    # protocol.window is also the default export size (see `default_size`).
    protocol: Protocol
    head_family: str
    # The DenseHead's default parameters (docs/methods.md), an instance of its family's dataclass above.
    head_params: Any
    # How the method's code resizes the positional table (export/posembed.py): "size" or "scale".
    pos_rule: str
    # Whether the method has trained weights of its own (`--heads`, manifest heads_checkpoint).
    takes_heads_checkpoint: bool = False
    # Datasets on which the method's published evaluation applies its background rule.
    background_rule_datasets: FrozenSet[str] = frozenset()
    # Which shipped class-name files the published numbers used: "standard" or "sclip".
    class_names: str = "standard"
    # Per-dataset overrides of the protocol, keyed by clipfuse dataset name.
    dataset_protocol: Dict[str, dict] = field(default_factory=dict)
    # Published mIoU (%), ViT-B/16, per clipfuse dataset name (docs/methods.md): only what the
    # method's paper states per dataset; a method with just an average published has only "avg".
    published_miou: Dict[str, float] = field(default_factory=dict)
    # Per-dataset head parameters baked into the graph (e.g. RCS's lambda), keyed by dataset name:
    # `clipfuse eval` warns when a graph's manifest differs (runtime/eval/runner.py).
    dataset_head_params: Dict[str, dict] = field(default_factory=dict)

    @property
    def default_size(self) -> int:
        """Default export size = the method's sliding-window size (one source of truth)."""
        return self.protocol.window

    @property
    def has_background_rule(self) -> bool:
        return "background_rule" in self.default_head_params()

    def default_head_params(self) -> dict:
        """A fresh copy of the DenseHead's default parameters."""
        return params_dict(self.head_params)

    def protocol_for(self, dataset: Optional[str] = None) -> Protocol:
        if dataset is None or dataset not in self.dataset_protocol:
            return self.protocol
        return replace(self.protocol, **self.dataset_protocol[dataset])

    def protocol_on(self, model: str, size: Optional[int] = None) -> Protocol:
        """`protocol_at` on open_clip tower `model`: the per-backbone table (runtime/backbones.py)
        decides the base protocol; a non-default size is a new window size, as in protocol_at."""
        from .backbones import protocol_for
        base = protocol_for(self.name, model)
        if size is None or size == base.window:
            return base
        return replace(base, window=size, stride=size // 2, short_side=max(base.short_side, size))

    def head_params_on(self, model: str) -> dict:
        """`default_head_params` on tower `model` (block indices at the tower's depth,
        runtime/backbones.py)."""
        from .backbones import head_params_for
        return head_params_for(self.name, model)

    def protocol_at(self, size: int) -> Protocol:
        """The protocol of a graph exported at `size`: a non-default size is a new window size."""
        if size == self.protocol.window:
            return self.protocol
        return replace(self.protocol, window=size, stride=size // 2,
                       short_side=max(self.protocol.short_side, size))


# The papers' column order: VOC21/C60/Obj/VOC20/City/C59/ADE/Stuff (clipfuse dataset names).
PAPER_COLUMNS = ("voc21", "context60", "coco-object", "voc20", "cityscapes", "context59", "ade20k",
                 "coco-stuff164k")


def _per_dataset(*values: float, avg: float) -> Dict[str, float]:
    """Published mIoU given in the papers' column order."""
    assert len(values) == len(PAPER_COLUMNS)
    return dict(zip(PAPER_COLUMNS, values), avg=avg)


def _selfcorr(attn: str, residual: bool, ffn: bool, gaussian_sigma: Optional[float] = None) -> SelfCorrelationParams:
    return SelfCorrelationParams(attn=attn, gaussian_sigma=gaussian_sigma, residual=residual, ffn=ffn)


METHODS: Dict[str, MethodSpec] = {
    "maskclip": MethodSpec(
        name="maskclip",
        summary="MaskCLIP value path: last block without attention mixing, residual+FFN kept",
        default_pretrained="openai",
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224,
                          score_type="cosine", logit_scale=100.0),
        head_family=SELF_CORRELATION,
        head_params=_selfcorr("identity", residual=True, ffn=True),
        pos_rule="size",
    ),
    "sclip": MethodSpec(
        name="sclip",
        summary="SCLIP correlative self-attention softmax(qq^T)+softmax(kk^T), residual+FFN kept",
        default_pretrained="openai",
        protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                          logit_scale=40.0, prob_thd=0.0),
        head_family=SELF_CORRELATION,
        head_params=_selfcorr("qq+kk", residual=True, ffn=True),
        pos_rule="scale",
        class_names="sclip",
        dataset_protocol={
            "voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1},
            "context60": {"logit_scale": 50.0, "prob_thd": 0.1},
            "coco-object": {"logit_scale": 50.0, "prob_thd": 0.1},
            "cityscapes": {"short_side": 560},
            "coco-stuff164k": {"short_side": 448},
        },
        published_miou=_per_dataset(59.1, 30.4, 30.5, 80.4, 32.2, 34.2, 16.1, 22.4, avg=38.2),
    ),
    "clip-dinoiser": MethodSpec(
        name="clip-dinoiser",
        summary="CLIP-DINOiser: MaskCLIP features pooled by a learned patch correlation + background head",
        default_pretrained="laion2b_s34b_b88k",
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224,
                          score_type="probability", logit_scale=1.0),
        head_family=CLIP_DINOISER,
        head_params=ClipDinoiserParams(background_rule=True),
        pos_rule="size",
        takes_heads_checkpoint=True,
        background_rule_datasets=frozenset({"voc21", "coco-object"}),
        published_miou=_per_dataset(62.1, 32.4, 34.8, 80.9, 31.7, 35.9, 20.0, 24.6, avg=40.3),
    ),
    "clearclip": MethodSpec(
        name="clearclip",
        summary="ClearCLIP: softmax(qq^T) attention, no residual, no FFN",
        default_pretrained="openai",
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224, score_type="cosine",
                          logit_scale=50.0),
        head_family=SELF_CORRELATION,
        head_params=_selfcorr("qq", residual=False, ffn=False),
        pos_rule="scale",
        class_names="sclip",
        published_miou={"avg": 38.1},
    ),
    "naclip": MethodSpec(
        name="naclip",
        summary="NACLIP: softmax(kk^T + Gaussian neighbourhood bias), no residual, no FFN",
        default_pretrained="openai",
        protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                          logit_scale=40.0),
        head_family=SELF_CORRELATION,
        head_params=_selfcorr("kk", residual=False, ffn=False, gaussian_sigma=5.0),
        pos_rule="scale",
        class_names="sclip",
        dataset_protocol={"cityscapes": {"short_side": 560}},
        published_miou={"avg": 39.4},
    ),
}

# SC-CLIP (docs/methods.md#sc-clip; per-dataset values in its protocol table).
# Block indices are those of a 12-block ViT-B/16; a shallower tower needs them overridden
# (--head-param). Constants are the public code's.
METHODS["sc-clip"] = MethodSpec(
    name="sc-clip",
    summary="SC-CLIP: LOF outlier fix, block-8/3 similarity pooling, kk + similarity-prior attention "
            "run twice (main + multi-level sum of blocks 3..9)",
    default_pretrained="openai",
    protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                      logit_scale=40.0, prob_thd=0.0),
    head_family=SC_CLIP,
    head_params=ScClipParams(pre_adjust_block=8, post_adjust_block=3, multi_start=3, multi_stop=10, res_cls=0.3,
                             beta=0.4, lof_k=30, lof_quantile=0.95, attn_sharpen=3.0),
    pos_rule="scale",
    class_names="sclip",
    dataset_protocol={
        "voc21": {"logit_scale": 50.0, "prob_thd": 0.15, "area_thd": 0.1},
        "context60": {"logit_scale": 40.0, "prob_thd": 0.15},
        "coco-object": {"logit_scale": 55.0, "prob_thd": 0.35},
        "cityscapes": {"short_side": 560},
    },
    # The repo's README radar figure (backbone not named; B/16 is the repo default).
    published_miou=_per_dataset(64.6, 36.8, 37.7, 84.3, 41.0, 40.1, 20.1, 26.6, avg=43.9),
)

# ResCLIP's RCS on NACLIP (docs/methods.md#resclip-rcs; SFR excluded).
# ResCLIP evaluates VOC21/VOC20 on the whole image (non-square grid); clipfuse slides 224 windows
# there unless a graph of the processing size is exported (a stated deviation, docs/methods.md#resclip-rcs).
METHODS["rcs"] = MethodSpec(
    name="rcs",
    summary=("NACLIP + ResCLIP RCS (no SFR): tau*((1-lam) softmax(kk^T+G) + lam * mean attention of "
             "blocks 5..8), no residual/FFN; lam per dataset. Deviation: ResCLIP runs VOC21/VOC20 on the "
             "whole image (non-square grid); clipfuse slides square 224 windows there (graphs are square)"),
    default_pretrained="openai",
    protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                      logit_scale=40.0, prob_thd=0.0),
    head_family=RCS,
    head_params=RcsParams(lam=0.3, tau=2.0, gaussian_sigma=5.0, attention_blocks=(5, 6, 7, 8)),
    pos_rule="scale",
    class_names="sclip",
    dataset_protocol={
        "voc21": {"prob_thd": 0.1},
        "context60": {"prob_thd": 0.1},
        "coco-object": {"prob_thd": 0.1},
        "cityscapes": {"short_side": 560},
    },
    dataset_head_params={
        "voc21": {"lam": 0.3}, "context60": {"lam": 0.3}, "coco-object": {"lam": 0.4},
        "voc20": {"lam": 0.6}, "context59": {"lam": 0.4}, "coco-stuff164k": {"lam": 0.4},
        "cityscapes": {"lam": 0.2}, "ade20k": {"lam": 0.3},
    },
)

METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ClipfuseError(
            f"unknown head {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def head_defaults(method: str) -> dict:
    """The default DenseHead parameters of `method` (a fresh dict)."""
    return get_method(method).default_head_params()


# Tags whose weights were trained with QuickGELU (OpenAI's own release and its re-uploads).
QUICKGELU_TAGS = frozenset({"openai"})
