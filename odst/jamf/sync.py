"""Keeping Jamf Pro's records in step with ODST: distribution points, package records, drift.

``JamfService`` runs in the projector role (the one writer) when ``jamf_url`` is set: it wakes
on every read-model change, writes the record of each package that reached ``jamf_stage`` and
is served by every site replicating that stage (or ``jamf_quorum`` sites), and checks for
drift every ``jamf_check_interval_s``. Every write is a signed ``JamfPackageSynced``; a drift
is a ``JamfDriftDetected`` (notifiable), its end a ``JamfDriftCleared``. The gateway uses the
same functions for ``odst jamf …`` (register-dp, check, sync --dry-run).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from xml.etree import ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import quote

import structlog

from odst import tasks
from odst.config import Settings
from odst.events import catalogue as ev
from odst.jamf.client import JamfClient, JamfError, credentials
from odst.naming import name_key
from odst.jamf.digests import Digests
from odst.jamf.records import NOTES_MARK, DistributionPoint, Wanted, classic_package, classic_package_ids, \
    dp_body, dp_xml, drift_kind, package_body, package_xml, record_action
from odst.projections import views
from odst.store.hashing import file_digest

log = structlog.get_logger("odst.jamf")

PAGE = 200
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 300.0
DONE = {"create": "created", "update": "updated", "unchanged": "unchanged"}


class JamfNotConfigured(JamfError):
    """No Jamf Pro server is configured (jamf_url is empty)."""


# --------------------------------------------------------------------------- read model


def ready_packages(conn: sqlite3.Connection, site: str, own_stages: list[str], stage: str,
                   quorum: int) -> list[sqlite3.Row]:
    """Packages in ``stage`` served by every site that replicates it (or by ``quorum`` sites).

    Which sites replicate a stage: this one by its own choice, each peer by its last
    StagesAccepted; a peer that never chose is counted as replicating every stage (its
    accept_stages setting is known only to it), so ODST waits for it rather than guess.

    A site counts when it SERVES the content (``views.sites_serving``: its latest report under
    the name), not when it once reported it available: during a replacement a site serves the
    old bytes until it swapped, and after a replacement back to an older content a site's old
    report of it still says "available" while it serves the newer one. Jamf Pro's hash must
    match what a Mac gets from every counting site, so it moves only after the last swap."""
    sites = {site: stage in own_stages}
    for p in views.peer_sites(conn, site):
        chosen = p.accepted_stages
        sites[p.site] = chosen is None or stage in chosen
    required = {s for s, replicates in sites.items() if replicates}
    out = []
    for row in conn.execute("SELECT * FROM packages WHERE stage=? ORDER BY name", (stage,)).fetchall():
        holders = {r[0] for r in conn.execute(
            "SELECT site FROM serving WHERE key=? AND blake3=?", (row["key"], row["blake3"]))} & set(sites)
        if (quorum and len(holders) >= quorum) or (not quorum and required and required <= holders):
            out.append(row)
    return out


def jamf_row(conn: sqlite3.Connection, name: str) -> dict | None:
    row = conn.execute("SELECT * FROM jamf_packages WHERE name=?", (name,)).fetchone()
    return dict(row) if row else None


def jamf_rows(conn: sqlite3.Connection) -> dict[str, dict]:
    return {r["name"]: dict(r) for r in conn.execute("SELECT * FROM jamf_packages")}


def package_state(conn: sqlite3.Connection, name: str) -> dict:
    """What the package page shows: in_sync | hash_differs | no_record | previous_version (the
    record holds the hash of content the name stood for before: during a replacement, until the
    last counting site serves the new one) (or failed, pending)."""
    row = jamf_row(conn, name)
    if row is None:
        return {"state": "no_record", "detail": ""}
    state = {"missing": "no_record", "deleted": "no_record"}.get(row["state"], row["state"])
    detail = row["detail"]
    current = conn.execute("SELECT blake3 FROM packages WHERE name=?", (name,)).fetchone()
    if state == "in_sync" and current and current[0] != row["blake3"]:
        state = "previous_version"
        detail = ("Jamf Pro holds the previous version's hash; it moves to this version once every site "
                  "that counts serves it")
    return {"state": state, "detail": detail, "record_id": row["record_id"],
            "hash_type": row["hash_type"], "hash_value": row["hash_value"], "blake3": row["blake3"],
            "updated_at": int(row["clock"][:15])}


# --------------------------------------------------------------------------- Jamf Pro records


async def find_record(client: JamfClient, file_name: str) -> tuple[dict | None, str]:
    """(the package record whose fileName is ``file_name`` or None, the API that holds records):
    the Jamf Pro API (11.5+), or on its 404 the Classic API (older servers)."""
    rsql = f'fileName=="{file_name}"'.replace("\\", "\\\\")
    status, body = await client.request("GET", "/api/v1/packages", ok=(200, 404),
                                        params={"page": "0", "page-size": "10", "filter": rsql})
    if status == 404:
        return await _classic_find(client, file_name), "classic"
    for r in (body or {}).get("results", []):
        if r.get("fileName") == file_name:
            return r, "pro"
    return None, "pro"


async def _classic_get(client: JamfClient, path: str) -> dict | None:
    status, text = await client.request("GET", path, ok=(200, 404))
    if status == 404:
        return None
    try:
        return classic_package(text or "")
    except (ValueError, ElementTree.ParseError) as exc:
        raise JamfError(f"Jamf Pro's Classic answer to GET {path} is not a <package>: {exc}") from None


async def _classic_find(client: JamfClient, file_name: str) -> dict | None:
    """Classic records are found by display name: ODST names its own after the file; an admin's
    record with another display name is found by reading every record (older servers only)."""
    record = await _classic_get(client, f"/JSSResource/packages/name/{quote(file_name, safe='')}")
    if record and record["fileName"] == file_name:
        return record
    for r in await _classic_all(client):
        if r["fileName"] == file_name:
            return r
    return None


async def _classic_all(client: JamfClient) -> list[dict]:
    _, text = await client.request("GET", "/JSSResource/packages")
    try:
        ids = classic_package_ids(text or "")
    except (ValueError, ElementTree.ParseError) as exc:
        raise JamfError(f"Jamf Pro's Classic answer to GET /JSSResource/packages is not a list: {exc}") from None
    out = []
    for pid, _ in ids:
        if pid.isdigit() and (r := await _classic_get(client, f"/JSSResource/packages/id/{pid}")):
            out.append(r)
    return out


async def all_records(client: JamfClient) -> list[dict]:
    out, page = [], 0
    while True:
        status, body = await client.request("GET", "/api/v1/packages", ok=(200, 404),
                                            params={"page": str(page), "page-size": str(PAGE)})
        if status == 404:  # Jamf Pro before 11.5
            return await _classic_all(client)
        results = (body or {}).get("results", [])
        out += results
        if len(results) < PAGE or len(out) >= int((body or {}).get("totalCount", 0)):
            return out
        page += 1


async def write_record(client: JamfClient, api: str, action: str, want: Wanted, record: dict | None) -> str:
    """Create or update the record through the API that holds it; the record's id."""
    if api == "classic":
        if action == "create":
            _, text = await client.request("POST", "/JSSResource/packages/id/0", xml=package_xml(want))
            return _xml_id(text)
        await client.request("PUT", f"/JSSResource/packages/id/{record['id']}", xml=package_xml(want, record))
        return str(record["id"])
    if action == "create":
        _, made = await client.request("POST", "/api/v1/packages", json=package_body(want))
        return str(made["id"])
    await client.request("PUT", f"/api/v1/packages/{record['id']}", json=package_body(want, record))
    return str(record["id"])


async def delete_record(client: JamfClient, record_id: str) -> None:
    if not record_id.isdigit():  # a record id from a log (a peer's event): a number, never a path
        raise JamfError(f"not a Jamf Pro record id: {record_id[:80]!r}; not deleted")
    status, _ = await client.request("DELETE", f"/api/v1/packages/{record_id}", ok=(200, 204, 404))
    if status == 404:  # gone already, or a Jamf Pro before 11.5: the Classic API then
        await client.request("DELETE", f"/JSSResource/packages/id/{record_id}", ok=(200, 204, 404))


@dataclass
class Deps:
    """What the Jamf parts use of a site, passed in by the composition root."""

    settings: Settings
    site_id: str
    reader: sqlite3.Connection
    accepted_stages: Callable[[], list[str]]
    append: Callable[[ev.Event], Awaitable[object]]  # appends as actor "jamf"
    store_path: Callable[[str], Path]
    wait_changed: Callable[[float], Awaitable[object]]
    digests: Digests | None = None  # MD5/SHA3_512 the upload computed (<data>/jamf-digests.sqlite)


class JamfService:
    """The sync and the drift check over one Jamf Pro server."""

    def __init__(self, deps: Deps, client: JamfClient | None = None):
        self.d = deps
        creds = credentials(deps.settings)
        self.client = client or (JamfClient(creds) if creds else None)
        self._digests: dict[tuple[str, str], str] = {}  # (blake3, hash type) -> hex
        self._retry: dict[str, tuple[float, float]] = {}  # name -> (not before, next delay)
        self._dry_seen: set[tuple[str, str, str]] = set()
        self._failed_seen: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self._one_at_a_time = asyncio.Lock()  # the background pass and an admin's request never interleave
        self.last_check: dict = {}
        self.connection: dict = {"checked": False}

    @property
    def configured(self) -> bool:
        return self.client is not None

    def _need(self) -> JamfClient:
        if self.client is None:
            raise JamfNotConfigured("no Jamf Pro server is configured: set jamf_url and its credentials")
        return self.client

    # ------------------------------------------------------------- connection

    async def check_connection(self) -> dict:
        client = self._need()
        try:
            await client.token()
            version = await client.version()
            self.connection = {"checked": True, "ok": True, "version": version, "url": client.creds.url,
                               "auth": client.creds.kind, "at": int(time.time())}
        except JamfError as exc:
            self.connection = {"checked": True, "ok": False, "error": str(exc), "url": client.creds.url,
                               "auth": client.creds.kind, "at": int(time.time())}
        return self.connection

    # ------------------------------------------------------------- distribution points

    def _site_dp(self, site: str, failover: tuple[str, str] = ("-1", "")) -> DistributionPoint:
        s = self.d.settings
        if site == self.d.site_id:
            name, url = s.site_name or site[:12], s.base_url
        else:
            peer = next((p for p in views.peer_sites(self.d.reader, self.d.site_id) if p.site == site), None)
            if peer is None or not peer.http_url:
                raise JamfError(f"site {site} is not a known peer with a public URL")
            name, url = peer.name or site[:12], peer.http_url
        user = s.download_user if s.download_auth == "basic" else ""
        password = s.download_password if s.download_auth == "basic" else ""
        return DistributionPoint(name=f"ODST {name}", public_url=url, context=s.context,
                                 user=user, password=password,
                                 failover_id=failover[0], failover_name=failover[1])

    def site_ids(self, all_sites: bool) -> list[str]:
        ids = [self.d.site_id]
        if all_sites:
            ids += [p.site for p in views.peer_sites(self.d.reader, self.d.site_id) if p.http_url]
        return ids

    def resolve_site(self, ref: str) -> str:
        """A site id or name (as the Network page shows it) -> site id."""
        if ref in (self.d.site_id, self.d.settings.site_name):
            return self.d.site_id
        for p in views.peer_sites(self.d.reader, self.d.site_id):
            if ref in (p.site, p.name):
                return p.site
        raise JamfError(f"no site {ref!r}: name a site of the Network page")

    async def register_dps(self, *, all_sites: bool = False, failover: str = "") -> list[dict]:
        """Create or update the DP record of this site (and every peer): Jamf Pro API, Classic on 404."""
        client = self._need()
        failover_site = self.resolve_site(failover) if failover else ""
        order = self.site_ids(all_sites)
        if failover_site:  # the failover DP's record first, so the others can name it
            order = [failover_site] + [s for s in order if s != failover_site]
        results, fo = [], ("-1", "")
        for site in order:
            dp = self._site_dp(site, fo if site != failover_site else ("-1", ""))
            record_id, api, action = await self._put_dp(client, dp)
            if site == failover_site:
                fo = (record_id, dp.name)
            event = ev.JamfDistributionPointRegistered(site=site, record_id=record_id, dp_name=dp.name,
                                                       url=dp.url, api=api, action=action,
                                                       failover_site=failover_site if site != failover_site else "")
            await self.d.append(event)
            results.append({"site": site, "record_id": record_id, "name": dp.name, "url": dp.url, "api": api,
                            "action": action})
        return results

    async def _put_dp(self, client: JamfClient, dp: DistributionPoint) -> tuple[str, str, str]:
        if dp.https:
            status, body = await client.request("GET", "/api/v1/distribution-points",
                                                params={"page": "0", "page-size": str(PAGE)}, ok=(200, 404))
            if status != 404:
                found = next((r for r in (body or {}).get("results", []) if r.get("name") == dp.name), None)
                if found:
                    await client.request("PUT", f"/api/v1/distribution-points/{found['id']}", json=dp_body(dp))
                    return str(found["id"]), "pro", "updated"
                _, made = await client.request("POST", "/api/v1/distribution-points", json=dp_body(dp))
                return str(made["id"]), "pro", "created"
        # Classic: Jamf Pro before 11.16, or an HTTP (not HTTPS) distribution point
        path = f"/JSSResource/distributionpoints/name/{quote(dp.name, safe='')}"
        status, _ = await client.request("GET", path, ok=(200, 404))
        if status == 200:
            _, text = await client.request("PUT", path, xml=dp_xml(dp))
            return _xml_id(text), "classic", "updated"
        _, text = await client.request("POST", "/JSSResource/distributionpoints/id/0", xml=dp_xml(dp))
        return _xml_id(text), "classic", "created"

    # ------------------------------------------------------------- package records

    async def wanted(self, row: sqlite3.Row) -> Wanted:
        hash_type = self.d.settings.jamf_hash_type
        if hash_type == "SHA_512":
            value = row["sha512"]
        else:
            key = (row["blake3"], hash_type)
            value = self._digests.get(key)
            loop = asyncio.get_running_loop()
            if value is None and self.d.digests is not None:  # computed in the upload's single pass
                value = await loop.run_in_executor(None, self.d.digests.get, row["blake3"], hash_type)
            if value is None:  # uploaded elsewhere, or before: read this site's copy once, and keep it
                path = self.d.store_path(row["name"])
                try:
                    value = await loop.run_in_executor(None, file_digest, path, hash_type, row["blake3"])
                except (OSError, ValueError) as exc:
                    raise JamfError(f"{hash_type} needs this site's copy of {row['name']}: {exc}") from None
                if self.d.digests is not None:
                    await loop.run_in_executor(None, self.d.digests.put, row["blake3"], {hash_type: value})
            self._digests[key] = value
        notes = (f"{NOTES_MARK}: uploaded by {row['uploaded_by'] or 'unknown'}, "
                 f"blake3 {row['blake3'][:16]}, stage {row['stage']}")
        return Wanted(name=row["name"], blake3=row["blake3"], size=row["size"], hash_type=hash_type,
                      hash_value=value.lower(), notes=notes)

    def pending(self) -> tuple[list[sqlite3.Row], list[dict]]:
        """(packages whose record must be written, ODST-made records of deleted packages)."""
        s = self.d.settings
        rows = jamf_rows(self.d.reader)
        ready = ready_packages(self.d.reader, self.d.site_id, self.d.accepted_stages(), s.jamf_stage,
                               s.jamf_quorum)
        todo = [r for r in ready if not (
            (j := rows.get(r["name"])) and j["state"] == "in_sync" and j["blake3"] == r["blake3"]
            and j["hash_type"] == s.jamf_hash_type)]
        live = views.live_keys(self.d.reader)  # names compare by key (naming.name_key)
        gone = [j for j in rows.values() if name_key(j["name"]) not in live and j["created_by_odst"]
                and j["record_id"] and j["state"] != "deleted"]
        return todo, gone

    async def sync_once(self, *, dry_run: bool | None = None, force: bool = False) -> list[dict]:
        """Write every pending record once; return what was (or would be) done. ``force``: an
        admin asked, so retry back-offs and the dry run's "already said so" do not apply."""
        client = self._need()
        async with self._one_at_a_time:
            return await self._sync(client, dry_run, force)

    async def _sync(self, client: JamfClient, dry_run: bool | None, force: bool) -> list[dict]:
        dry = self.d.settings.jamf_dry_run if dry_run is None else dry_run
        todo, gone = self.pending()
        out = []
        now = time.monotonic()
        for row in todo:
            name = row["name"]
            if not force and not dry and self._retry.get(name, (0, 0))[0] > now:
                continue
            if not force and dry and any(k[:2] == (name, row["blake3"]) for k in self._dry_seen):
                continue  # the background dry run already recorded its plan for this content
            try:
                want = await self.wanted(row)
                record, api = await find_record(client, name)
                action = record_action(want, record)
                record_id = str(record["id"]) if record else ""
                created = False
                if not dry and action != "unchanged":
                    record_id = await write_record(client, api, action, want, record)
                    created = action == "create"
                ours = created or bool((jamf_row(self.d.reader, name) or {}).get("created_by_odst")) \
                    and (jamf_row(self.d.reader, name) or {}).get("record_id") == record_id
                item = {"name": name, "action": action, "record_id": record_id, "hash_type": want.hash_type,
                        "hash_value": want.hash_value, "dry_run": dry}
                out.append(item)
                if dry and (name, row["blake3"], action) in self._dry_seen:
                    continue  # a dry run's plan is recorded once per content, not on every wake
                await self.d.append(ev.JamfPackageSynced(
                    name=name, blake3=row["blake3"], file_name=name, record_id=record_id,
                    hash_type=want.hash_type, hash_value=want.hash_value, size=want.size,
                    action=("would " + action) if dry else DONE[action], dry_run=dry, created_by_odst=ours))
                if dry:
                    self._dry_seen.add((name, row["blake3"], action))
                    log.info("jamf dry run", package=name, would=action, record=record_id or None)
                else:
                    self._retry.pop(name, None)
                    self._failed_seen.discard((name, row["blake3"]))
                    log.info("jamf record written", package=name, action=action, record=record_id)
            except JamfError as exc:
                out.append({"name": name, "action": "failed", "detail": str(exc), "dry_run": dry})
                await self._failed(row, exc, dry)
        for j in gone:
            item = {"name": j["name"], "record_id": j["record_id"], "dry_run": dry}
            if not self.d.settings.jamf_allow_deletes:
                continue  # deleting in ODST never deletes a Jamf record unless allowed
            item["action"] = "delete"
            if not dry:
                try:
                    await delete_record(client, j["record_id"])
                except JamfError as exc:
                    out.append({**item, "action": "failed", "detail": str(exc)})
                    continue
            out.append(item)
            if dry and (j["name"], j["blake3"], "delete") in self._dry_seen:
                continue
            await self.d.append(ev.JamfPackageSynced(
                name=j["name"], blake3=j["blake3"], file_name=j["file_name"], record_id=j["record_id"],
                hash_type=j["hash_type"], hash_value=j["hash_value"], size=j["size"],
                action="would delete" if dry else "deleted", dry_run=dry, created_by_odst=True))
            if dry:
                self._dry_seen.add((j["name"], j["blake3"], "delete"))
        return out

    async def _failed(self, row, exc: JamfError, dry: bool) -> None:
        name = row["name"]
        _, delay = self._retry.get(name, (0, BACKOFF_FIRST_S))
        self._retry[name] = (time.monotonic() + delay, min(delay * 2, BACKOFF_MAX_S))
        log.warning("jamf record not written; retrying later", package=name, error=str(exc), retry_s=delay)
        if dry or (name, row["blake3"]) in self._failed_seen:
            return  # one event per content's failure, not one per retry
        self._failed_seen.add((name, row["blake3"]))
        await self.d.append(ev.JamfPackageSynced(
            name=name, blake3=row["blake3"], file_name=name, record_id="", hash_type=self.d.settings.jamf_hash_type,
            hash_value="", size=row["size"], action="write", result="failed", detail=str(exc)[:500]))

    # ------------------------------------------------------------- drift

    async def check(self) -> dict:
        """Compare Jamf Pro's records with ODST; record each change of state as an event."""
        client = self._need()
        async with self._one_at_a_time:
            return await self._check(client)

    async def _check(self, client: JamfClient) -> dict:
        s = self.d.settings
        records = {r.get("fileName"): r for r in await all_records(client)}
        rows = jamf_rows(self.d.reader)
        ready = {r["name"]: r for r in ready_packages(self.d.reader, self.d.site_id, self.d.accepted_stages(),
                                                      s.jamf_stage, s.jamf_quorum)}
        live = views.live_keys(self.d.reader)  # names compare by key (naming.name_key)
        known = {r[0] for r in self.d.reader.execute("SELECT DISTINCT name FROM contents")}
        report = []
        names = set(ready) | {n for n, j in rows.items() if j["state"] != "deleted"} \
            | {n for n in records if n in known and name_key(n) not in live}
        for name in sorted(names):
            row = ready.get(name)
            if row is None and name_key(name) in live:
                continue  # not (yet) at the stage everywhere: not Jamf's business yet
            try:
                want = await self.wanted(row) if row is not None else None
            except JamfError as exc:
                report.append({"name": name, "state": "failed", "detail": str(exc)})
                continue
            record = records.get(name)
            kind = drift_kind(want, record)
            entry = {"name": name, "state": kind, "record_id": str(record["id"]) if record else ""}
            previous = rows.get(name, {}).get("state")
            if kind == "in_sync":
                if previous in ("missing", "hash_differs", "no_file"):
                    await self.d.append(ev.JamfDriftCleared(name=name, record_id=entry["record_id"]))
            else:
                expected = want.hash_value if want else ""
                found = (record or {}).get("hashValue") or ""
                entry.update(expected=expected, found=found)
                detail = f"expected {expected or '-'}, found {found or '-'}"
                if previous != kind or rows.get(name, {}).get("detail") != detail:
                    await self.d.append(ev.JamfDriftDetected(name=name, kind=kind, record_id=entry["record_id"],
                                                             expected=expected, found=found))
            report.append(entry)
        self.last_check = {"at": int(time.time()), "packages": report,
                           "drift": sum(1 for e in report if e["state"] not in ("in_sync",))}
        return self.last_check

    # ------------------------------------------------------------- the background component

    def start(self) -> "JamfService":
        self._task = asyncio.create_task(self._run(), name="jamf")
        return self

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        if self.client:
            await self.client.close()

    async def _run(self) -> None:
        next_check = time.monotonic() + min(5.0, self.d.settings.jamf_check_interval_s)
        while True:
            folded = self._folded()
            try:
                await self.sync_once()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.d.settings.jamf_check_interval_s
                    await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Jamf Pro down, read model busy: the next wake tries again
                log.warning("jamf pass failed; retrying", error=f"{type(exc).__name__}: {exc}")
            wait = max(0.5, min(next_check - time.monotonic(), self._next_retry() or 60.0))
            if self._folded() != folded:
                # the read model moved during the pass (the last site's swap, a delete): its wake-up
                # came while nobody waited, so look again soon instead of sleeping until the next one
                wait = 0.2
            await self.d.wait_changed(wait)

    def _folded(self) -> int:
        """How far the read model has folded (changes whenever any stream folds)."""
        try:
            return self.d.reader.execute("SELECT coalesce(sum(seq), 0) FROM checkpoints").fetchone()[0]
        except sqlite3.Error:
            return -1

    def _next_retry(self) -> float | None:
        if not self._retry:
            return None
        return max(0.5, min(t for t, _ in self._retry.values()) - time.monotonic())


def _xml_id(text) -> str:
    import re
    m = re.search(r"<id>(\d+)</id>", text or "")
    if not m:
        raise JamfError(f"Jamf Pro's Classic API answer has no <id>: {str(text)[:200]}")
    return m.group(1)
