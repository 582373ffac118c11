"""Every exception blsgpu raises of its own, in one place (all exported from ``blsgpu``).

- ``BLSError``: an exchange failed or the channel is no longer usable; ``PeerError`` (a peer did not
  deliver, named with the channel and iteration) and ``BoundError`` (more than B+1 outstanding) are
  its kinds.
- ``PeerFailure``: what a transport raises when a message to or from one peer failed, with that
  peer; the engine turns it into a ``PeerError``. ``LinkError`` is the in-process fabric's kind.
- ``RankError``: a rank of ``run_world`` raised or died.

Bad arguments raise ``ValueError`` or ``TypeError`` before anything is sent.
"""

from __future__ import annotations


class BLSError(RuntimeError):
    """A BLS exchange failed: a peer died or fell silent, or the channel is no longer usable."""


class PeerError(BLSError):
    """A peer did not deliver: it died, closed its connection, or stayed silent past the timeout.

    Attributes name what failed, so callers can act on it without parsing the message.
    """

    def __init__(self, message: str, *, peer: int, channel: str, iteration: int):
        super().__init__(message)
        self.peer = peer
        self.channel = channel
        self.iteration = iteration

    def __reduce__(self):
        # Keyword-only fields: tell pickle how to rebuild (errors cross process boundaries).
        return (_rebuild_peer_error, (str(self), self.peer, self.channel, self.iteration))


class BoundError(BLSError):
    """More than B+1 exchanges outstanding on a channel: wait() an older one first."""


class PeerFailure(RuntimeError):
    """A transport's message to or from one peer failed.

    `peer` says with whom (-1: not known; the engine then asks the transport to blame one), and
    `reason` what happened in words the engine repeats as they are: "connection closed",
    "timed out", "aborted", or None (then the message is the reason).
    """

    CLOSED = "connection closed: the peer process died or closed its channel"
    TIMED_OUT = "timed out: the peer is silent"
    ABORTED = "the channel was abandoned"

    def __init__(self, message: str, peer: int = -1, reason: str | None = None):
        super().__init__(message)
        self.peer = peer
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.peer, self.reason))


class LinkError(PeerFailure):
    """A message of the in-process fabric did not come: the peer left or stayed silent."""


class RankError(RuntimeError):
    """A rank of run_world raised or died; `rank` says which, `remote_type` what it raised."""

    def __init__(self, message: str, rank: int, remote_type: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type

    def __reduce__(self):
        return (type(self), (str(self), self.rank, self.remote_type))


def _rebuild_peer_error(message: str, peer: int, channel: str, iteration: int) -> PeerError:
    return PeerError(message, peer=peer, channel=channel, iteration=iteration)
