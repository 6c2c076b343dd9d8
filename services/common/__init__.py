"""Shared runtime of the costmesh services: settings, logging, telemetry, errors, server bootstrap, pricing."""
