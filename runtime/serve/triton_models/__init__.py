"""model.py files that `clipfuse triton-repo` copies into Python-backend models (not imported here)."""
