"""Content-addressed storage of code bundles."""
