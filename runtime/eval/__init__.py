"""Accuracy harness: benchmark readers, streaming mIoU, resumable records and reports.

Torch-free like the rest of clipfuse.runtime; the PyTorch reference is only reached through the
"torch" backend when `clipfuse eval --compare-reference` asks for it.
"""
from .datasets import DATASET_NAMES, EvalDataset, Sample, canonical_name, classes_file, open_dataset
from .metrics import ConfusionMatrix, iou_per_class, mean_iou, pixel_accuracy
from .report import PAPER_MIOU, EvalRecord, markdown_report
from .runner import check_vocabulary, evaluate, protocol_overrides

__all__ = [
    "DATASET_NAMES", "EvalDataset", "Sample", "canonical_name", "classes_file", "open_dataset",
    "ConfusionMatrix", "iou_per_class", "mean_iou", "pixel_accuracy",
    "PAPER_MIOU", "EvalRecord", "markdown_report",
    "check_vocabulary", "evaluate", "protocol_overrides",
]
