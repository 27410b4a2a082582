"""Helpers that start real components (Exim, sinks, ...) on loopback for tests."""
