"""Ember's benchmark suite: each module measures Ember against bare Starlette + uvicorn."""
