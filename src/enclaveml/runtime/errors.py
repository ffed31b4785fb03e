"""The channel's own failures (both trust sides): the peer broke the frame protocol or went away.

Not `enclaveml.errors`: these never travel on the channel; they say the channel itself failed.
"""

from __future__ import annotations


class ChannelError(ConnectionError):
    """The peer sent a malformed frame, or the channel is closed."""


class ChannelClosed(ChannelError):
    """The other end closed the channel (or its process died)."""
