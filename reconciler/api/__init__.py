"""HTTP API (I/O): Starlette app + the thin manifest writer. Imports the loop and everything below."""
