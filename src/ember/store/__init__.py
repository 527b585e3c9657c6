"""Metadata: functions, revisions, activation records, logs. SQLite now; PostgreSQL later."""
