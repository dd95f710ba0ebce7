"""Caddy edge (I/O): finding and installing the binary, the admin API client, the process supervisor."""
