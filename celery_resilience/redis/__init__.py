"""The plugin's kombu Redis transport: kombu's, with the atomic fetch, the origin stamp,
restores that keep queue and priority, and the fixes for lost connections.

See :mod:`.transport` for how it is selected and composed, :mod:`.channel` for what it
changes, :mod:`.fetch`, :mod:`.qos` and :mod:`.restore` for the parts.
"""

from __future__ import annotations

from .channel import Channel, ChannelMixin, SentinelChannel
from .qos import QoS, QoSMixin
from .transport import SentinelTransport, Transport, TransportMixin

__all__ = [
    "Channel",
    "ChannelMixin",
    "QoS",
    "QoSMixin",
    "SentinelChannel",
    "SentinelTransport",
    "Transport",
    "TransportMixin",
]
