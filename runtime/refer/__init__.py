"""Zero-shot referring segmentation (Global-Local CLIP) on exported graphs, torch-free.

nounphrase: the sentence -> noun phrase rule (spaCy when installed, a small heuristic otherwise).
masks: mask proposals from files (PNG, NPZ, COCO RLE/polygons) or generated without training.
pipeline: numpy pre-processing, the global/local/text graphs, and the mask ranking.
metrics: oIoU and mIoU as the public evaluation computes them.
dataset: RefCOCO/RefCOCO+/RefCOCOg in the REFER layout (refs pickle + COCO instances JSON).
"""
