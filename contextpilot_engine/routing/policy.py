"""Which replica serves a request: cached prefix under any order, queue length, bounded imbalance, stickiness.

Routers that exist score a replica by the prompt *as sent* (a character
tree of routed prompts, an approximate radix tree per worker, a block-hash
index of the prefix).  A request whose blocks a replica holds in another
order scores nothing there, although that replica could serve it from
cache once the blocks are reordered.  Here each replica is scored by
``hit_tokens``: the most tokens a cached prefix of that replica's exact
mirror reaches when the request's blocks may be put in *any* order (the
Context Index's cached-prefix search), and the request is then rewritten
for the replica chosen.

**The rule** (:func:`decide`), for a request of about ``T`` prompt tokens
(preamble plus blocks) and each live candidate replica ``r`` with
``hit_tokens[r]``, ``queue[r]`` (requests in flight on it) and
``recent[r]`` (requests routed to it among the last ``balance_window``):

1. *Bounded imbalance.*  ``r`` is eligible only if

   * ``queue[r] - min(queue) <= max_queue_gap``, and
   * ``recent[r] + 1 <= balance_ratio * min(recent) + balance_slack``
     (the replica with the fewest recent requests is always within this).

   So over any window of routed requests no replica gets more than
   ``balance_ratio`` times the requests of the least used live one, plus
   ``balance_slack``.  When no replica passes both tests, the one with
   the shortest queue (then fewest recent requests) is chosen
   (``reason="balance"``).
2. *Stickiness.*  A request of a conversation (or, without one, of a
   named tenant) goes to the replica its conversation or tenant used last,
   while that replica is eligible (``reason="sticky"``): its conversation
   memory, dedup and conversation-aware order live there.  An ineligible
   sticky replica keeps the mapping (the request spills over once); a dead
   one loses it.
3. *Cost.*  Otherwise the eligible replica with the lowest
   ``(T - hit_tokens[r]) + queue_weight * queue[r] * T`` wins: the tokens
   it must prefill plus, per request queued ahead, ``queue_weight`` of a
   prefill of this size.  Ties go to the shorter queue, then the fewer
   recent requests, then the candidate order (``reason="cache"`` when the
   winner caches something, ``"least_loaded"`` otherwise).

Nothing here knows Ray: the router feeds it plain records.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Hashable, Mapping, Sequence

__all__ = ["BalanceWindow", "Decision", "ReplicaLoad", "RoutingPolicy", "StickyTable", "decide"]


@dataclass(frozen=True)
class RoutingPolicy:
    """The routing rule's knobs (``request_router_kwargs`` of the Ray Serve deployment)."""

    #: one request queued ahead on a replica costs this fraction of the request's own prefill: a
    #: continuous-batching engine runs the queued requests' prefills alongside this one, so a request
    #: ahead delays it by a part of a prefill, while a replica that caches its blocks saves all of it
    queue_weight: float = 0.1
    #: a replica with more in-flight requests than the least loaded one plus this is not chosen
    max_queue_gap: int = 8
    #: over the balance window a replica gets at most this many times the fewest of any live replica ...
    balance_ratio: float = 1.2
    #: ... plus this many requests
    balance_slack: int = 2
    #: routed requests the balance rule looks back over
    balance_window: int = 256
    #: conversations and named tenants stick to a replica while it is eligible
    sticky: bool = True
    #: conversations and tenants remembered for stickiness (least recently used dropped)
    max_sticky_keys: int = 100_000

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, integer: bool = False) -> None:
            value = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
                shape = "an int" if integer else "a number"
                raise ValueError(f"{name}: expected {shape} in [{low}, {high}], got {value!r}")

        number("queue_weight", 0.0)
        number("max_queue_gap", 0, integer=True)
        number("balance_ratio", 1.0)
        number("balance_slack", 0, integer=True)
        number("balance_window", 1, integer=True)
        number("max_sticky_keys", 1, integer=True)
        if not isinstance(self.sticky, bool):
            raise ValueError(f"sticky: expected true or false, got {self.sticky!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, where: str = "routing options") -> "RoutingPolicy":
        """Validate a dict of options; an unknown or bad one is a ``ValueError`` naming it."""
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; known options: {known}")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReplicaLoad:
    """One candidate replica as the rule sees it."""

    replica: str
    #: tokens of the best cached prefix the request's blocks reach on this replica, under any order
    hit_tokens: int
    #: requests in flight on the replica
    queue: int
    #: requests routed to it among the last ``balance_window``
    recent: int


@dataclass(frozen=True)
class Decision:
    """The replica chosen, why, and what every candidate looked like (for the response and checks)."""

    replica: str
    #: ``cache``, ``sticky``, ``least_loaded``, ``balance`` or ``only``
    reason: str
    prompt_tokens: int
    candidates: tuple[ReplicaLoad, ...]
    eligible: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "replica": self.replica,
            "reason": self.reason,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": {c.replica: c.hit_tokens for c in self.candidates},
            "queue": {c.replica: c.queue for c in self.candidates},
            "recent": {c.replica: c.recent for c in self.candidates},
            "eligible": list(self.eligible),
        }


def eligible_replicas(candidates: Sequence[ReplicaLoad], policy: RoutingPolicy) -> list[ReplicaLoad]:
    """The candidates that pass both imbalance bounds (see the module docstring)."""
    if not candidates:
        return []
    min_queue = min(c.queue for c in candidates)
    min_recent = min(c.recent for c in candidates)
    limit = policy.balance_ratio * min_recent + policy.balance_slack
    return [
        c for c in candidates
        if c.queue - min_queue <= policy.max_queue_gap and (c.recent == min_recent or c.recent + 1 <= limit)
    ]


def decide(
    candidates: Sequence[ReplicaLoad],
    prompt_tokens: int,
    policy: RoutingPolicy,
    sticky: str | None = None,
) -> Decision:
    """Apply the rule of the module docstring; ``sticky`` is the replica the request's conversation used last."""
    if not candidates:
        raise ValueError("decide: no candidate replicas")
    cands = tuple(candidates)
    if len(cands) == 1:
        return Decision(cands[0].replica, "only", prompt_tokens, cands, (cands[0].replica,))
    ok = eligible_replicas(cands, policy)
    names = tuple(c.replica for c in ok)
    if not ok:
        best = min(cands, key=lambda c: (c.queue, c.recent))
        return Decision(best.replica, "balance", prompt_tokens, cands, names)
    if policy.sticky and sticky is not None and sticky in names:
        return Decision(sticky, "sticky", prompt_tokens, cands, names)
    t = max(1, prompt_tokens)
    order = {c.replica: i for i, c in enumerate(cands)}

    def cost(c: ReplicaLoad) -> tuple:
        prefill = t - min(c.hit_tokens, t)
        return (prefill + policy.queue_weight * c.queue * t, c.queue, c.recent, order[c.replica])

    best = min(ok, key=cost)
    return Decision(best.replica, "cache" if best.hit_tokens > 0 else "least_loaded", prompt_tokens, cands, names)


class BalanceWindow:
    """The replicas of the last ``size`` routed requests, counted per replica (thread safe).

    A request re-routed before it was sent (its first replica refused it)
    takes back its first entry (:meth:`undo`), so it counts once.
    """

    def __init__(self, size: int):
        self._cells: deque[list] = deque()
        self._size = size
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, replica: str) -> list:
        """Count one request for ``replica``; returns a token for :meth:`undo`."""
        cell = [replica]
        with self._lock:
            self._cells.append(cell)
            self._counts[replica] += 1
            while len(self._cells) > self._size:
                old = self._cells.popleft()
                if old[0] is not None:
                    self._drop(old[0])
        return cell

    def undo(self, cell: list) -> None:
        with self._lock:
            if cell[0] is not None:
                self._drop(cell[0])
                cell[0] = None

    def _drop(self, replica: str) -> None:
        n = self._counts[replica] - 1
        if n > 0:
            self._counts[replica] = n
        else:
            del self._counts[replica]

    def count(self, replica: str) -> int:
        with self._lock:
            return self._counts.get(replica, 0)

    def forget(self, replica: str) -> None:
        """A replica left: its requests no longer count (a replacement starts from nothing)."""
        with self._lock:
            for cell in self._cells:
                if cell[0] == replica:
                    cell[0] = None
            self._counts.pop(replica, None)


class StickyTable:
    """Conversation or tenant -> the replica it used last, bounded (least recently used dropped; thread safe)."""

    def __init__(self, max_keys: int):
        self._map: OrderedDict[Hashable, str] = OrderedDict()
        self._max = max_keys
        self._lock = threading.Lock()

    def get(self, key: Hashable | None) -> str | None:
        if key is None:
            return None
        with self._lock:
            replica = self._map.get(key)
            if replica is not None:
                self._map.move_to_end(key)
            return replica

    def settle(self, key: Hashable | None, chosen: str, live: Sequence[str]) -> None:
        """After a decision: map ``key`` to ``chosen`` unless it maps to another live replica already."""
        if key is None:
            return
        with self._lock:
            current = self._map.get(key)
            if current is None or current not in live:
                self._map[key] = chosen
            self._map.move_to_end(key)
            while len(self._map) > self._max:
                self._map.popitem(last=False)

    def forget(self, replica: str) -> None:
        with self._lock:
            for key in [k for k, r in self._map.items() if r == replica]:
                del self._map[key]

    def __len__(self) -> int:
        return len(self._map)


def sticky_key(conversation_id: str | None, tenant: str | None, default_tenant: str) -> Hashable | None:
    """What a request sticks by: its conversation, else a named (non-default) tenant, else nothing."""
    if conversation_id is not None:
        return ("conversation", tenant or default_tenant, conversation_id)
    if tenant is not None and tenant != default_tenant:
        return ("tenant", tenant)
    return None
