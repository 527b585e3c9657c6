"""Metrics, activation records and captured logs: the data plane appends, the server drains."""
