"""Live handoff: the live devices of one process, with their clients, to another.

* :mod:`~appliance.runtime.handoff.channel` - the two ends (``HandoffSource``,
  ``HandoffSink``): the control-socket negotiation, the channel, the verdict.
* :mod:`~appliance.runtime.handoff.frames` - the channel's frames and the
  HANDOFF record (the manifest) of the migration stream.
* :mod:`~appliance.runtime.handoff.manifest` - the manifest as a typed,
  frozen value: every part with ``to_json`` and a checked ``from_json``.
* :mod:`~appliance.runtime.handoff.net` - the vhost-user-net ports' state:
  export, typed parse, check, replay.

The vfio-user connection's state is :mod:`appliance.vfio_user.handoff_state`
(protocol layer).  See docs/handoff.md.
"""
