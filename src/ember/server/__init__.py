"""Glue: builds every component from one `ServerConfig` and runs them under uvicorn."""
