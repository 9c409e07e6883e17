"""clipfuse on NVIDIA Triton Inference Server.

    core.py          segment a Triton batch of images, all their windows through the backend together
                     (no Triton import: shared by the PyTriton server and the repository's Python model)
    server.py        `clipfuse serve`: one Triton server (nvidia-pytriton) serving clipfuse artifacts
    repository.py    `clipfuse triton-repo`: a model repository for a standalone Triton
    triton_models/   the Python-backend model.py files the repository ships

Everything here is torch-free; pytriton / tritonclient are imported only where a server is started
or a configuration is validated (pip install 'clipfuse[serve]').
"""
