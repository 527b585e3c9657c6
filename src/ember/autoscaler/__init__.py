"""Scaling and keep-alive decisions: pure functions of (spec, observed state, now)."""
