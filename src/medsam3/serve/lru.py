"""A thread-safe least-recently-used map bounded by entry count and by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ByteLRU:
    """Keys to values with a size each; putting past ``max_bytes`` or ``max_items`` evicts the oldest.

    ``on_evict(key, value)`` runs for every entry that leaves the map (evicted, popped or cleared),
    outside the lock. An entry larger than ``max_bytes`` on its own is not stored at all.
    """

    def __init__(
        self,
        max_bytes: int,
        max_items: int | None = None,
        on_evict: Callable[[Hashable, Any], None] | None = None,
    ):
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self.on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return default
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int, *, keep: Hashable | None = None) -> bool:
        """Store ``value``; returns False when it is larger than the whole budget (not stored).

        ``keep`` names an entry that must not be evicted to make room (the one a caller is using).
        """
        nbytes = int(nbytes)
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            gone = self._shrink({key, keep})
        self._notify(gone)
        if old is not None and old[0] is not value:
            self._notify([(key, old[0])])
        return True

    def resize(self, key: Hashable, nbytes: int) -> list[Hashable]:
        """Record a new size for ``key`` (it grew or shrank); evicts others if needed. Returns evicted keys."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return []
            self._bytes += int(nbytes) - entry[1]
            self._items[key] = (entry[0], int(nbytes))
            self._items.move_to_end(key)
            gone = self._shrink({key})
        self._notify(gone)
        return [k for k, _ in gone]

    def pop(self, key: Hashable) -> Any:
        with self._lock:
            entry = self._items.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
        self._notify([(key, entry[0])])
        return entry[0]

    def pop_where(self, test: Callable[[Hashable, Any], bool]) -> int:
        """Remove every entry for which ``test(key, value)`` holds; returns how many."""
        with self._lock:
            doomed = [(k, v) for k, (v, _) in self._items.items() if test(k, v)]
            for k, _ in doomed:
                self._bytes -= self._items.pop(k)[1]
        self._notify(doomed)
        return len(doomed)

    def clear(self) -> None:
        self.pop_where(lambda k, v: True)

    def values(self) -> list[Any]:
        with self._lock:
            return [v for v, _ in self._items.values()]

    def _shrink(self, protected: set) -> list[tuple[Hashable, Any]]:
        gone = []
        for key in list(self._items):
            over = self._bytes > self.max_bytes or (self.max_items is not None and len(self._items) > self.max_items)
            if not over:
                break
            if key in protected:
                continue
            value, size = self._items.pop(key)
            self._bytes -= size
            self.evictions += 1
            gone.append((key, value))
        return gone

    def _notify(self, gone: list[tuple[Hashable, Any]]) -> None:
        if self.on_evict is None:
            return
        for key, value in gone:
            self.on_evict(key, value)
