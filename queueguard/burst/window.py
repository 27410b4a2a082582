"""Sliding-window counts per fingerprint key, shared by every recipient and client.

A window of `period` seconds is cut into BUCKETS buckets; a key's count is
the sum of its buckets that are still inside the window, so the window
slides in steps of period/BUCKETS and old buckets expire by themselves.

The memory backend is bounded: at most `max_keys` keys, each holding at most
BUCKETS (bucket, count) pairs; when full, the key touched least recently is
dropped (a dropped key can only under-count, never invent a burst). Measured
on CPython 3.11: about 370 bytes per key with one live bucket, 540 with all
ten, so the default 50,000 keys stay under ~27 MiB (these are the exact
counts of `subject`, `url_hosts` and `attachment` rules, a key or a few per
message), and a live burst is never the least recently touched key. The
Redis backend keeps the same buckets in one hash per key with a TTL of one
window, so its memory is bounded by the keys seen in one window (plus
Redis's own maxmemory policy); two MX hosts pointed at the same Redis count
together.

Both backends also keep campaigns for `body` rules (campaign.py says how
messages link): link keys pointing at variants, variants (signature, copies,
campaign) and campaigns (first sight, buckets, signals). In memory a distinct
message costs about 5.6 KB (33 link keys, its variant and campaign; measured
in tests/unit/burst/test_burst_window.py; copies of a variant add almost
nothing); links are capped at 4 x `max_keys` (the links of the last ~6,000
distinct messages, ~35 MB), variants and campaigns at a sixteenth of that
each, least recently touched dropped first (a dropped entry can only split a
campaign, never invent one), and entries older than the window are ignored.
In Redis a distinct message is ~35 short keys with a TTL of one window,
refreshed on use, and one Lua script (campaign.lua) links and counts a
message atomically, so MX hosts sharing Redis build the same campaigns.
Sites with more distinct mail in one window than memory keeps should use Redis.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from queueguard.burst.campaign import (
    LINK_DEPTH,
    PENDING,
    REPEATS,
    SAME,
    SHAPE,
    SIMILAR,
    TEXT,
    Campaign,
    Sighting,
    may_link,
    verdict,
)
from queueguard.model import new_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

BUCKETS = 10
DEFAULT_MAX_KEYS = 50_000
MIRROR_FROM = 2
"""A shared count this high is mirrored for an outage (WindowShare)."""


class WindowCounter(Protocol):
    """The storage behind burst rules."""

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        """Count one event for each key; return each key's count in the window ending now (this one included)."""
        ...

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        """Link one message to its campaign (or start one) and count it; the campaign after counting."""
        ...


def bucket_of(now: float, period: float) -> int:
    return int(now // (period / BUCKETS))


def window_sum(buckets: dict[int, int], now: float, period: float) -> int:
    """Drop buckets older than the window ending now; the sum of the rest."""
    oldest = bucket_of(now, period) - BUCKETS + 1
    for b in [b for b in buckets if b < oldest]:
        del buckets[b]
    return sum(buckets.values())


def set_window_sum(buckets: dict[int, int], total: int, now: float, period: float) -> None:
    """Make the window ending now sum to `total` (a shared store's count): what is missing goes
    into the current bucket, what is too much comes off the oldest buckets first (they would
    have left the window first)."""
    delta = total - window_sum(buckets, now, period)
    if delta > 0:
        current = bucket_of(now, period)
        buckets[current] = buckets.get(current, 0) + delta
    for b in sorted(buckets):
        if delta >= 0:
            break
        take = min(buckets[b], -delta)
        buckets[b] -= take
        delta += take
        if not buckets[b]:
            del buckets[b]


@dataclass
class _Variant:
    signature: bytes
    copies: int
    campaign: str
    last: float
    pending: list[tuple[str, str]] = field(default_factory=list)
    """(variant, signal) it resembled before either had repeated: linked once both have."""


@dataclass
class _Campaign:
    id: str
    first: float
    last: float
    variants: int = 0
    signals: set[str] = field(default_factory=set)
    buckets: dict[int, int] = field(default_factory=dict)
    merged_into: str | None = None


def _merge(camps: list[_Campaign]) -> _Campaign:
    """Campaigns one message linked become the earliest (its id and first sight stay; counts,
    variants and signals add up); the others point at it."""
    target = min(camps, key=lambda c: (c.first, c.id))
    for other in camps:
        if other is not target:
            for b, n in other.buckets.items():
                target.buckets[b] = target.buckets.get(b, 0) + n
            target.variants += other.variants
            target.signals |= other.signals
            other.buckets, other.merged_into = {}, target.id
    return target


class MemoryWindow:
    """In-process counts: one host, or the mirror a WindowShare keeps for a Redis outage."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.max_links = 4 * max_keys
        self._keys: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._links: dict[int, tuple[str, ...]] = {}
        """hash((scope, link key)) -> the last LINK_DEPTH variant ids (a variant's own `last` says if it is live)."""
        self._variants: OrderedDict[str, _Variant] = OrderedDict()
        self._campaigns: OrderedDict[str, _Campaign] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add_now(self, keys: Sequence[str], period: float, now: float, step: int = 1) -> list[int]:
        """The synchronous core of `add` (no I/O, so no awaits needed); each event counts `step`."""
        current = bucket_of(now, period)
        oldest = current - BUCKETS + 1
        counts = []
        for key in keys:
            buckets = self._keys.pop(key, None) or {}
            for b in [b for b in buckets if b < oldest]:
                del buckets[b]
            buckets[current] = buckets.get(current, 0) + step
            self._keys[key] = buckets
            counts.append(sum(buckets.values()))
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return counts

    def set_counts(self, keys: Sequence[str], counts: Sequence[int], period: float, now: float) -> None:
        """These keys stand at these counts in the window ending now (what a shared store said)."""
        for key, count in zip(keys, counts, strict=True):
            buckets = self._keys.pop(key, None) or {}
            set_window_sum(buckets, count, now, period)
            self._keys[key] = buckets
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        return self.add_now(keys, period, now)

    def _root(self, cid: str) -> _Campaign | None:
        camp = self._campaigns.get(cid)
        for _ in range(16):
            if camp is None or camp.merged_into is None:
                return camp
            camp = self._campaigns.get(camp.merged_into)
        return camp

    def link_now(self, scope: str, seen: Sighting, period: float, now: float, step: int = 1) -> Campaign:
        """The synchronous core of `link` (campaign.py's rules; campaign.lua does the same in Redis);
        the message counts `step` in its campaign."""
        horizon = now - period
        found = {(vid, why): v for vid, v, why in self._resembling(scope, seen, horizon)}
        for name, key in seen.signal_keys:
            for vid in self._links.get(hash((scope, key)), ()):
                if (v := self._variants.get(vid)) is not None and v.last >= horizon:
                    found[(vid, name)] = v
        same = [(vid, v) for (vid, why), v in found.items() if why in (TEXT, SHAPE)]
        if same:
            own_id, own = max(same, key=lambda item: item[1].copies)
            own.copies += 1
        else:
            own_id, own = new_id(), _Variant(seen.signature, 1, "", now)
        for vid, why in found:
            if why not in (TEXT, SHAPE) and vid != own_id and (vid, why) not in own.pending:
                own.pending = [*own.pending, (vid, why)][-PENDING:]
        links = [(v, why) for (vid, why), v in found.items() if vid != own_id or why in (TEXT, SHAPE)]
        links += [(v, why) for vid, why in own.pending if (v := self._variants.get(vid)) is not None]
        camps: dict[str, _Campaign] = {}
        signals: set[str] = set()
        for v, why in links:
            camp = self._root(v.campaign)
            if camp is not None and camp.last >= horizon and (why in (TEXT, SHAPE) or may_link(own.copies, v.copies)):
                camps[camp.id] = camp
                signals.add(why)
        if not camps:
            first = _Campaign(new_id(), now, now)
            camps[first.id] = first
            self._campaigns[first.id] = first
        target = _merge(list(camps.values()))
        if own.campaign != target.id and not same:
            target.variants += 1
        own.campaign, own.last = target.id, now
        self._variants[own_id] = own
        self._variants.move_to_end(own_id)
        current = bucket_of(now, period)
        target.buckets[current] = target.buckets.get(current, 0) + step
        target.signals |= signals
        target.last = now
        self._campaigns.move_to_end(target.id)
        for key in (*seen.variant_keys, *(k for _, k in seen.signal_keys)):
            h = hash((scope, key))
            old = self._links.pop(h, ())
            self._links[h] = old if old[:1] == (own_id,) else (own_id, *(v for v in old if v != own_id))[:LINK_DEPTH]
        self._trim()
        return Campaign(target.id, target.first, window_sum(target.buckets, now, period), target.variants,
                        tuple(sorted(target.signals)))

    def _trim(self) -> None:
        if len(self._links) > self.max_links * 1.1:
            # insertion order is use order (link_now re-inserts): keep the newest max_keys in one O(n)
            # rebuild per 10 % of growth; deleting from the front one by one leaves dummies that
            # every later next(iter()) walks over (measured: 6 x slower per message)
            self._links = dict(itertools.islice(self._links.items(), len(self._links) - self.max_links, None))
        for table in (self._variants, self._campaigns):
            while len(table) > max(1, self.max_links // 16):
                table.popitem(last=False)

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        return self.link_now(scope, seen, period, now)

    def _resembling(self, scope: str, seen: Sighting, horizon: float) -> Iterator[tuple[str, _Variant, str]]:
        """(id, variant, verdict) of each live variant a variant key of this message points at
        and its signature resembles, each looked at once (a wave's keys name the same few)."""
        checked: set[str] = set()
        for key in seen.variant_keys:
            for vid in self._links.get(hash((scope, key)), ()):
                if vid in checked:
                    continue
                checked.add(vid)
                v = self._variants.get(vid)
                if v is not None and v.last >= horizon and (why := verdict(seen.signature, v.signature)):
                    yield vid, v, why

    def known(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign | None:
        """The live campaign a copy of this message's variant is in here, without counting it."""
        horizon = now - period
        best: _Campaign | None = None
        for _, v, why in self._resembling(scope, seen, horizon):
            camp = self._root(v.campaign) if why in (TEXT, SHAPE) else None
            if camp is not None and camp.last >= horizon and (best is None or camp.first < best.first):
                best = camp
        if best is None:
            return None
        return Campaign(best.id, best.first, window_sum(best.buckets, now, period), best.variants,
                        tuple(sorted(best.signals)))

    def adopt(self, scope: str, seen: Sighting, period: float, now: float, shared: Campaign) -> None:
        """Link the message here as well, and make the campaign it joins the shared one: its id,
        first sight, variants, signals and count. Later copies linked here (during an outage) then
        join the wave under the id its quarantined copies already carry."""
        local = self._root(self.link_now(scope, seen, period, now).id)
        entry = self._campaigns.get(shared.id)
        if entry is None:
            entry = self._campaigns[shared.id] = _Campaign(shared.id, shared.first_seen, now)
        entry.merged_into = None
        if local is not None and local is not entry:
            for b, n in local.buckets.items():
                entry.buckets[b] = entry.buckets.get(b, 0) + n
            local.buckets, local.merged_into = {}, entry.id
        entry.first, entry.last, entry.variants = shared.first_seen, now, shared.variants
        entry.signals = set(shared.signals)
        set_window_sum(entry.buckets, shared.count, now, period)
        self._campaigns.move_to_end(entry.id)
        self._trim()


class WindowShare:
    """The fallback of a shared window: this process's mirror of the waves under way, and its share.

    While the shared window answers, every key and campaign it counts at MIRROR_FROM or more is
    copied into `mirror` (`observe`, `observe_link`; a message seen once is no wave yet, and ham,
    which mostly is, costs nothing), so when it fails the mirror already knows where each wave
    this process saw stood: counting on from there is not a fresh start at zero (which let every
    host pass a whole threshold of a wave already under way). During the outage each copy counts
    `hosts()` times (the processes that shared the store, as last counted:
    shared_state.Membership): a wave is spread over them, so together they hold it at about the
    threshold one would. What was counted during the outage is not added to the shared store
    when it answers again; its counts go on from where they stood. A shared store that answers
    but has forgotten a campaign the mirror knows (restarted empty) is outvoted by the mirror
    (`observe_link`) until its own count overtakes it. Not so for keys (`observe`): the mirror
    dates what it copies at the moment it saw it, so once the shared window has slid, a mirrored
    count is higher than the true one, and outvoting with it held mail no window ever counted.
    """

    def __init__(self, mirror: MemoryWindow, hosts: Callable[[], int] = lambda: 1) -> None:
        self.mirror = mirror
        self.hosts = hosts

    def observe(self, keys: Sequence[str], counts: Sequence[int], period: float, now: float) -> None:
        """The shared window's counts for these keys."""
        waves = [(k, c) for k, c in zip(keys, counts, strict=True) if c >= MIRROR_FROM]
        if waves:
            self.mirror.set_counts([k for k, _ in waves], [c for _, c in waves], period, now)

    def observe_link(self, scope: str, seen: Sighting, period: float, now: float, shared: Campaign) -> Campaign:
        """The shared window linked this message into `shared`; the campaign to judge by.

        A wave the mirror saw under way, older and larger than the campaign the shared window now
        puts the message in, is one the shared window forgot: the message counts on in the mirror's
        campaign (its id is the one the wave's quarantined copies carry), until the shared
        window's own count of the wave overtakes it."""
        known = self.mirror.known(scope, seen, period, now)
        if known is not None and known.id != shared.id and known.first_seen <= shared.first_seen \
                and known.count >= shared.count:
            return self.mirror.link_now(scope, seen, period, now)
        if shared.count >= MIRROR_FROM:
            self.mirror.adopt(scope, seen, period, now, shared)
        return shared

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        return self.mirror.add_now(keys, period, now, step=max(1, self.hosts()))

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        return self.mirror.link_now(scope, seen, period, now, step=max(1, self.hosts()))


class RedisWindow:
    """Counts in Redis, one hash per key (field = bucket number), updated by one Lua script call."""

    def __init__(self, redis: Redis, prefix: str = "qg:burst:") -> None:
        self.redis = redis
        self.prefix = prefix
        script = resources.files("queueguard.burst").joinpath("window.lua").read_text()
        self._script = redis.register_script(script)
        self._link = redis.register_script(resources.files("queueguard.burst").joinpath("campaign.lua").read_text())

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        if not keys:
            return []
        ttl_ms = int(period * 1000 * (1 + 1 / BUCKETS)) + 1000
        result = await self._script(
            keys=[self.prefix + k for k in keys], args=[bucket_of(now, period), BUCKETS, ttl_ms]
        )
        return [int(c) for c in result]

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        ttl_ms = int(period * 1000 * (1 + 1 / BUCKETS)) + 1000
        signals = [part for pair in seen.signal_keys for part in pair]
        args: list[bytes | str | int | float] = [
            self.prefix + scope, seen.signature, repr(now), bucket_of(now, period), BUCKETS, ttl_ms,
            new_id(), new_id(), SAME, SIMILAR, REPEATS, PENDING, LINK_DEPTH, len(seen.variant_keys),
            *seen.variant_keys, *signals]
        cid, first, count, variants, names = await self._link(keys=[], args=args)
        text = names.decode() if isinstance(names, bytes) else str(names)
        return Campaign(cid.decode() if isinstance(cid, bytes) else str(cid), float(first), int(count),
                        int(variants), tuple(text.split(",")) if text else ())
