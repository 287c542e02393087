"""Client-side tools: the vfio-user client, the NVMe host driver, the migration
orchestrator (above the runtime: they talk to an appliance over its sockets)."""
