"""One memory budget for the whole process, shared by every structure that grows with traffic.

Each structure used to have its own cap, per tenant (prefix-tree nodes,
tracked blocks) or per conversation (remembered blocks), so the caps
multiplied with the number of tenants and conversations and a long-running
engine had no bound it could be given.  The budget is the one bound: every
tenant's prefix tree, popularity table and lifetime odds and every
conversation's dedup memory draw on it, and the per-structure caps stay as
upper limits inside it.

**Accounting is pushed, not polled.**  A structure opens a
:class:`BudgetAccount` per tenant (:meth:`MemoryBudget.open`) and reports
each change of its size as it happens (:meth:`BudgetAccount.charge`,
:meth:`BudgetAccount.evicted`), in entries and in approximate resident
bytes; each structure knows what one of its entries costs.  So "are we over
budget" is two integer comparisons, whatever the size of the index.

**Eviction happens at safe points, in small steps.**  A structure calls
:meth:`MemoryBudget.settle` when it has finished a change (a served prompt
recorded, a conversation turn committed).  When the process is over its
budget, settle asks accounts to evict through their callback
(:data:`Evictor`); each structure evicts its own least valuable entries
(least recently used tree leaves, least popular blocks, coldest
conversations).  One settle frees what the process is over by plus a small
slack, and at most a step proportional to what was added since the last
settle, so the work per request is proportional to the request's own
growth, never a scan of the index; a large backlog (a lowered budget, an
engine that dropped its cache) drains over the following requests.

**Eviction is fair across tenants.**  With ``T`` tenants holding memory,
each tenant's *share* is ``limit / T``, and a tenant holding no more than
its share is never evicted to make room for another tenant: that is its
floor.  Above their floors the memory goes to the tenants in use: when a
request takes the process over budget, what it is over by is taken from
the tenants above their share, least recently active first, never below
their share (reason ``fair_share``), and the tenant whose request it was
evicts its own coldest entries only when no less recently active tenant
has anything above its share left (reason ``memory_budget``).  So a
tenant that stopped sending requests gives what it holds above its floor
back to the ones that did, the room that tenants below their share leave
goes to the tenants in use, and a noisy tenant can push the others down to
their floors but no further.  Since the shares add up to the limit, some
tenant is above its share whenever the process is over budget, so the
budget can always be met without touching a floor.  Inside one tenant every
structure gives back in proportion to what it holds, so no structure is
emptied to spare another.

**What the budget does not own is only reported.**  An engine's mirrored
cache pages are the engine's truth, sized by the engine's KV cache:
structures that mirror them report their size through
:meth:`MemoryBudget.watch` and are never charged or evicted.

**Locking.**  Account updates take a short internal lock that is never
held while calling out.  :meth:`settle` never waits: when another thread is
already settling it returns, and an evictor must likewise only *try* its
structure's lock and evict nothing when it is busy (the next settle
retries).  So settling from inside a structure's own lock cannot deadlock,
and evictors run only between changes, never in the middle of one.

Interface for a new structure (for example a history of co-occurring
blocks): open one account per tenant with ``budget.open("cooccurrence",
tenant, self._evict)``, where ``self._evict(tenant, request)`` drops that
tenant's least valuable entries until it has freed ``request.entries``
entries and ``request.bytes`` bytes (or has nothing left), calling
``account.evicted(request.reason, n, nbytes)`` for what it drops; charge
every other growth and shrink with ``account.charge``; call
``budget.settle(tenant)`` after each change; ``account.close()`` when the
tenant's data is dropped.  A bound method is held weakly, so a structure
that is simply dropped does not stay alive; its accounts close when it is
collected.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "resident",
    "MemoryBudget",
    "BudgetAccount",
    "EvictionRequest",
    "Evictor",
    "Usage",
    "process_budget",
    "DEFAULT_BUDGET_MB",
    "REASON_BUDGET",
    "REASON_FAIR_SHARE",
]

logger = logging.getLogger("contextpilot_engine")

MIB = 1 << 20
#: the process budget until a configuration sets one: a small part of an inference host's memory
DEFAULT_BUDGET_MB = 1024

#: resident bytes per byte of live Python objects when a structure keeps evicting and inserting: the
#: allocator keeps freed blocks in partly used pools and a dict's table keeps the size it grew to,
#: so the process holds more than its live objects add up to (calibrated by the soak benchmark)
ALLOCATOR_OVERHEAD = 1.25


def resident(object_bytes: int) -> int:
    """What a structure's entry of ``object_bytes`` live bytes costs in resident memory (rounded up).

    Every structure defines its per-entry charge through this, so the one
    calibration of the allocator's overhead applies to all of them and the
    budget, which is given in resident bytes, bounds what the process holds.
    """
    return -(-object_bytes * int(ALLOCATOR_OVERHEAD * 1024) // 1024)


#: a tenant above its share evicted its own entries because its request went over the budget
REASON_BUDGET = "memory_budget"
#: a tenant above its share gave entries back to make room for another tenant
REASON_FAIR_SHARE = "fair_share"

#: the most one settle frees beyond what was added since the last one (entries, bytes): a backlog
#: drains over several requests instead of stalling one
_STEP_ENTRIES = 512
_STEP_BYTES = 256 * 1024
#: a settle frees this much below the limit (at most this fraction of it), so that the next few
#: requests find room without evicting again
_SLACK_ENTRIES = 64
_SLACK_BYTES = 64 * 1024
_SLACK_FRACTION = 64


class Usage(NamedTuple):
    """What a structure holds: entries, and their approximate resident bytes."""

    entries: int
    bytes: int


@dataclass(frozen=True)
class EvictionRequest:
    """What an evictor is asked to free: at least ``entries`` entries and ``bytes`` bytes, or all it can."""

    entries: int
    bytes: int
    reason: str


#: ``evict(tenant, request)``: drop the tenant's least valuable entries, reporting them to the account
Evictor = Callable[[str, EvictionRequest], None]


class BudgetAccount:
    """One structure's use of the budget for one tenant (see the module docstring)."""

    __slots__ = ("_budget", "structure", "tenant", "_evictor", "entries", "bytes", "_open", "__weakref__")

    def __init__(self, budget: "MemoryBudget", structure: str, tenant: str, evictor: Callable[[], Evictor | None]):
        self._budget = budget
        self.structure = structure
        self.tenant = tenant
        self._evictor = evictor
        self.entries = 0
        self.bytes = 0
        self._open = True

    @property
    def usage(self) -> Usage:
        return Usage(self.entries, self.bytes)

    @property
    def is_open(self) -> bool:
        return self._open

    def charge(self, entries: int, nbytes: int) -> None:
        """The structure grew (positive) or shrank (negative) by ``entries`` entries and ``nbytes`` bytes."""
        if self._open and (entries or nbytes):
            self._budget._charge(self, entries, nbytes)

    def evicted(self, reason: str, entries: int, nbytes: int) -> None:
        """The structure dropped ``entries`` entries (``nbytes`` bytes) because of a bound; counted by reason."""
        if self._open:
            self._budget._charge(self, -entries, -nbytes, reason)

    def close(self) -> None:
        """The tenant's data in this structure is gone: whatever the account still holds is released."""
        if self._open:
            self._budget._close(self)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"BudgetAccount({self.structure!r}, {self.tenant!r}, entries={self.entries}, bytes={self.bytes})"


class _TenantUse:
    __slots__ = ("name", "entries", "bytes", "accounts")

    def __init__(self, name: str):
        self.name = name
        self.entries = 0
        self.bytes = 0
        self.accounts: list[BudgetAccount] = []


class MemoryBudget:
    """A limit on the memory of every structure that opens an account here.

    Args:
        max_bytes: the limit in approximate resident bytes (None: no byte limit).
        max_entries: a limit on the number of entries of all structures together
            (None: no entry limit).  Both apply when both are set.
    """

    def __init__(self, max_bytes: int | None = DEFAULT_BUDGET_MB * MIB, max_entries: int | None = None):
        self._lock = threading.Lock()
        self._settling = threading.Lock()
        self._max_bytes: int | None = None
        self._max_entries: int | None = None
        self.used_bytes = 0
        self.used_entries = 0
        #: growth charged since the last settle, which bounds how much the next one frees
        self._grown_entries = 0
        self._grown_bytes = 0
        #: tenants holding accounts, least recently active first
        self._tenants: OrderedDict[str, _TenantUse] = OrderedDict()
        #: tenants that may be above their share, least recently active first (checked when used)
        self._over: OrderedDict[str, None] = OrderedDict()
        self._structures: dict[str, list[int]] = {}
        self._evictions: dict[tuple[str, str], list[int]] = {}
        self._watched: list[tuple[str, Callable[[], Callable[[], Usage] | None]]] = []
        self.settles = 0
        #: accounts whose structures were collected, to be closed outside any lock
        self._dead: list[BudgetAccount] = []
        self.configure(max_bytes=max_bytes, max_entries=max_entries)

    # ------------------------------------------------------------ limits
    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def max_entries(self) -> int | None:
        return self._max_entries

    def configure(self, *, max_bytes: int | None | object = ..., max_entries: int | None | object = ...) -> None:
        """Set the limits (an argument left out keeps its limit); the next settles evict down to them."""
        for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
            if value is ... or value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
        with self._lock:
            if max_bytes is not ...:
                self._max_bytes = max_bytes  # type: ignore[assignment]
            if max_entries is not ...:
                self._max_entries = max_entries  # type: ignore[assignment]
            self._over = OrderedDict((name, None) for name in self._tenants)

    def share(self) -> Usage:
        """Each tenant's share of the limits, its floor (a limit not set is unbounded)."""
        n = max(1, len(self._tenants))
        big = 1 << 62
        return Usage(
            big if self._max_entries is None else self._max_entries // n,
            big if self._max_bytes is None else self._max_bytes // n,
        )

    def over_budget(self) -> bool:
        mb, me = self._max_bytes, self._max_entries
        return (mb is not None and self.used_bytes > mb) or (me is not None and self.used_entries > me)

    # ---------------------------------------------------------- accounts
    def open(self, structure: str, tenant: str, evict: Evictor) -> BudgetAccount:
        """A new account for ``structure``'s data of ``tenant``; ``evict`` frees some of it on request.

        A bound method is held weakly: when its object is collected the
        account closes itself.
        """
        if not structure or not isinstance(structure, str):
            raise ValueError(f"structure: expected a non-empty string, got {structure!r}")
        if not isinstance(tenant, str):
            raise TypeError(f"tenant: expected a string, got {type(tenant).__name__}")
        if not callable(evict):
            raise TypeError(f"evict: expected a callable, got {type(evict).__name__}")
        owner = getattr(evict, "__self__", None)
        if owner is not None and getattr(evict, "__func__", None) is not None:
            evictor: Callable[[], Evictor | None] = weakref.WeakMethod(evict)  # type: ignore[arg-type]
        else:
            owner = None

            def evictor() -> Evictor | None:
                return evict

        account = BudgetAccount(self, structure, tenant, evictor)
        with self._lock:
            use = self._tenants.get(tenant)
            if use is None:
                use = self._tenants[tenant] = _TenantUse(tenant)
            use.accounts.append(account)
            self._structures.setdefault(structure, [0, 0])
        if owner is not None:
            # a finalizer may run inside any allocation, even under this budget's lock: it only
            # queues the account, which the next settle (or open, or stats) closes
            weakref.finalize(owner, self._dead.append, account)
        self._reap()
        return account

    def _reap(self) -> None:
        """Close the accounts whose structures were collected."""
        dead = self._dead
        while dead:
            try:
                account = dead.pop()
            except IndexError:  # another thread took the last one
                return
            account.close()

    def watch(self, structure: str, measure: Callable[[], Usage]) -> None:
        """Report ``structure`` (outside the budget, never evicted) with what ``measure()`` says.

        A bound method is held weakly; the report disappears with its object.
        """
        if getattr(measure, "__self__", None) is not None and getattr(measure, "__func__", None) is not None:
            ref: Callable[[], Callable[[], Usage] | None] = weakref.WeakMethod(measure)  # type: ignore[arg-type]
        else:

            def ref() -> Callable[[], Usage] | None:
                return measure

        with self._lock:
            self._watched = [(n, r) for n, r in self._watched if r() is not None]
            self._watched.append((structure, ref))

    def _charge(self, account: BudgetAccount, entries: int, nbytes: int, reason: str | None = None) -> None:
        with self._lock:
            if not account._open:
                return
            account.entries += entries
            account.bytes += nbytes
            self.used_entries += entries
            self.used_bytes += nbytes
            totals = self._structures[account.structure]
            totals[0] += entries
            totals[1] += nbytes
            use = self._tenants[account.tenant]
            use.entries += entries
            use.bytes += nbytes
            if entries > 0:
                self._grown_entries += entries
            if nbytes > 0:
                self._grown_bytes += nbytes
                if use.name not in self._over and self._above_share(use):
                    self._over[use.name] = None
            elif entries > 0 and use.name not in self._over and self._above_share(use):
                self._over[use.name] = None
            if reason is not None:
                counts = self._evictions.get((account.structure, reason))
                if counts is None:
                    counts = self._evictions[(account.structure, reason)] = [0, 0]
                counts[0] -= entries
                counts[1] -= nbytes

    def _close(self, account: BudgetAccount) -> None:
        with self._lock:
            if not account._open:
                return
            account._open = False
            self.used_entries -= account.entries
            self.used_bytes -= account.bytes
            totals = self._structures[account.structure]
            totals[0] -= account.entries
            totals[1] -= account.bytes
            use = self._tenants[account.tenant]
            use.entries -= account.entries
            use.bytes -= account.bytes
            account.entries = account.bytes = 0
            use.accounts.remove(account)
            if not use.accounts:
                del self._tenants[account.tenant]
                self._over.pop(account.tenant, None)

    # ------------------------------------------------------------ settle
    def settle(self, tenant: str | None = None) -> None:
        """Evict until the process is within its budget again (a bounded step; see the module docstring).

        ``tenant`` is the tenant whose change this follows: it counts as
        active now, so it is the last tenant asked to give back what it
        holds above its share.  Returns at once when the process is within
        budget or another thread is settling.
        """
        if self._dead:
            self._reap()
        if tenant is not None:
            with self._lock:
                if tenant in self._tenants:
                    self._tenants.move_to_end(tenant)
                    if tenant in self._over:
                        self._over.move_to_end(tenant)
        if not self.over_budget():
            self._grown_entries = self._grown_bytes = 0  # growth counts from the last settle
            return
        if not self._settling.acquire(blocking=False):
            return
        try:
            self._settle(tenant)
        finally:
            self._settling.release()

    def _settle(self, cause: str | None) -> None:
        self.settles += 1
        with self._lock:
            step_e = _STEP_ENTRIES + 2 * self._grown_entries
            step_b = _STEP_BYTES + 2 * self._grown_bytes
            self._grown_entries = self._grown_bytes = 0
            need_e = self._need(self.used_entries, self._max_entries, _SLACK_ENTRIES, step_e)
            need_b = self._need(self.used_bytes, self._max_bytes, _SLACK_BYTES, step_b)
        if need_e <= 0 and need_b <= 0:
            return
        goal_e, goal_b = self.used_entries - need_e, self.used_bytes - need_b
        # the cause is asked last, after every other tenant above its share (including those only the
        # candidates' second pass finds: shares shrink when tenants arrive, without them growing)
        tried: set[str] = set() if cause is None else {cause}
        for name in self._candidates(tried):
            if self._met(goal_e, goal_b):
                break
            self._take(name, goal_e, goal_b, REASON_FAIR_SHARE)
            tried.add(name)
        if cause is not None and not self._met(goal_e, goal_b):
            self._take(cause, goal_e, goal_b, REASON_BUDGET)

    @staticmethod
    def _need(used: int, limit: int | None, slack: int, step: int) -> int:
        if limit is None or used <= limit:
            return 0
        return min(used - limit + min(slack, limit // _SLACK_FRACTION), step)

    def _met(self, goal_e: int, goal_b: int) -> bool:
        return self.used_entries <= goal_e and self.used_bytes <= goal_b

    def _above_share(self, use: _TenantUse) -> bool:
        share = self.share()
        return use.entries > share.entries or use.bytes > share.bytes

    def _candidates(self, tried: set[str]) -> Iterator[str]:
        """Tenants above their share that were not asked yet, least recently active first."""
        for rebuild in (False, True):
            if rebuild:
                # shares shrink when tenants arrive, so a tenant can be above its share without having
                # grown since it was last looked at: look at every tenant, once per settle
                with self._lock:
                    self._over = OrderedDict(
                        (n, None) for n, u in self._tenants.items() if self._above_share(u)
                    )
            while True:
                with self._lock:
                    name = None
                    stale = []
                    for n in self._over:
                        if n in tried:
                            continue
                        use = self._tenants.get(n)
                        if use is None or not self._above_share(use):
                            stale.append(n)
                            continue
                        name = n
                        break
                    for n in stale:
                        del self._over[n]
                if name is None:
                    break
                yield name

    def _take(self, tenant: str, goal_e: int, goal_b: int, reason: str) -> None:
        """Ask ``tenant``'s structures, in proportion to what each holds, for what the goal still needs.

        A structure that gives nothing when asked (what it holds is a fixed
        cost, or in use) drops out of the next rounds' proportions, so the
        others are asked for its part instead of a sliver of it.
        """
        spent: set[int] = set()
        for _ in range(4):
            with self._lock:
                use = self._tenants.get(tenant)
                if use is None:
                    return
                share = self.share()
                want_e = min(self.used_entries - goal_e, use.entries - share.entries)
                want_b = min(self.used_bytes - goal_b, use.bytes - share.bytes)
                if want_e <= 0 and want_b <= 0:
                    return
                want_e, want_b = max(0, want_e), max(0, want_b)
                accounts = [a for a in use.accounts if (a.entries > 0 or a.bytes > 0) and id(a) not in spent]
                held_e = sum(a.entries for a in accounts) or 1
                held_b = sum(a.bytes for a in accounts) or 1
            before = (use.entries, use.bytes)
            for account in sorted(accounts, key=lambda a: -a.bytes):
                part_e = -(-want_e * account.entries // held_e)
                part_b = -(-want_b * account.bytes // held_b)
                if part_e <= 0 and part_b <= 0:
                    continue
                evict = account._evictor()
                if evict is None:
                    account.close()
                    continue
                held = (account.entries, account.bytes)
                evict(tenant, EvictionRequest(part_e, part_b, reason))
                if (account.entries, account.bytes) == held:
                    spent.add(id(account))
            if (use.entries, use.bytes) == before:
                return  # nothing could be freed now (all in use, or its structure is busy)

    # --------------------------------------------------------- inspection
    def usage_of(self, tenant: str) -> Usage:
        """What ``tenant`` holds in budgeted structures."""
        with self._lock:
            use = self._tenants.get(tenant)
            return Usage(0, 0) if use is None else Usage(use.entries, use.bytes)

    def tenant_names(self) -> list[str]:
        with self._lock:
            return list(self._tenants)

    def stats(self) -> dict:
        """The limits, the use per structure (watched ones marked outside the budget) and evictions by reason."""
        self._reap()
        with self._lock:
            structures = {
                name: {"entries": e, "bytes": b, "budgeted": True} for name, (e, b) in sorted(self._structures.items())
            }
            evictions: dict[str, dict[str, dict[str, int]]] = {}
            for (structure, reason), (e, b) in sorted(self._evictions.items()):
                evictions.setdefault(structure, {})[reason] = {"entries": e, "bytes": b}
            share = self.share()
            out = {
                "limit_bytes": self._max_bytes,
                "limit_entries": self._max_entries,
                "used_bytes": self.used_bytes,
                "used_entries": self.used_entries,
                "tenants": len(self._tenants),
                "share_bytes": None if self._max_bytes is None else share.bytes,
                "share_entries": None if self._max_entries is None else share.entries,
                "structures": structures,
                "evictions": evictions,
            }
            watched = [(n, r()) for n, r in self._watched]
        for name, measure in watched:
            if measure is None:
                continue
            try:
                usage = measure()
            except Exception:  # a report must never break stats
                continue
            entry = structures.setdefault(name, {"entries": 0, "bytes": 0, "budgeted": False})
            entry["entries"] += usage.entries
            entry["bytes"] += usage.bytes
        return out


_process_budget: MemoryBudget | None = None
_process_lock = threading.Lock()


def process_budget() -> MemoryBudget:
    """The budget every index and conversation store uses unless given another one."""
    global _process_budget
    if _process_budget is None:
        with _process_lock:
            if _process_budget is None:
                _process_budget = MemoryBudget()
    return _process_budget
