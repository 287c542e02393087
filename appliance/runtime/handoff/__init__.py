"""Live handoff: the live devices of one process, with their clients, to another.

* :mod:`~appliance.runtime.handoff.source` - the sending end (``handoff``):
  the question, pre-copy, the pause, the verdict, as steps of the event loop.
* :mod:`~appliance.runtime.handoff.sink` - the receiving end (``handoff.accept``):
  reads the stream as it comes, checks, adopts, waits for ``go``.
* :mod:`~appliance.runtime.handoff.channel` - one end of the socket between the
  two processes: non-blocking, a bounded output queue, a progress deadline.
* :mod:`~appliance.runtime.handoff.frames` - the channel's frames and the
  HANDOFF record (the manifest) of the migration stream.
* :mod:`~appliance.runtime.handoff.manifest` - the manifest as a typed,
  frozen value: every part with ``to_json`` and a checked ``from_json``.
* :mod:`~appliance.runtime.handoff.net` - the vhost-user-net ports' state:
  export, typed parse, check, replay.

The vfio-user connection's state is :mod:`appliance.vfio_user.handoff_state`
(protocol layer).  See docs/handoff.md.
"""
