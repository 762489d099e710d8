"""``POST /evict`` of the reference proxy: engine hooks that report evicted request ids.

The reference keeps its index in sync through engine hooks that post the
ids of evicted requests.  With KV events the proxy learns every eviction
from the engine itself, page by page, so a posted id changes nothing
there.  Without events the index models the cache, and an engine that
still posts ids (an older engine with the reference's hooks) corrects the
model: the served block sequence of each id it names is dropped from the
modelled tree, from the point where no other served sequence continues it
or ends (a shared prefix stays, as it does in the engine's radix tree).

The proxy remembers which sequence each request id served (the backend's
response ``id``, and the ``request_id`` a client sent) in a bounded table.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from contextpilot_engine.index import ContextIndex

__all__ = ["ServedPaths", "ServedPath"]


@dataclass(frozen=True)
class ServedPath:
    tenant: str
    #: the preamble's key, then each block's key, in prompt order
    keys: tuple[int, ...]
    #: it was planned against the modelled index (only those can be evicted by id)
    modelled: bool
    #: the data-parallel rank it was served by (whose modelled index holds it)
    rank: int = 0


class ServedPaths:
    """Request id -> the block sequence it served (least recently served dropped beyond ``capacity``)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._paths: OrderedDict[str, ServedPath] = OrderedDict()
        #: (rank, tenant, keys) -> remembered ids whose sequence ends exactly there: the tree does not
        #: record where a served sequence ends, and a shorter one inside a longer one must outlive it
        self._ends: Counter[tuple] = Counter()

    def __len__(self) -> int:
        return len(self._paths)

    def remember(self, request_id: str, path: ServedPath) -> None:
        old = self._paths.get(request_id)
        if old is not None:
            self._forget_end(old)
        self._paths[request_id] = path
        self._paths.move_to_end(request_id)
        self._ends[_end(path)] += 1
        while len(self._paths) > self.capacity:
            self._forget_end(self._paths.popitem(last=False)[1])

    def _forget_end(self, path: ServedPath) -> None:
        end = _end(path)
        self._ends[end] -= 1
        if self._ends[end] <= 0:
            del self._ends[end]

    def evict(self, request_ids: list[str], indexes: list[ContextIndex]) -> tuple[int, list[str]]:
        """Drop each id's sequence from its rank's modelled index (``indexes[rank]``); ``(removed, not found)``.

        Runs on the event loop, where the modelled index is planned, so no
        other thread changes it meanwhile.
        """
        removed = 0
        missing = []
        for rid in request_ids:
            path = self._paths.pop(rid, None)
            if path is None:
                missing.append(rid)
                continue
            self._forget_end(path)
            if path.modelled and path.rank < len(indexes) and _drop_leaf(indexes[path.rank], path, self._ends):
                removed += 1
        return removed, missing


def _end(path: ServedPath) -> tuple:
    return (path.rank, path.tenant, path.keys)


def _drop_leaf(index: ContextIndex, path: ServedPath, ends: Counter) -> bool:
    """Remove the sequence's nodes that no other sequence continues or ends at (deepest first)."""
    state = index.peek(path.tenant)
    if state is None:
        return False
    trie = state.trie
    node = trie.root
    for key in path.keys:
        node = node.children.get(key)
        if node is None:
            return False
    top, depth = node, len(path.keys)
    while (top.parent is not None and top.parent is not trie.root and len(top.parent.children) == 1
           and not ends.get((path.rank, path.tenant, path.keys[: depth - 1]))):
        top, depth = top.parent, depth - 1
    if node.children:
        return False  # a longer sequence continues this one: it stays cached
    trie.remove_subtree(top)
    return True
