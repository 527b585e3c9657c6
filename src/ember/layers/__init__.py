"""Function requirements: read and checked (`requirements`), resolved and installed into
shared read-only layers (`builder`)."""
