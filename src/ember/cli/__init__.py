"""The `ember` command-line client."""
