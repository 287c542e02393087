"""NBD client protocol (protocol layer): the wire (``wire.py``), the sans-I/O
client connection (``protocol.py``) and NBD URIs (``uri.py``).

The runtime's :mod:`appliance.runtime.nbd` drives a connection over a socket;
nothing here does I/O (NetworkBlockDevice/nbd ``doc/proto.md``).
"""
