"""Exceptions raised by epcomm. Every failure a user can hit maps to one of these."""


class EPError(RuntimeError):
    """Base class of every epcomm error."""


class EPInputError(EPError, ValueError):
    """Bad arguments (shape, dtype, ids out of range, too many tokens), raised before anything is sent."""


class EPPeerRejectedError(EPError):
    """A peer refused its own input for this round (it raised EPInputError) and took part with nothing, so this
    rank's result would miss that peer's contribution: raised instead of a partial sum. The buffer stays usable.

    ``rank`` / ``node``: the peer that refused; ``round``: the dispatch round; ``what``: "dispatch" (its experts did
    not run, since its dispatch was refused) or "combine" (it refused its combine input).
    """

    def __init__(self, message: str, *, rank: int, node: int | None, round: int, what: str):
        super().__init__(message)
        self.rank, self.node, self.round, self.what = rank, node, round, what


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

    @classmethod
    def peer_missing(cls, *, waiter: int, waiter_node: int | None, peer: int, node: int | None,
                     experts: range | None, what: str, round: int, timeout_s: float,
                     missing: list[int] | None = None) -> "EPTimeoutError":
        """The error of a wait for `peer` that ran past its deadline, worded the same by every backend:

        rank 0 (node 0) timed out after 30 s waiting for dispatch tokens (round 7) from rank 5 (node 1), which never
        signalled (it holds experts 160..191)

        missing: every peer that had not signalled, when more than one (listed at the end)."""
        def who(rank: int, on: int | None) -> str:
            return f"rank {rank}" + (f" (node {on})" if on is not None else "")

        holds = f" (it holds experts {experts.start}..{experts.stop - 1})" if experts else ""
        more = f"; all missing: {sorted(set(missing))}" if missing and len(set(missing)) > 1 else ""
        message = (f"{who(waiter, waiter_node)} timed out after {timeout_s:g} s waiting for {what} (round {round}) "
                   f"from {who(peer, node)}, which never signalled{holds}{more}")
        return cls(message, rank=peer, node=node, what=f"{what} round {round}", waiter=waiter, experts=experts)
