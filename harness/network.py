"""A network of sites on 127.0.0.1 that tells a story: the harness of the multi-site scenarios.

A scenario is a file in ``scenarios/`` with ``def run(net: Network) -> None``
and a docstring. The runner (:mod:`harness.runner`) gives it a :class:`Network`:
a work directory, free ports, and helpers that start sites (each its own data
directory and embedded NATS server), link them with leaf nodes, register them
with each other, upload, stage and delete packages, and wait — always with a
deadline — until the sites agree. Every step is printed with its time, so a
person running ``odst scenario run scenarios/chain3`` sees what happened; every
process is stopped at the end, also when a check fails. A failed check raises
:class:`ScenarioFailed` with the tail of the logs of the sites concerned.
Benches use it too (``bench/replication.py``), with the story on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote

import httpx

from harness.ports import free_port
from harness.site import SiteProcess, stop_all, tls_context
from harness.wait import TimedOut, wait_until
from odst.bus import connect_as_site
from odst.naming import name_key
from odst.store.hashing import WholeHash, hash_file

__all__ = ["Network", "Site", "ScenarioFailed"]

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 60.0
LOG_TAIL_LINES = 40
STOP_TIMEOUT = 20.0


class ScenarioFailed(Exception):
    """A scenario's check did not hold; the message says which, with the sites' log tails."""


# --------------------------------------------------------------------------- helpers


def content_blocks(size: int, seed: int | str) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes, in 1 MiB blocks."""
    rnd = random.Random(str(seed))
    left = size
    while left:
        n = min(left, CHUNK)
        yield rnd.randbytes(n)
        left -= n


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- sites


@dataclass(kw_only=True, eq=False)
class Site(SiteProcess):
    """One ``odst serve`` of a network: its name, leaf links and stage policy."""

    net: "Network"
    dials: list[str] = field(default_factory=list)  # names of the sites whose leaf port it dials
    accept: list[str] | None = None  # stages replicated here; None: every stage
    die_with_parent: bool = True  # a runner never leaves sites behind
    id: str = ""
    nats_log_mark: int = 0  # size of <data>/run/nats.log when we last (re)started it or a hub it dials

    @property
    def packages_dir(self) -> Path:
        return self.data / "store" / "packages"

    @property
    def tmp_dir(self) -> Path:
        return self.data / "store" / "tmp"

    def accepts(self, stage: str) -> bool:
        return self.accept is None or stage in self.accept

    def file(self, name: str) -> Path:
        """The store's file for any spelling of ``name`` (files are named by key)."""
        return self.packages_dir / name_key(name)

    def command(self) -> list[str]:
        cmd = super().command()
        for hub in self.dials:
            cmd += ["--leaf-remote", f"nats-leaf://127.0.0.1:{self.net[hub].leaf_port}"]
        for stage in self.accept or []:
            cmd += ["--accept-stage", stage]
        return cmd

    def nats_log_size(self) -> int:
        try:
            return self.nats_log.stat().st_size
        except OSError:
            return 0

    def link_up_since_mark(self, hub: "Site") -> bool:
        """Has this site's nats-server bridged JetStream with ``hub`` over its leaf link since the mark?"""
        try:
            with open(self.nats_log, "rb") as f:
                f.seek(self.nats_log_mark)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return False
        needle = f"127.0.0.1:{hub.leaf_port} - lid:"
        return any(needle in line and "JetStream using domains" in line for line in text.splitlines())

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------- the network


class Network:
    """Sites on 127.0.0.1 under one work directory, and the steps of a story."""

    def __init__(self, workdir: Path, *, title: str = "scenario", out=None,
                 admin_token: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.out = out or sys.stdout
        self.token = admin_token or "scenario-admin-" + secrets.token_hex(12)
        self.sites: dict[str, Site] = {}
        self.started = time.monotonic()
        self._http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), verify=tls_context(),
                                  headers={"Authorization": f"Bearer {self.token}"})
        self._print_lock = threading.Lock()
        self.results: dict[str, Any] = {}  # figures a scenario wants to report (e.g. latencies)

    # ----------------------------------------------------------------- story output

    def say(self, message: str) -> None:
        """Print one line of the story, with the time since the scenario started."""
        with self._print_lock:
            print(f"[{time.monotonic() - self.started:7.2f}s] {message}", file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A named step: printed when it starts and when it ends, with its duration."""
        t0 = time.monotonic()
        self.say(f"> {what}")
        try:
            yield
        except BaseException:
            self.say(f"x {what} FAILED after {time.monotonic() - t0:.2f}s")
            raise
        self.say(f"  done: {what} ({time.monotonic() - t0:.2f}s)")

    def fail(self, message: str, sites: Iterable[Site | str] | None = None) -> None:
        """Raise ScenarioFailed with the message and the log tails of the sites concerned."""
        chosen = [self[s] for s in sites] if sites is not None else list(self.sites.values())
        parts = [message]
        for s in chosen:
            parts.append(f"\n--- last {LOG_TAIL_LINES} lines of site {s.name} ({s.log_path}) ---\n"
                         f"{s.log_tail()}")
        raise ScenarioFailed("\n".join(parts))

    def check(self, condition: Any, message: str, sites: Iterable[Site | str] | None = None) -> None:
        if not condition:
            self.fail(message, sites)

    # ----------------------------------------------------------------- topology

    def __getitem__(self, site: Site | str) -> Site:
        return site if isinstance(site, Site) else self.sites[site]

    def name_of(self, site_id: str) -> str:
        for s in self.sites.values():
            if s.id == site_id:
                return s.name
        return site_id

    def names(self, site_ids: Iterable[str]) -> list[str]:
        return [self.name_of(i) for i in site_ids]

    def add(self, name: str, *, listen: bool = False, dial: Iterable[Site | str] = (),
            accept: Iterable[str] | None = None, env: dict[str, str] | None = None,
            args: Iterable[str] = ()) -> Site:
        """Declare a site (not started): ``listen`` accepts leaf links, ``dial`` links to hubs,
        ``args`` are more ``odst serve`` flags."""
        if name in self.sites:
            raise ValueError(f"site {name} already exists")
        site = Site(net=self, name=name, data=self.workdir / name, port=free_port(), token=self.token,
                    log_path=self.workdir / f"{name}.log", leaf_port=free_port() if listen else None,
                    accept=list(accept) if accept is not None else None,
                    env={"ODST_LOG_FORMAT": "console", **(env or {})}, extra_args=list(args))
        for hub in dial:
            self.link(site, hub)
        self.sites[name] = site
        return site

    def link(self, spoke: Site | str, hub: Site | str) -> None:
        """Make ``spoke`` dial ``hub``'s leaf port (the hub gets one if it has none)."""
        spoke, hub = self[spoke], self[hub]
        if hub.leaf_port is None:
            if hub.running:
                raise ValueError(f"{hub.name} is running without a leaf port; declare it with listen=True")
            hub.leaf_port = free_port()
        if hub.name not in spoke.dials:
            spoke.dials.append(hub.name)

    def chain(self, *names: str, **kw) -> list[Site]:
        """A leaf chain: names[0] <- names[1] <- ... (each dials the one before it)."""
        sites = []
        for i, name in enumerate(names):
            sites.append(self.add(name, listen=i < len(names) - 1, dial=[names[i - 1]] if i else (),
                                  **kw.get(name, {})))
        return sites

    def hub(self, hub: str, spokes: Iterable[str], **kw) -> list[Site]:
        """A hub and spokes: every spoke dials the hub."""
        out = [self.add(hub, listen=True, **kw.get(hub, {}))]
        for name in spokes:
            out.append(self.add(name, dial=[hub], **kw.get(name, {})))
        return out

    # ----------------------------------------------------------------- processes

    def start(self, *sites: Site | str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start the given sites (default: every declared site not running) and wait until healthy."""
        chosen = [self[s] for s in sites] if sites else [s for s in self.sites.values() if not s.running]
        chosen = [s for s in chosen if not s.running]
        if not chosen:
            return
        # hubs first: a spoke's leaf link then comes up at once instead of after a reconnect delay
        chosen.sort(key=lambda s: (s.leaf_port is None, len(s.dials)))
        label = ", ".join(s.name for s in chosen)
        with self.step(f"start {label}"):
            started = time.monotonic()
            for s in self.sites.values():  # leaf links to (re)check: of the new sites, and to them
                if s in chosen or any(self[h] in chosen for h in s.dials):
                    s.nats_log_mark = s.nats_log_size()
            for s in chosen:
                s.start_process()
            self._wait_healthy(chosen, timeout)
            self._wait_links(chosen, timeout - (time.monotonic() - started))
            for s in chosen:
                if not s.id:
                    s.id = self.get(s, "/api/v1/site")["site"]
                    self.say(f"  site {s.name} is {s.id} at {s.url}"
                             + (f", leaf port {s.leaf_port}" if s.leaf_port else "")
                             + (f", dials {','.join(s.dials)}" if s.dials else "")
                             + (f", accepts {','.join(s.accept)}" if s.accept else ""))

    def _wait_links(self, chosen: list[Site], timeout: float) -> None:
        """Wait until every leaf link from or to the started sites is up (seen in the dialer's
        nats.log), so that what follows does not race the link's first connection."""
        pairs = [(s, self[h]) for s in self.sites.values() for h in s.dials
                 if s.running and self[h].running and (s in chosen or self[h] in chosen)
                 and self._knows(self[h], s)]  # a hub refuses the leaf link of a site it does not know
        self._wait_leaf_links(pairs, timeout)

    def _knows(self, hub: Site, spoke: Site) -> bool:
        return any(p["site"] == spoke.id for p in self.get(hub, "/api/v1/peers")["peers"])

    def _wait_leaf_links(self, pairs: list[tuple[Site, Site]], timeout: float) -> None:
        for spoke, hub in pairs:
            self.wait_until(lambda: spoke.link_up_since_mark(hub), max(timeout, 5.0),
                            f"leaf link {spoke.name} -> {hub.name} to come up", sites=[spoke, hub])
        if pairs:
            self.say("  leaf links up: " + ", ".join(f"{s.name}->{h.name}" for s, h in pairs))

    def _wait_healthy(self, sites: list[Site], timeout: float) -> None:
        pending = list(sites)
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while pending:
            for s in list(pending):
                if s.proc.poll() is not None:
                    self.fail(f"site {s.name}: odst serve exited with code {s.proc.returncode} while starting",
                              [s])
                try:
                    r = httpx.get(f"{s.url}/healthz", timeout=2, verify=tls_context())
                    if r.status_code == 200:
                        pending.remove(s)
                    else:
                        last[s.name] = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last[s.name] = type(exc).__name__
            if pending and time.monotonic() > deadline:
                self.fail(f"sites {', '.join(s.name for s in pending)} not healthy after {timeout:.0f}s "
                          f"(last answers: {last})", pending)
            if pending:
                time.sleep(0.1)

    def stop(self, *sites: Site | str, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (an orderly shutdown), then wait; SIGKILL if it does not exit in time."""
        chosen = [self[s] for s in sites if self[s].running]
        if not chosen:
            return
        with self.step(f"stop {', '.join(s.name for s in chosen)} (SIGTERM)"):
            codes = self._terminate(chosen, timeout)
            for s, code in zip(chosen, codes):
                if code not in (0, -signal.SIGTERM):
                    self.say(f"  note: site {s.name} exited with code {code}")

    def _terminate(self, sites: list[Site], timeout: float) -> list[int | None]:
        return stop_all(sites, timeout, note=lambda line: self.say(f"  {line}"))

    def kill9(self, site: Site | str) -> None:
        """kill -9 the site's ``odst serve`` (its nats-server follows it: PDEATHSIG)."""
        s = self[site]
        with self.step(f"kill -9 {s.name} (pid {s.proc.pid})"):
            s.kill9()
            s.reap_broker(note=lambda line: self.say(f"  {line}"))

    def restart(self, site: Site | str, timeout: float = DEFAULT_TIMEOUT) -> None:
        s = self[site]
        if s.running:
            self.stop(s)
        self.start(s, timeout=timeout)

    def close(self) -> None:
        """Stop every process this network started (used in a finally)."""
        running = [s for s in self.sites.values() if s.running]
        if running:
            self.say(f"stopping {', '.join(s.name for s in running)}")
            try:
                self._terminate(running, STOP_TIMEOUT)
            except BaseException:
                for s in running:
                    with contextlib.suppress(Exception):
                        s.proc.kill()
                raise
        else:
            for s in self.sites.values():
                if s.proc is not None:
                    s.reap_broker(2, note=lambda line: self.say(f"  {line}"))
        self._http.close()

    # ----------------------------------------------------------------- HTTP

    def request(self, site: Site | str, method: str, path: str, *, ok=(200, 201), **kw) -> dict:
        s = self[site]
        try:
            r = self._http.request(method, s.url + path, **kw)
        except httpx.HTTPError as exc:
            self.fail(f"{method} {path} on site {s.name}: {type(exc).__name__}: {exc}", [s])
        if r.status_code not in ok:
            self.fail(f"{method} {path} on site {s.name} answered {r.status_code}: {r.text[:1000]}", [s])
        return r.json() if r.content else {}

    def get(self, site: Site | str, path: str, **kw) -> dict:
        return self.request(site, "GET", path, **kw)

    def try_get(self, site: Site | str, path: str, timeout: float = 5.0) -> dict | None:
        """GET that returns None instead of failing (for polling a site that may be busy or down)."""
        s = self[site]
        try:
            r = self._http.get(s.url + path, timeout=timeout)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def state(self, site: Site | str) -> dict:
        """GET /api/v1/state: digest, packages with their holders, transfers, conflicts, counters."""
        return self.get(site, "/api/v1/state")

    def package(self, site: Site | str, name: str) -> dict | None:
        s = self[site]
        r = self._http.get(f"{s.url}/api/v1/packages/{quote(name, safe='')}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            self.fail(f"GET package {name} on {s.name}: {r.status_code} {r.text[:500]}", [s])
        return r.json()

    # ----------------------------------------------------------------- admin actions

    def register(self, a: Site | str, b: Site | str) -> None:
        """Mutual registration: an invitation made at ``a``, joined at ``b``."""
        a, b = self[a], self[b]
        with self.step(f"register {a.name} <-> {b.name} (invite at {a.name}, join at {b.name})"):
            token = self.request(a, "POST", "/api/v1/peers/invites", json={})["token"]
            out = self.request(b, "POST", "/api/v1/peers/join", json={"token": token})
            self.say(f"  {b.name} registered with {self.name_of(out['site'])} via {out.get('via')}")
            # the hub now knows the spoke's key: its leaf link comes up (it was refused till now)
            self._wait_leaf_links([(s, h) for s, h in ((a, b), (b, a)) if h.name in s.dials
                                   and s.running and h.running], DEFAULT_TIMEOUT)

    def upload(self, site: Site | str, name: str, size: int | None = None, *, data: bytes | None = None,
               stage: str | None = None, seed: int | str | None = None, ok=(201,),
               same_content: bool = True, replace: bool = False) -> dict:
        """PUT a package (``size`` deterministic pseudo-random bytes, or ``data``); returns the answer's
        package JSON plus ``sent``: size, sha1 and blake3 of the bytes actually sent.

        With ``same_content`` (the default) the answer must describe the bytes sent; a racing
        same-name upload elsewhere may legitimately win the name, so a conflict story turns it off.
        ``replace`` replaces the package of that name (PUT ?replace=true).
        """
        s = self[site]
        if data is None and size is None:
            raise ValueError("upload needs size or data")
        total = len(data) if data is not None else size
        sent = WholeHash()

        def body() -> Iterator[bytes]:
            blocks = ([data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] if data is not None
                      else content_blocks(size, seed if seed is not None else f"{name}:{s.name}"))
            for block in blocks:
                sent.update(block)
                yield block

        params = {"stage": stage} if stage else {}
        if replace:
            params["replace"] = "true"
        with self.step(f"{'replace' if replace else 'upload'} {name} ({_fmt_size(total)}{', stage ' + stage if stage else ''}) at {s.name}"):
            t0 = time.monotonic()
            try:
                r = self._http.put(f"{s.url}/api/v1/packages/{quote(name, safe='')}", content=body(),
                                   params=params, headers={"Content-Length": str(total),
                                                           "Content-Type": "application/octet-stream"},
                                   timeout=httpx.Timeout(300.0, connect=5.0))
            except httpx.HTTPError as exc:
                self.fail(f"upload of {name} to {s.name} failed: {type(exc).__name__}: {exc}", [s])
            if r.status_code not in ok:
                self.fail(f"upload of {name} to {s.name} answered {r.status_code}: {r.text[:1000]}", [s])
            pkg = r.json()
            if r.status_code >= 300:
                self.say(f"  {name}: {r.status_code} {pkg.get('detail', '')}")
            pkg["status"] = r.status_code
            pkg["sent"] = {"size": total, "sha1": sent.sha1, "blake3": sent.blake3}
            if r.status_code in (200, 201):
                self.say(f"  {name}: {r.status_code}, sha1 {pkg['sent']['sha1'][:12]}, "
                         f"blake3 {pkg['sent']['blake3'][:12]}, {-(-total // CHUNK)} chunks, "
                         f"{time.monotonic() - t0:.2f}s")
                if pkg.get("sha1") != pkg["sent"]["sha1"]:
                    message = (f"site {s.name} answered {r.status_code} to the upload of {name} with the manifest "
                               f"of other content (sha1 {pkg.get('sha1')}, blake3 {str(pkg.get('blake3'))[:12]}); "
                               f"the bytes sent hash to sha1 {pkg['sent']['sha1']}")
                    if same_content:
                        self.fail(message, [s])
                    self.say(f"  note: {message}")
            return pkg

    def stage(self, site: Site | str, name: str, stage: str) -> dict:
        s = self[site]
        with self.step(f"set stage of {name} to {stage} at {s.name}"):
            return self.request(s, "PATCH", f"/api/v1/packages/{quote(name, safe='')}", json={"stage": stage})

    def delete(self, site: Site | str, name: str) -> dict:
        s = self[site]
        with self.step(f"delete {name} at {s.name}"):
            return self.request(s, "DELETE", f"/api/v1/packages/{quote(name, safe='')}")

    def nats_publish(self, site: Site | str, subject: str, payload: bytes, *,
                     headers: dict[str, str] | None = None, stream: str | None = None) -> Any:
        """Publish straight to a site's NATS server (JetStream publish when ``stream`` is given)."""
        data = self[site].data

        async def go():
            nc = await connect_as_site(data, max_reconnect_attempts=0)
            try:
                if stream:
                    return await nc.jetstream().publish(subject, payload, stream=stream, headers=headers,
                                                        timeout=10)
                await nc.publish(subject, payload, headers=headers)
                await nc.flush(5)
                return None
            finally:
                await nc.close()
        return asyncio.run(go())

    # ----------------------------------------------------------------- waiting

    def wait_until(self, predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, what: str = "condition",
                   *, sites: Iterable[Site | str] | None = None, interval: float = 0.05,
                   detail: Callable[[], str] | None = None) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds
        with the log tails of ``sites`` (and ``detail()``, e.g. what is still unmet)."""
        try:
            return wait_until(predicate, timeout, interval, what, reraise=(ScenarioFailed,))
        except TimedOut as exc:
            message = str(exc)
            if detail is not None:
                with contextlib.suppress(Exception):
                    message += "\n" + detail()
            self.fail(message, sites)

    def hold(self, predicate: Callable[[], Any], seconds: float, what: str,
             *, sites: Iterable[Site | str] | None = None, interval: float = 0.1) -> None:
        """Check that ``predicate`` stays true for ``seconds`` (e.g. nothing comes back)."""
        with self.step(f"check for {seconds:.0f}s that {what}"):
            deadline = time.monotonic() + seconds
            while True:
                if not predicate():
                    self.fail(f"no longer true: {what}", sites)
                if time.monotonic() > deadline:
                    return
                time.sleep(interval)

    def available_at(self, site: Site | str, name: str, where: Site | str | None = None) -> bool:
        """Does ``site``'s state list ``where`` (default: itself) as holding ``name``?"""
        s = self[site]
        w = self[where] if where is not None else s
        st = self.try_get(s, "/api/v1/state")
        if not st:
            return False
        return any(p["name"] == name and w.id in p["available_at"] for p in st["packages"])

    def wait_available(self, name: str, sites: Iterable[Site | str], timeout: float = DEFAULT_TIMEOUT) -> float:
        """Wait until every given site holds ``name`` (by its own state); returns the seconds waited."""
        chosen = [self[s] for s in sites]
        t0 = time.monotonic()
        with self.step(f"wait until {name} is available at {', '.join(s.name for s in chosen)}"):
            for s in chosen:
                self.wait_until(lambda s=s: self.available_at(s, name), timeout - (time.monotonic() - t0),
                                f"{name} to be available at {s.name}", sites=chosen,
                                detail=lambda: self.describe(chosen))
        return time.monotonic() - t0

    def describe(self, sites: Iterable[Site | str] | None = None) -> str:
        """A short human summary of each site's /api/v1/state."""
        chosen = [self[s] for s in sites] if sites is not None else list(self.sites.values())
        lines = []
        for s in chosen:
            st = self.try_get(s, "/api/v1/state") if s.running else None
            if st is None:
                lines.append(f"  {s.name}: {'not running' if not s.running else 'no answer'}")
                continue
            pk = "; ".join(f"{p['name']}[{p['stage']}] {p['blake3'][:8]} at {','.join(self.names(p['available_at'])) or '-'}"
                           for p in st["packages"]) or "no packages"
            tr = "; ".join(f"{t['name']} {t['status']} {t['chunks_done']}/{t['chunks_total']} {t['detail']}"
                           for t in st["transfers"] if t["status"] != "available")
            lines.append(f"  {s.name}: digest {st['digest'][:12]}  {pk}" + (f"  transfers: {tr}" if tr else ""))
        return "\n".join(lines)

    def wait_converged(self, sites: Iterable[Site | str] | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until the sites' state digests are equal, no transfer is in progress, and every site
        holds every package whose stage it accepts. Returns the common digest."""
        chosen = [self[s] for s in sites] if sites is not None else [s for s in self.sites.values() if s.running]
        last: list[str] = []

        def converged() -> str | None:
            states = {}
            for s in chosen:
                st = self.try_get(s, "/api/v1/state")
                if st is None:
                    last[:] = [f"{s.name} did not answer"]
                    return None
                states[s.name] = st
            problems = []
            digests = {n: st["digest"] for n, st in states.items()}
            if len(set(digests.values())) != 1:
                problems.append("digests differ: " + ", ".join(f"{n}={d[:12]}" for n, d in digests.items()))
            for s in chosen:
                st = states[s.name]
                busy = [t for t in st["transfers"] if t["status"] != "available"]
                if busy:
                    problems.append(f"{s.name} has transfers in progress: " + "; ".join(
                        f"{t['name']} {t['status']} {t['chunks_done']}/{t['chunks_total']} {t['detail']}"
                        for t in busy))
                for p in st["packages"]:
                    if s.accepts(p["stage"]) and s.id not in p["available_at"]:
                        problems.append(f"{s.name} accepts stage {p['stage']} but does not hold {p['name']}")
            last[:] = problems
            return None if problems else next(iter(digests.values()))

        names = ", ".join(s.name for s in chosen)
        with self.step(f"wait until {names} converge"):
            digest = self.wait_until(converged, timeout, f"{names} to converge", sites=chosen, interval=0.1,
                                     detail=lambda: "\n".join(["unmet:", *(f"  {p}" for p in last),
                                                               "states:", self.describe(chosen)]))
            st = self.state(chosen[0])
            self.say(f"  converged: digest {digest[:16]}, {len(st['packages'])} package(s): "
                     + ("; ".join(f"{p['name']}[{p['stage']}] at {','.join(self.names(p['available_at']))}"
                                  for p in st["packages"]) or "none"))
            return digest

    def check_files(self, sites: Iterable[Site | str] | None = None) -> None:
        """Every file in each site's packages/ hashes to its manifest (sha1, blake3, size), every
        package the site's state says it holds is there, and nothing else is."""
        chosen = [self[s] for s in sites] if sites is not None else [s for s in self.sites.values() if s.running]
        with self.step(f"check the published files of {', '.join(s.name for s in chosen)}"):
            total = 0
            for s in chosen:
                st = self.state(s)
                held = {name_key(p["name"]) for p in st["packages"] if s.id in p["available_at"]}
                present = {p.name for p in s.packages_dir.iterdir()} if s.packages_dir.exists() else set()
                extra, missing = present - held, held - present
                self.check(not extra, f"site {s.name} has files nobody published there: {sorted(extra)}", [s])
                self.check(not missing, f"site {s.name} claims {sorted(missing)} but has no such file", [s])
                for name in sorted(present):
                    pkg = self.package(s, name)
                    self.check(pkg is not None, f"site {s.name} has a file {name} but no package of that name", [s])
                    whole = hash_file(s.file(name))
                    size, sha1, b3 = whole.size, whole.sha1, whole.blake3
                    if (size, sha1) != (pkg["size"], pkg["sha1"]) or (b3 and b3 != pkg["blake3"]):
                        self.fail(f"site {s.name}: {name} on disk is {size} bytes sha1 {sha1} blake3 {b3}; "
                                  f"the manifest says {pkg['size']} bytes sha1 {pkg['sha1']} "
                                  f"blake3 {pkg['blake3']}", [s])
                    total += 1
            self.say(f"  {total} file(s) verified against their manifests")
