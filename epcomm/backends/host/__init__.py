"""Host backend: the GPU protocol on numpy over MPI one-sided windows (see backend.py)."""
from .backend import HostBackend

__all__ = ["HostBackend"]
