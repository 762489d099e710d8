"""Routers to compare contextpilot's against (``scripts/bench_ray_router.py``), importable by Ray workers.

Ray Serve imports a deployment's ``request_router_class`` by name in every
process that holds a handle, so a benchmark's baselines must live in a
module, not in the benchmark script.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

__all__ = ["RoundRobinRouter", "PREFIX_CACHE_AFFINITY_ROUTER"]

#: Ray's PrefixCacheAffinityRouter where ray[serve] alone can import it: the public name
#: ``ray.serve.llm.request_router.PrefixCacheAffinityRouter`` is an empty subclass of this class, but its
#: package imports ray[llm]'s dependencies (pyarrow first), which ray[serve] does not install.
PREFIX_CACHE_AFFINITY_ROUTER = (
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
)


class RoundRobinRouter(RequestRouter):
    """Each replica in turn (by replica id order), whatever the request."""

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._turn = getattr(self, "_turn", -1) + 1
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[self._turn % len(ordered)]]]
