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


class EPCapacityError(EPError):
    """A dispatch round would have put more routed rows on a rank than EPConfig.recv_capacity allows.

    Every rank raises it for that round; nothing of the round was delivered and nothing was written past the
    capacity; the buffer stays usable (the next round is unaffected). ``rank``: the rank that would have received
    the most rows over its capacity; ``needed``: its rows; ``capacity``: EPConfig.recv_rows; ``round``: the dispatch
    round (of this buffer); ``overflowing``: every rank over capacity, {rank: rows}.
    """

    def __init__(self, message: str, *, rank: int, needed: int, capacity: int, round: int | None = None,
                 overflowing: dict | None = None):
        super().__init__(message)
        self.rank = rank
        self.needed = needed
        self.capacity = capacity
        self.round = round
        self.overflowing = overflowing if overflowing is not None else {rank: needed}

    @classmethod
    def for_round(cls, cfg, needed_by_rank, round: int | None, describe=None,
                  ranks_over: int | None = None) -> "EPCapacityError":
        """The error for a round whose routed rows per rank were needed_by_rank (any sequence indexed by rank; the
        GPU record knows only the rank most over, and ranks_over, how many ranks were over)."""
        over = {r: int(n) for r, n in enumerate(needed_by_rank) if int(n) > cfg.recv_rows}
        rank = max(over, key=lambda r: (over[r], -r))
        name = describe(rank) if describe else f"rank {rank}"
        others = sorted(set(over) - {rank})
        also = f" (also over: ranks {others})" if others else ""
        if ranks_over is not None and ranks_over > len(over):
            also = f" ({ranks_over} ranks over capacity)"
        when = f"dispatch round {round}" if round is not None else "dispatch"
        return cls(f"epcomm: {when}: {name} would receive {over[rank]} routed rows > recv_capacity {cfg.recv_rows}"
                   f"{also}; nothing of this round was delivered, every rank raises this and the buffer stays "
                   f"usable. Raise EPConfig.recv_capacity / recv_capacity_factor (worst case "
                   f"{cfg.worst_case_recv_rows} rows) or send fewer tokens per round",
                   rank=rank, needed=over[rank], capacity=cfg.recv_rows, round=round, overflowing=over)


class EPOverwriteError(EPError):
    """A call refused on the device because of a live dispatch result (GPU backend; eager calls and CUDA-graph
    replays on one buffer, docs/ARCHITECTURE.md "Micro-batches, graphs and eager calls"): a dispatch whose output set
    still held the result of another call, not yet combined; a combine of a result that was not live (its dispatch
    was refused, or it was combined or released already); or a call launched while an *_async of the buffer still
    waited for its *_wait. The refused call did nothing on any rank (every rank refuses the same one): the result
    held is intact, its combine still works, and the buffer stays usable. Raised once, by check() / synchronize().

    ``op``: "dispatch" or "combine" (the first call refused since the last report); ``reason``: "live",
    "not_live" or "pending"; ``output_set``: 0 or 1; ``captured``: whether that call (a combine: its dispatch) was
    captured in a CUDA graph (False: eager); ``holder``: "eager", "captured" or None, the call whose result the set
    held; ``count``: calls refused since the last report (a refused dispatch's combine is one of them).
    """

    def __init__(self, message: str, *, op: str, reason: str, output_set: int, captured: bool,
                 holder: str | None, count: int = 1):
        super().__init__(message)
        self.op, self.reason, self.output_set, self.captured = op, reason, output_set, captured
        self.holder, self.count = holder, count


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


class EPRankLostError(EPError):
    """A peer was declared dead (fenced off) while this rank's tokens of ``round`` were on its experts: raised by
    that round's combine instead of a partial sum. The buffer stays usable: later rounds run without the peer
    (``EPBuffer.active_ranks``), and tokens routed to its experts are dropped and reported
    (``DispatchResult.dropped``). docs/FAILURES.md, "Fencing off a dead rank".

    ``rank`` / ``node`` / ``experts``: the lost peer and the global expert ids it held; ``round``: the dispatch
    round; ``tokens``: how many of this rank's tokens had a top-k slot on it; ``ranks``: every peer lost in that
    round with tokens of this rank (``rank`` is the first).
    """

    def __init__(self, message: str, *, rank: int, node: int | None, experts: range | None, round: int,
                 tokens: int = 0, ranks: tuple = ()):
        super().__init__(message)
        self.rank, self.node, self.experts, self.round = rank, node, experts, round
        self.tokens, self.ranks = tokens, tuple(ranks) or (rank,)


class EPFencedError(EPError):
    """This rank was declared dead by a peer (fenced off: it missed a deadline, or a peer called
    ``EPBuffer.fence``); the others go on without it, so this buffer is unusable here. ``by``: the rank that
    declared it."""

    def __init__(self, message: str, *, rank: int, by: int):
        super().__init__(message)
        self.rank, self.by = rank, by
