"""Inference backends behind one small interface (see base.Backend)."""
from .base import Backend, available_backends, open_backend, register_backend

__all__ = ["Backend", "available_backends", "open_backend", "register_backend"]
