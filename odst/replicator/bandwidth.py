"""Bandwidth: per-link send and receive limits, weekly timetables, local exemption, urgency.

Pure core (no I/O, time passed in): ``TokenBucket`` (a rate with a burst; a taker may go
into debt, which delays the next), ``Window``/``LinkPolicy`` and ``limit_in_force`` (what
a link may carry at a given local time), ``parse_rate``/``parse_window`` (what the API and
the CLI accept). Shell: ``Bandwidth``, one per process, reads the site's choices from the
read model (the events ``LinkBandwidthSet``, ``LocalNetworksSet``, ``DownloadCapsSet``,
``PackageUrgencySet``; a second old at most) and is asked by the puller before each chunk
it fetches (``receive``) and by the chunk server before each chunk it sends (``send``),
so a limit holds whoever initiates. A paused link holds the puller's workers where they
are: the transfer keeps its verified chunks and goes on when the window opens.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import re
import sqlite3
import time
import zoneinfo
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Callable
from urllib.parse import urlsplit

import structlog

from odst.errors import RequestInvalid
from odst.naming import name_key

log = structlog.get_logger("odst.bandwidth")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_LINK = "*"  # the network-wide default policy's link name
CHUNK = 1 << 20
MIN_BURST = CHUNK  # a bucket must hold one whole chunk, or a chunk could never pass
TICK_S = 0.25  # how often a waiting taker looks again (a window change applies this fast)
REFRESH_S = 1.0  # the read model's choices are read again at most this often
METER_S = 5.0  # the measured rate is the average over this many seconds
MAX_RATE = 10**12  # bytes per second: beyond any link, and within SQLite's integers
SERVER_MAX_WAIT_S = 2.0  # a chunk request that would wait longer is answered 503 + Retry-After
DEFAULT_LOCAL_CIDRS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                       "169.254.0.0/16", "fc00::/7", "fe80::/10")


class BandwidthInvalid(RequestInvalid):
    """A rate, window or network the API or CLI was given does not parse."""

    code = "bandwidth_invalid"


class LinkThrottled(Exception):
    """The server side will not send this chunk now: the link is paused or its bucket is
    too far behind. The peer asks again after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: float):
        super().__init__(reason)
        self.retry_after = retry_after


# --------------------------------------------------------------------------- pure core

class TokenBucket:
    """``rate`` bytes per second with ``burst`` bytes of credit. ``delay(n)`` is how long
    until ``n`` bytes may go (0: now); ``take(n)`` spends them, going into debt if it must,
    so takers that do not wait (the server) still hold the average."""

    def __init__(self, rate: int, burst: int, now: float):
        self.rate, self.burst = rate, max(burst, MIN_BURST)
        self.tokens = float(self.burst)
        self.at = now

    def configure(self, rate: int, burst: int) -> None:
        self.rate, self.burst = rate, max(burst, MIN_BURST)
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)

    def delay(self, n: int, now: float) -> float:
        self._refill(now)
        need = min(n, self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: int, now: float) -> None:
        self._refill(now)
        self.tokens -= n


def default_burst(rate: int) -> int:
    """An eighth of a second of traffic, at least one chunk: no second runs far over the rate."""
    return max(MIN_BURST, rate // 8)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight; at or before start: runs past midnight
    limit: int = 0  # bytes per second, 0: unlimited
    paused: bool = False

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # past midnight: the evening of a listed day, or the morning after it
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))

    def as_json(self) -> dict:
        return {"days": [DAYS[d] for d in sorted(self.days)], "start": _hhmm(self.start),
                "end": _hhmm(self.end), "limit_bps": self.limit, "paused": self.paused}


@dataclass(frozen=True)
class LinkPolicy:
    send: int = 0  # bytes per second, 0: unlimited
    receive: int = 0
    burst: int = 0  # 0: default_burst(rate)
    windows: tuple[Window, ...] = ()
    local: str = "auto"  # auto | yes | no
    source: str = "none"  # link | default | none: where it came from (shown to the admin)
    updated_by: str = ""


@dataclass(frozen=True)
class Limit:
    """What a link may carry in one direction now: ``rate`` bytes/s (0: unlimited), or paused."""

    rate: int
    paused: bool
    state: str  # open | limited | paused | local | urgent
    window: Window | None = None

    @property
    def unlimited(self) -> bool:
        return not self.paused and self.rate == 0


def limit_in_force(policy: LinkPolicy, direction: str, when: datetime) -> Limit:
    """The limit of one direction (send | receive) at local time ``when``: the first window
    that covers it replaces the link's own rates; outside every window, the link's rates."""
    minute = when.hour * 60 + when.minute
    for w in policy.windows:
        if w.covers(when.weekday(), minute):
            if w.paused:
                return Limit(0, True, "paused", w)
            return Limit(w.limit, False, "limited" if w.limit else "open", w)
    rate = policy.send if direction == "send" else policy.receive
    return Limit(rate, False, "limited" if rate else "open")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?(b|bps|b/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def parse_rate(value: str | int) -> int:
    """Bytes per second from ``20MB`` (10^6), ``2MiB``, ``500k``, ``1500000``; ``0``,
    ``off`` or ``unlimited``: 0 (no limit)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_RATE:
            raise BandwidthInvalid(f"a rate is 0 (unlimited) up to {MAX_RATE} bytes per second")
        return value
    text = str(value).strip().lower()
    if text in ("off", "unlimited", "none", ""):
        return 0
    m = _RATE.match(text)
    if not m:
        raise BandwidthInvalid(f"rate {value!r}: give bytes per second, e.g. 20MB, 2MiB, 500k, or off")
    return parse_rate(int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]))


def _minutes(text: str) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or (int(m.group(1)) == 24 and int(m.group(2))):
        raise BandwidthInvalid(f"time {text!r}: give HH:MM, 00:00 to 24:00")
    return int(m.group(1)) * 60 + int(m.group(2))


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_days(value: str | list[str]) -> frozenset[int]:
    """``mon-fri``, ``sat,sun``, ``daily``, or a list of day names."""
    items = value if isinstance(value, list) else str(value).split(",")
    out: set[int] = set()
    for item in items:
        item = str(item).strip().lower()
        if item in ("daily", "all", "*"):
            out.update(range(7))
        elif "-" in item:
            a, _, b = item.partition("-")
            if a[:3] not in DAYS or b[:3] not in DAYS:
                raise BandwidthInvalid(f"days {item!r}: use mon..sun, e.g. mon-fri")
            i, j = DAYS.index(a[:3]), DAYS.index(b[:3])
            out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        elif item[:3] in DAYS and len(item) >= 3:
            out.add(DAYS.index(item[:3]))
        else:
            raise BandwidthInvalid(f"day {item!r}: use mon..sun, mon-fri, or daily")
    if not out:
        raise BandwidthInvalid("a window needs at least one day")
    return frozenset(out)


def parse_window(value: str | dict) -> Window:
    """A window from JSON (``{"days": "mon-fri", "start": "08:00", "end": "18:00",
    "limit": "2MB" | "paused"}``) or text (``mon-fri 08:00-18:00 2MB``)."""
    if isinstance(value, str):
        parts = value.split()
        if len(parts) != 3 or "-" not in parts[1]:
            raise BandwidthInvalid(f"window {value!r}: write DAYS HH:MM-HH:MM RATE|paused, "
                                   "e.g. 'mon-fri 08:00-18:00 2MB'")
        start, _, end = parts[1].partition("-")
        value = {"days": parts[0], "start": start, "end": end, "limit": parts[2]}
    if not isinstance(value, dict):
        raise BandwidthInvalid("a window is an object with days, start, end and limit")
    unknown = set(value) - {"days", "start", "end", "limit", "limit_bps", "paused"}
    if unknown:
        raise BandwidthInvalid(f"window: unknown fields {sorted(unknown)}")
    try:
        days, start, end = value["days"], value["start"], value["end"]
    except KeyError as exc:
        raise BandwidthInvalid(f"window: missing {exc.args[0]}") from None
    limit = value.get("limit", value.get("limit_bps", 0))
    paused = bool(value.get("paused", False)) or str(limit).strip().lower() == "paused"
    s, e = _minutes(str(start)), _minutes(str(end))
    if s == e and s != 0:
        raise BandwidthInvalid("a window's start and end differ (00:00-24:00 is the whole day)")
    return Window(parse_days(days), s, e, 0 if paused else parse_rate(limit), paused)


def window_from_event(w) -> Window:
    return Window(parse_days(list(w["days"])), _minutes(w["start"]), _minutes(w["end"]),
                  int(w.get("limit_bps", 0)), bool(w.get("paused", False)))


def parse_cidrs(values: list[str]) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(str(v).strip(), strict=False)))
        except ValueError:
            raise BandwidthInvalid(f"{v!r} is not a network (e.g. 10.0.0.0/8 or 192.168.1.0/24)") from None
    return out


def host_is_local(host: str, cidrs: list[str]) -> bool:
    return _host_is_local(host, tuple(cidrs))


@functools.lru_cache(maxsize=1024)
def _host_is_local(host: str, cidrs: tuple[str, ...]) -> bool:
    """Cached: asked before every chunk pulled, and parsing the addresses was most of a
    small package's receive-limit check."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host in ("localhost",)
    return any(addr in ipaddress.ip_network(c) for c in cidrs)


@dataclass(frozen=True)
class DownloadCaps:
    egress_bps: int = 0
    max_concurrent: int = 0
    per_client: int = 0


# --------------------------------------------------------------------------- shell

def site_timezone(settings) -> tzinfo | None:
    """The zone timetables are read in: the ``timezone`` setting, else the system's (None)."""
    return zoneinfo.ZoneInfo(settings.timezone) if settings.timezone else None


class RateMeter:
    """Bytes in the last METER_S seconds, per second."""

    def __init__(self):
        self.samples: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, n: int, now: float) -> None:
        self.samples.append((now, n))
        self.total += n
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.samples and self.samples[0][0] < now - METER_S:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self.samples) / METER_S


@dataclass
class _Choices:
    links: dict[str, LinkPolicy] = field(default_factory=dict)
    default: LinkPolicy = field(default_factory=LinkPolicy)
    exempt: bool = True
    cidrs: list[str] = field(default_factory=lambda: list(DEFAULT_LOCAL_CIDRS))
    hosts: dict[str, str] = field(default_factory=dict)  # peer -> host of its http_url
    urgent_names: set[str] = field(default_factory=set)
    urgent_blake3: set[str] = field(default_factory=set)
    caps: DownloadCaps = field(default_factory=DownloadCaps)


def _policy(row: sqlite3.Row, source: str) -> LinkPolicy:
    return LinkPolicy(send=row["send_bps"], receive=row["receive_bps"], burst=row["burst_bytes"],
                      windows=tuple(window_from_event(w) for w in json.loads(row["windows"])),
                      local=row["local"], source=source, updated_by=row["updated_by"])


def read_choices(reader: sqlite3.Connection, site_id: str) -> _Choices:
    """This site's bandwidth choices from the read model (pure SQL, no I/O beyond it)."""
    c = _Choices()
    for r in reader.execute("SELECT * FROM bandwidth_links WHERE site=? AND cleared=0 AND link<>?",
                            (site_id, DEFAULT_LINK)):
        c.links[r["link"]] = _policy(r, "link")
    d = reader.execute("SELECT * FROM bandwidth_links WHERE link=? ORDER BY clock DESC LIMIT 1",
                       (DEFAULT_LINK,)).fetchone()
    if d is not None and not d["cleared"]:
        c.default = _policy(d, "default")
    row = reader.execute("SELECT exempt, cidrs FROM local_networks WHERE site=?", (site_id,)).fetchone()
    if row is not None:
        c.exempt, c.cidrs = bool(row["exempt"]), json.loads(row["cidrs"])
    for r in reader.execute("SELECT site, http_url FROM directory WHERE site<>? ORDER BY clock", (site_id,)):
        if r["http_url"]:
            c.hosts[r["site"]] = urlsplit(r["http_url"]).hostname or ""
    # marks name the package in the spelling the operator typed; a package is its name's key
    for r in reader.execute("SELECT name FROM urgent_packages WHERE urgent=1"):
        c.urgent_names.add(name_key(r["name"]))
        p = reader.execute("SELECT blake3 FROM packages WHERE key=?", (name_key(r["name"]),)).fetchone()
        if p is not None:
            c.urgent_blake3.add(p["blake3"])
    row = reader.execute("SELECT * FROM download_caps WHERE site=?", (site_id,)).fetchone()
    if row is not None:
        c.caps = DownloadCaps(row["egress_bps"], row["max_concurrent"], row["per_client"])
    return c


class Bandwidth:
    """The limits this process enforces, its buckets and its measured rates."""

    def __init__(self, *, site_id: str, reader: sqlite3.Connection, tz: tzinfo | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] | None = None):
        self.site_id, self.reader, self.tz = site_id, reader, tz
        self.clock = clock
        self.wall = wall or (lambda: datetime.now(self.tz) if self.tz else datetime.now().astimezone())
        self._choices = _Choices()
        self._read_at = -1e9
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.meters: dict[tuple[str, str], RateMeter] = {}
        self.waiting: dict[tuple[str, str], int] = {}  # takers held by a pause or the bucket now

    # -- choices
    def choices(self) -> _Choices:
        now = self.clock()
        if now - self._read_at >= REFRESH_S:
            try:
                self._choices = read_choices(self.reader, self.site_id)
            except sqlite3.Error as exc:  # keep the last known choices; say so
                log.warning("could not read bandwidth choices; keeping the last ones", error=str(exc))
            self._read_at = now
        return self._choices

    def refresh(self) -> None:
        """Read the choices at the next question (after a change through this process's API)."""
        self._read_at = -1e9

    def policy(self, peer: str) -> LinkPolicy:
        c = self.choices()
        return c.links.get(peer, c.default)

    def is_local(self, peer: str) -> bool:
        c, p = self.choices(), self.policy(peer)
        if p.local in ("yes", "no"):
            return p.local == "yes"
        return c.exempt and host_is_local(c.hosts.get(peer, ""), c.cidrs)

    def limit(self, peer: str, direction: str) -> Limit:
        if self.is_local(peer):
            return Limit(0, False, "local")
        return limit_in_force(self.policy(peer), direction, self.wall())

    def urgent(self, *, name: str = "", blake3: str = "") -> bool:
        c = self.choices()
        return (bool(name) and name_key(name) in c.urgent_names) or (bool(blake3) and blake3 in c.urgent_blake3)

    def download_caps(self) -> DownloadCaps:
        return self.choices().caps

    # -- enforcement
    def _bucket(self, peer: str, direction: str, rate: int) -> TokenBucket:
        burst = self.policy(peer).burst or default_burst(rate)
        b = self.buckets.get((peer, direction))
        if b is None:
            b = self.buckets[(peer, direction)] = TokenBucket(rate, burst, self.clock())
        elif (b.rate, b.burst) != (rate, max(burst, MIN_BURST)):
            b.configure(rate, burst)
        return b

    def _count(self, peer: str, direction: str, n: int) -> None:
        self.meters.setdefault((peer, direction), RateMeter()).add(n, self.clock())

    async def receive(self, peer: str, n: int, *, urgent: Callable[[], bool] = lambda: False,
                      waiting: Callable[[str], None] = lambda why: None) -> None:
        """Wait until ``n`` bytes may come from ``peer`` (before the puller fetches a chunk).
        A paused link waits here, looking again every TICK_S; urgency is asked each time."""
        key = (peer, "receive")
        held = False
        try:
            while True:
                if urgent():
                    break
                lim = self.limit(peer, "receive")
                if lim.unlimited:
                    break
                if lim.paused:
                    why = f"link to {peer} paused by its timetable"
                else:
                    bucket = self._bucket(peer, "receive", lim.rate)
                    d = bucket.delay(n, self.clock())
                    if d <= 0:
                        bucket.take(n, self.clock())
                        break
                    why = ""
                if not held:
                    held = True
                    self.waiting[key] = self.waiting.get(key, 0) + 1
                waiting(why)
                await asyncio.sleep(TICK_S if lim.paused else min(d, TICK_S))
        finally:
            if held:
                self.waiting[key] -= 1
                waiting("")
        self._count(peer, "receive", n)

    def _send_limit(self, peer: str, blake3: str) -> Limit | None:
        """The send limit that holds for ``blake3`` to ``peer``; None for an urgent content."""
        return None if self.urgent(blake3=blake3) else self.limit(peer, "send")

    def send_unpaced(self, peer: str, blake3: str = "") -> bool:
        """``send`` would neither wait nor refuse now (no limit, a local peer, an open window,
        an urgent content): it would only count the bytes."""
        lim = self._send_limit(peer, blake3)
        return lim is None or (lim.unlimited and not lim.paused)

    async def send(self, peer: str, n: int, *, blake3: str = "") -> None:
        """Before the chunk server sends ``n`` bytes to ``peer``: wait a little, or refuse
        (LinkThrottled) when paused or too far behind, so the peer's request does not time out."""
        lim = self._send_limit(peer, blake3)
        if lim is not None:
            if lim.paused:
                raise LinkThrottled(f"the link from {self.site_id} is paused by its timetable", 2.0)
            if not lim.unlimited:
                bucket = self._bucket(peer, "send", lim.rate)
                d = bucket.delay(n, self.clock())
                if d > SERVER_MAX_WAIT_S:
                    raise LinkThrottled(f"the link from {self.site_id} is at its limit", min(d, 30.0))
                bucket.take(n, self.clock())
                if d > 0:
                    await asyncio.sleep(d)
        self._count(peer, "send", n)

    # -- what the admin sees
    def rate(self, peer: str, direction: str) -> float:
        m = self.meters.get((peer, direction))
        return m.rate(self.clock()) if m else 0.0

    def link_status(self, peer: str) -> dict:
        p = self.policy(peer)
        out = {"peer": peer, "policy": policy_json(p), "local": self.is_local(peer)}
        for direction in ("send", "receive"):
            lim = self.limit(peer, direction)
            out[direction] = {"limit_bps": lim.rate, "state": lim.state,
                              "window": lim.window.as_json() if lim.window else None,
                              "measured_bps": round(self.rate(peer, direction)),
                              "waiting": self.waiting.get((peer, direction), 0)}
        return out


def policy_json(p: LinkPolicy) -> dict:
    return {"send_bps": p.send, "receive_bps": p.receive, "burst_bytes": p.burst,
            "windows": [w.as_json() for w in p.windows], "local": p.local, "source": p.source,
            "updated_by": p.updated_by}
