"""State (I/O edge): persisted status and last-known-good inputs under ``{data}/state/``."""
