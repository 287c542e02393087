"""Helpers for tests of (and with) the appliance: start it, talk to it."""
