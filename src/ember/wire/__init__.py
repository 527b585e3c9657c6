"""Messages that cross process boundaries, and their framing. Types only, no I/O."""
