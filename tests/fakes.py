"""Test doubles shared by the EPBuffer front-end tests (tests/unit/test_buffer_*.py)."""
from __future__ import annotations


class QuietBackend:
    """The lifecycle half of a backend that records its calls and has nothing to wait for: each test's fake adds the
    dispatch / combine methods it exercises. `calls` lists what EPBuffer asked for, in order."""
    broken = None
    sms_used = None

    def __init__(self):
        self.calls: list[str] = []

    def synchronize(self):
        pass

    def raise_pending(self):
        pass

    def abort(self, reason):
        self.calls.append("abort")

    def close(self):
        pass
