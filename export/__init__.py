"""clipfuse.export: fuse a dense-CLIP head and its classifier into one ONNX graph (needs torch)."""
