"""What each dense head is, as data: defaults of weights, export size and inference protocol.

Torch-free so the runtime, the CLI's `heads` listing and the exporter all read the same table.
Numbers are those of the methods' public code (see the project README for sources).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    default_pretrained: str
    default_size: int
    protocol: Protocol
    # Per-dataset overrides of the protocol, keyed by clipfuse dataset name.
    dataset_protocol: Dict[str, dict] = field(default_factory=dict)

    def protocol_for(self, dataset: Optional[str] = None) -> Protocol:
        if dataset is None or dataset not in self.dataset_protocol:
            return self.protocol
        return replace(self.protocol, **self.dataset_protocol[dataset])


METHODS: Dict[str, MethodSpec] = {
    "maskclip": MethodSpec(
        name="maskclip",
        summary="MaskCLIP value path: last block without attention mixing, residual+FFN kept",
        default_pretrained="openai",
        default_size=448,
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224,
                          score_type="cosine", logit_scale=100.0),
    ),
    "sclip": MethodSpec(
        name="sclip",
        summary="SCLIP correlative self-attention softmax(qq^T)+softmax(kk^T), residual+FFN kept",
        default_pretrained="openai",
        default_size=224,
        protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                          logit_scale=40.0, prob_thd=0.0),
        dataset_protocol={
            "voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1},
            "context60": {"logit_scale": 50.0, "prob_thd": 0.1},
            "coco-object": {"logit_scale": 50.0, "prob_thd": 0.1},
            "cityscapes": {"short_side": 560},
            "coco-stuff164k": {"short_side": 448},
        },
    ),
    "clip-dinoiser": MethodSpec(
        name="clip-dinoiser",
        summary="CLIP-DINOiser: MaskCLIP features pooled by a learned patch correlation + background head",
        default_pretrained="laion2b_s34b_b88k",
        default_size=448,
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224,
                          score_type="probability", logit_scale=1.0),
    ),
    "clearclip": MethodSpec(
        name="clearclip",
        summary="ClearCLIP: softmax(qq^T) attention, no residual, no FFN",
        default_pretrained="openai",
        default_size=448,
        protocol=Protocol(short_side=448, long_side_max=2048, window=448, stride=224, score_type="cosine",
                          logit_scale=50.0),
    ),
    "naclip": MethodSpec(
        name="naclip",
        summary="NACLIP: softmax(kk^T + Gaussian neighbourhood bias), no residual, no FFN",
        default_pretrained="openai",
        default_size=224,
        protocol=Protocol(short_side=336, long_side_max=2048, window=224, stride=112, score_type="cosine",
                          logit_scale=40.0),
        dataset_protocol={"cityscapes": {"short_side": 560}},
    ),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ClipfuseError(
            f"unknown head {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


# Tags whose weights were trained with QuickGELU (OpenAI's own release and its re-uploads).
QUICKGELU_TAGS = frozenset({"openai"})
