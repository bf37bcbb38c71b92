"""Exceptions raised by epcomm. Every failure a user can hit maps to one of these."""


class EPError(RuntimeError):
    """Base class of every epcomm error."""


class EPInputError(EPError, ValueError):
    """Bad arguments (shape, dtype, ids out of range, too many tokens), raised before anything is sent."""


class EPTimeoutError(EPError, TimeoutError):
    """A peer did not arrive before the deadline.

    Attributes name the peer that stalled so an operator can find it: ``rank`` and ``node`` of the peer that never
    signalled, ``experts`` (the global expert ids that peer holds, a range), ``what`` (which phase was waited for)
    and ``waiter`` (the rank that gave up).
    """

    def __init__(self, message: str, *, rank: int | None = None, node: int | None = None,
                 what: str = "", waiter: int | None = None, experts: range | None = None):
        super().__init__(message)
        self.rank = rank
        self.node = node
        self.what = what
        self.waiter = waiter
        self.experts = experts
