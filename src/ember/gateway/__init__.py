"""The data plane's front door: `/fn/{name}/{path…}` to the pool, with no database on the way."""
