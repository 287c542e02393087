"""Networking: vhost-user-net ports, the switch joining them, and the responder.

Layers (docs/architecture.md): :mod:`.vhost_wire` (wire), :mod:`.vhost_protocol`
(sans-I/O vhost-user back-end connection), :mod:`.virtqueue`, :mod:`.port`,
:mod:`.switch`, :mod:`.responder`, :mod:`.pcap` (device).  The runtime side is
:mod:`appliance.runtime.vhost_user` (``NetService``).
"""
