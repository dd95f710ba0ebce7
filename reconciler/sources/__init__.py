"""Sources: reading manifest and instance directories from disk (I/O edge) and watching them."""
