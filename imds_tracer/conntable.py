"""The one bounded connection table: at most `max_conns` entries, least recently used out first.

Every place that follows connections keeps one (the packet demultiplexer, reassembly, the
kernel sources' socket table), each bounded by `flows.max_flows`, so that a process opening
connections without end costs the agent a fixed amount of memory. What is pushed out is
handed back to the caller, which counts or closes it: eviction is never silent.

    table = ConnTable(max_conns)
    value = table.get(key)            # None when absent; marks the entry as just used
    evicted = table.put(key, value)   # (key, value) pushed out to make room, or None
    table.pop(key)                    # removes it (None when absent)
    for key, value in table.items():  # a snapshot, least recently used first
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, List, Optional, Tuple, TypeVar

V = TypeVar("V")


class ConnTable(Generic[V]):
    __slots__ = ("max_conns", "_entries")

    def __init__(self, max_conns: int):
        self.max_conns = max(1, int(max_conns))
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Optional[V]:
        """The entry, marked as the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> Optional[Tuple[Hashable, V]]:
        """Add (or replace) an entry as the most recently used. When the table was full, the
        least recently used entry is removed and returned for the caller to account for."""
        entries = self._entries
        evicted = None
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.max_conns:
            evicted = entries.popitem(last=False)
        entries[key] = value
        return evicted

    def pop(self, key: Hashable) -> Optional[V]:
        return self._entries.pop(key, None)

    def items(self) -> List[Tuple[Hashable, V]]:
        """A snapshot of the entries, least recently used first (safe to change the table
        while walking it)."""
        return list(self._entries.items())

    def keys(self) -> List[Hashable]:
        return list(self._entries)
