"""Exceptions raised by blsgpu."""

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


def _rebuild_peer_error(message: str, peer: int, channel: str, iteration: int) -> PeerError:
    return PeerError(message, peer=peer, channel=channel, iteration=iteration)
