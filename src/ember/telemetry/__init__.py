"""Metrics, activation records and captured logs: appended by the data plane, drained by the server."""
