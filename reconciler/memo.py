"""One identity-keyed memory for per-object results kept from pass to pass: the statuses
(:class:`reconciler.status.StatusMemo`), the encoded JSON of routes (:class:`reconciler.render.ConfigEncoder`)
and of state file entries (:mod:`reconciler.state.store`). PURE.

The renderer, the resolver and the readers keep per-object results too, under the same invariant, in
memories of their own: the renderer patches last pass's entries in place of a round, the resolver reuses
last pass's verdicts wholesale, the readers key by path -- each says so where it keeps them.

The invariant every user relies on, stated once: **an entry holds the object it was made for.** The object
therefore stays alive as long as its entry exists, so its ``id()`` cannot be given to another object
meanwhile: an entry found under ``id(obj)`` whose stored object ``is obj`` belongs to ``obj``. And it is
only sound for objects that are never changed after they were made (frozen dataclasses, rendered configs
that later passes copy instead of changing -- ``tests/test_render.py`` checks that).

A memory works in rounds (one per pass, or per file written): what a round did not use is forgotten when
the next begins, so it never outgrows its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class IdentityMemo(Generic[K, V]):
    """Values made from objects, found again by the objects' identity. ``extra`` (optional, hashable or
    comparable) is what the value depends on besides the object: a hit needs it equal too."""

    __slots__ = ("_entries", "_used")

    def __init__(self) -> None:
        self._entries: dict[int, tuple[K, Any, V]] = {}
        self._used: dict[int, tuple[K, Any, V]] = {}

    def get(self, obj: K, make: Callable[[], V], extra: Hashable = None) -> V:
        """The value for ``obj`` (made with ``make()`` when there is none, or when ``extra`` changed); it is
        kept for the next round."""
        hit = self._entries.get(id(obj))
        if hit is None or hit[0] is not obj or hit[1] != extra:
            hit = (obj, extra, make())
        self._used[id(obj)] = hit
        return hit[2]

    def round(self) -> None:
        """End a round: keep only what it used."""
        self._entries, self._used = self._used, {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return (obj for obj, _, _ in self._entries.values())
