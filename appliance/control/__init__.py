"""The control socket: a JSON-lines protocol (``protocol``) and its command table (``commands``)."""
