"""A method an adapter wraps, with the signature its wrapper was written for.

Engines change their internals between releases.  Each adapter declares the
methods it hooks as :class:`HookPoint`\\ s; before hooking, the live method's
parameters are compared with the declaration (:func:`matches`), and a
mismatch leaves the engine's method alone with a warning.  The same list lets
a script check a release the adapter has never run on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["HookPoint", "matches", "find"]


@dataclass(frozen=True)
class HookPoint:
    """``module.owner.method``'s expected parameter names; ``None`` matches any name."""

    module: str
    owner: str
    method: str
    params: tuple
    #: further parameters after ``params`` are allowed (the wrapper passes them through)
    prefix_only: bool = True
    #: the adapter works without this hook
    optional: bool = False

    @property
    def path(self) -> str:
        return f"{self.module}.{self.owner}.{self.method}"


def matches(point: HookPoint, params: Sequence[str]) -> bool:
    """Whether a method with parameter names ``params`` is the one ``point`` was written for."""
    want = point.params
    if len(params) < len(want) or (not point.prefix_only and len(params) != len(want)):
        return False
    return all(w is None or p == w for p, w in zip(params, want))


def find(points: Sequence[HookPoint], owner: str, method: str) -> HookPoint:
    for point in points:
        if point.owner == owner and point.method == method:
            return point
    raise KeyError(f"{owner}.{method} is not a hook point")
