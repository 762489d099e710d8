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
    """Request id -> the block sequence it served (least recently served dropped beyond ``capacity``).

    One served request may be remembered under several ids (the backend's
    response id and the client's ``request_id``): they are aliases of one
    entry, and evicting by any of them forgets them all.
    """

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._paths: OrderedDict[str, ServedPath] = OrderedDict()
        #: the ids of each remembered request, by its path object
        self._aliases: dict[int, list[str]] = {}
        #: (rank, tenant) -> keys -> requests whose sequence ends exactly there: the tree does not
        #: record where a served sequence ends, and a shorter one inside a longer one must outlive it
        self._ends: dict[tuple, Counter] = {}
        #: (rank, tenant) -> lengths at which those sequences end, so a climb checks only those depths
        self._lengths: dict[tuple, Counter] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def remember(self, request_id: str, path: ServedPath) -> None:
        old = self._paths.get(request_id)
        if old is not None:
            self._unlink(request_id, old)
        self._paths[request_id] = path
        self._paths.move_to_end(request_id)
        ids = self._aliases.get(id(path))
        if ids is None:
            self._aliases[id(path)] = [request_id]
            self._count_end(path, 1)
        else:
            ids.append(request_id)
        while len(self._paths) > self.capacity:
            self._unlink(*self._paths.popitem(last=False))

    def _unlink(self, request_id: str, path: ServedPath) -> None:
        """Forget one id of ``path`` (already out of the id table); the request goes with its last id."""
        ids = self._aliases.get(id(path))
        if ids is None:
            return
        if request_id in ids:
            ids.remove(request_id)
        if not ids:
            del self._aliases[id(path)]
            self._count_end(path, -1)

    def _count_end(self, path: ServedPath, change: int) -> None:
        where = (path.rank, path.tenant)
        for table, key in ((self._ends, path.keys), (self._lengths, len(path.keys))):
            counts = table.setdefault(where, Counter())
            counts[key] += change
            if counts[key] <= 0:
                del counts[key]
                if not counts:
                    del table[where]

    def ends_at(self, path: ServedPath, depth: int) -> bool:
        """Whether a remembered request's sequence is exactly the first ``depth`` keys of ``path``."""
        where = (path.rank, path.tenant)
        lengths = self._lengths.get(where)
        if not lengths or depth not in lengths:
            return False
        return bool(self._ends[where].get(path.keys[:depth]))

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
            for alias in self._aliases.pop(id(path), ()):  # the request is gone, under every id it had
                if alias != rid:
                    self._paths.pop(alias, None)
            self._count_end(path, -1)
            if path.modelled and path.rank < len(indexes) and _drop_leaf(indexes[path.rank], path, self):
                removed += 1
        return removed, missing


def _drop_leaf(index: ContextIndex, path: ServedPath, served: ServedPaths) -> bool:
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
           and not served.ends_at(path, depth - 1)):
        top, depth = top.parent, depth - 1
    if node.children:
        return False  # a longer sequence continues this one: it stays cached
    trie.remove_subtree(top)
    return True
