"""Ember: self-hosted serverless functions that start from zero in milliseconds.

The names a handler uses: `Request`, `Context`, `Response` and the `on_fork` decorator.
"""

from ember.runtime.api import Context, Request, Response, on_fork

__all__ = ["Context", "Request", "Response", "on_fork"]
__version__ = "0.1.0"
