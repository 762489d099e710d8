"""The Ray Serve request router: cache- and reorder-aware, with bounded imbalance and stickiness.

:class:`ContextPilotRouter` implements Ray Serve's public
``ray.serve.request_router.RequestRouter`` API.  Configure it on the
engine deployment::

    RequestRouterConfig(request_router_class="contextpilot_engine.routing.router:ContextPilotRouter",
                        request_router_kwargs={"balance_ratio": 1.2})

The router runs in the process of each handle to the deployment (here the
ingress).  For every request (a :class:`.query.RouteQuery` argument) it

1. probes the request's blocks once (:mod:`.probe`),
2. asks each replica's mirror (:mod:`.replica_set`) for the best cached
   prefix those blocks reach under any order,
3. applies the rule of :mod:`.policy` (cost of prefill plus queue,
   bounded imbalance, stickiness) and returns the one replica chosen.

Replicas that fail a request (:meth:`.replica_set.ReplicaSet.suspect`) or
that a retry excludes are left out unless nothing else is left.  A replica
Ray Serve drops (dead, restarted, scaled down) leaves the replica set, its
mirror is cleared, and its balance and stickiness entries are forgotten.
The decision is left on the query for the ingress to report.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .policy import BalanceWindow, ReplicaLoad, RoutingPolicy, StickyTable, decide
from .probe import RequestProbe, probe_request
from .query import RouteQuery
from .replica_set import ReplicaSet, find_replica_set

__all__ = ["ContextPilotRouter"]

log = logging.getLogger("contextpilot.routing")


def _query(pending_request: Optional[PendingRequest]) -> RouteQuery | None:
    if pending_request is None:
        return None
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, RouteQuery):
            return arg
    return None


class ContextPilotRouter(RequestRouter):
    """See the module docstring; options are :class:`.policy.RoutingPolicy`'s (``request_router_kwargs``)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.policy = RoutingPolicy.from_dict(kwargs, "ContextPilotRouter request_router_kwargs")
        self.window = BalanceWindow(self.policy.balance_window)
        self.sticky = StickyTable(self.policy.max_sticky_keys)
        self.decisions = 0

    # ------------------------------------------------------------- replicas
    def _replica_set(self) -> ReplicaSet | None:
        dep = self._deployment_id
        return find_replica_set((dep.app_name, dep.name))

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        rs = self._replica_set()
        if rs is None:
            return
        gone = rs.set_members({r.replica_id.unique_id: r.replica_metadata for r in replicas})
        for replica in gone:
            self._forget(replica)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        rs = self._replica_set()
        if rs is not None:
            rs.remove(replica_id.unique_id, "its actor died")
        self._forget(replica_id.unique_id)

    def _forget(self, replica: str) -> None:
        if hasattr(self, "window"):
            self.window.forget(replica)
            self.sticky.forget(replica)

    # -------------------------------------------------------------- routing
    def _queue(self, replica: RunningReplica, rs: ReplicaSet | None) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        own = 0
        if rs is not None:
            cache = rs.cache(replica.replica_id.unique_id)
            own = cache.in_flight if cache is not None else 0
        return max(own, cached or 0)

    def _probe(self, query: RouteQuery, rs: ReplicaSet | None, ids: list[str]) -> RequestProbe | None:
        if rs is None:
            return None
        for replica in ids:
            cache = rs.cache(replica)
            if cache is None:
                continue
            state = cache.hit_state()
            pilot = state.pilot_for(cache.proxy.tokenizer)
            return probe_request(query, pilot, state.options.implicit_documents)
        return None

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        query = _query(pending_request)
        rs = self._replica_set()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        usable = [r for r in by_id if (query is None or r not in query.exclude)
                  and not (rs is not None and rs.is_suspect(r))]
        if not usable:  # nothing else is left: a suspect or excluded replica is better than none
            usable = [r for r in by_id if query is None or r not in query.exclude] or list(by_id)
        probe = self._probe(query, rs, usable) if query is not None else None
        loads = []
        for replica in usable:
            hit = 0
            if probe is not None and rs is not None:
                cache = rs.cache(replica)
                if cache is not None:
                    hit = probe.hit_tokens(cache.hit_state().index)
            loads.append(ReplicaLoad(replica, hit, self._queue(by_id[replica], rs), self.window.count(replica)))
        sticky_key = probe.sticky if probe is not None else None
        decision = decide(loads, probe.prompt_tokens if probe is not None else 0, self.policy,
                          self.sticky.get(sticky_key))
        if query is not None:
            if query.window_cell is not None:  # routed again (its replica refused it): count it once
                self.window.undo(query.window_cell)
            query.window_cell = self.window.add(decision.replica)
            query.decision = decision
        else:
            self.window.add(decision.replica)
        self.sticky.settle(sticky_key, decision.replica, usable)
        self.decisions += 1
        return [[by_id[decision.replica]]]
