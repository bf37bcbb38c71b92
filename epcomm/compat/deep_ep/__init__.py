"""DeepEP's `deep_ep` module on epcomm: `from epcomm.compat import deep_ep` instead of `import deep_ep`.

Buffer (normal and low-latency dispatch / combine), Config, EventOverlap and topk_idx_t, with DeepEP's call
signatures and return tuples. What each argument does here: docs/COMPAT-DEEPEP.md. Needs torch.
"""
from .buffer import Buffer, DispatchHandle, LowLatencyHandle, topk_idx_t
from .events import Config, EventOverlap

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t", "DispatchHandle", "LowLatencyHandle"]
