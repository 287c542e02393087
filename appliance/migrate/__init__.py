"""Live migration of device state between appliances (vfio-user migration v2).

* :mod:`appliance.migrate.states` - the migration state machine: arcs, next hop, paths.
* :mod:`appliance.migrate.stream` - the versioned, checksummed record stream.
* :mod:`appliance.migrate.device` - what a device offers (:class:`Migratable`) and the
  PCI state every device shares.
* :mod:`appliance.migrate.nvme_state` - NVMe controller and namespace save/restore.
* :mod:`appliance.migrate.orchestrator` - the client that migrates src -> dst.

The vfio-user side (commands 16-18) is :mod:`appliance.vfio_user.migration`; see
docs/migration.md.  Nothing is imported here, so the protocol layer can import the
wire-level modules without pulling in devices or the client.
"""
