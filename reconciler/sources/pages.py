"""The operator's error pages (``HYPEMAN_ERROR_PAGES_DIR``), read at start: ``<status>.html`` and
``<status>.txt`` for 404 (no ingress for the host), 502, 503 and 504 (the instance down, restarting,
too slow). Either kind may be missing; a page may quote ``{host}`` and ``{instance}``."""

from __future__ import annotations

import dataclasses
import os

from reconciler.errors import ConfigError
from reconciler.settings import Settings

#: the statuses a page may be for
PAGE_STATUSES = (404, 502, 503, 504)
MAX_PAGE_BYTES = 64 * 1024


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PAGE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"HYPEMAN_ERROR_PAGES_DIR: {path}: {exc.strerror}") from exc
    if len(raw) > MAX_PAGE_BYTES:
        raise ConfigError(f"HYPEMAN_ERROR_PAGES_DIR: {path}: larger than {MAX_PAGE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"HYPEMAN_ERROR_PAGES_DIR: {path}: not UTF-8 text") from exc
    if any((ord(c) < 0x20 and c not in "\t\n\r") or ord(c) == 0x7F for c in text):
        raise ConfigError(f"HYPEMAN_ERROR_PAGES_DIR: {path}: holds control characters")
    return text


def with_error_pages(settings: Settings) -> Settings:
    """``settings`` with the pages of ``error_pages_dir`` (none when it is unset); :class:`ConfigError` for a
    directory that is missing or a page that cannot be used."""
    where = settings.error_pages_dir
    if where is None:
        return settings
    if not os.path.isdir(where):
        raise ConfigError(f"HYPEMAN_ERROR_PAGES_DIR={where!r}: no such directory")
    pages = []
    for status in PAGE_STATUSES:
        html, text = _read(os.path.join(where, f"{status}.html")), _read(os.path.join(where, f"{status}.txt"))
        if html is not None or text is not None:
            pages.append((status, html, text))
    return dataclasses.replace(settings, error_pages=tuple(pages))
