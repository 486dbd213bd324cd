"""/api/v1/packages: upload (streamed), list, inspect, re-stage, delete."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Literal

import msgspec
import structlog
from litestar import Controller, Request, Response, delete, get, patch, put
from litestar.params import Parameter

from odst.errors import (InsufficientStorage, OdstError, PackageConflict, PackageNotFound, RequestInvalid,
                         StageInvalid, TooManyUploads, Unavailable, UploadIncomplete, UploadTooLarge)
from odst.events import catalogue as ev
from odst.events import uploads
from odst.events.log import AppendFailed, AppendUnconfirmed, NotYetApplied
from odst.gateway.auth import READ, WRITE, Principal, allowed, bearer
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import PACKAGE_NAME, PACKAGE_NAME_MAX
from odst.naming import MAX_INT64, ascii_int, check_name, name_in_path, name_key
from odst.projections import views
from odst.gateway.context import GatewayContext
from odst.gateway.protocol import BODY_FOLLOWS
from odst.jamf.digests import Digests, digests_path, extra_types
from odst.store.files import SMALL_BYTES, StoreFull, StreamingUpload

log = structlog.get_logger("odst.gateway")

# The event is in the log but this site's read model had not applied it in time: the package
# will appear (nothing is undone); the same bytes sent again are answered 200 once it has.
NOT_YET_APPLIED = ("recorded, but this site has not applied it yet; it will appear shortly "
                   "(sending the same bytes again answers 200 once it has)")
# The event was sent but the broker did not answer (AppendUnconfirmed): it may be stored. The
# file is kept as if it were; if the log never names it, the replicator's janitor removes it.
UNCONFIRMED = ("not known whether recorded: the event log did not answer in time; the file is kept "
               "and the package appears if the log stored it (look before sending it again)")


def _not_yet(exc: NotYetApplied) -> str:
    return f"{UNCONFIRMED if isinstance(exc, AppendUnconfirmed) else NOT_YET_APPLIED} ({exc})"


class Uploaded(views.Package, kw_only=True):
    """An upload's 201 answer: the package as recorded, and the id of the event that recorded
    this very upload (its events may have been appended together with others': batch.GroupCommit)."""
    event_id: str

    @classmethod
    def of(cls, package: views.Package, appended) -> "Uploaded":
        return cls(**msgspec.structs.asdict(package), event_id=appended.envelope.id)


class PackageUpdate(msgspec.Struct, forbid_unknown_fields=True):
    stage: str | None = None  # one of the site's stages: the document served names them (openapi.document)


# The {name} of the package routes. check_name (on the path exactly as sent) enforces the rules
# and says which one failed; the pattern only documents them (Litestar would answer a failed
# pattern with the regex itself). Names longer than 255 UTF-8 bytes are a 400 too.
PACKAGE_NAME_PARAM = Parameter(min_length=1, max_length=PACKAGE_NAME_MAX, schema_extra={"pattern": PACKAGE_NAME},
                               description="a package name: no '/', '\\', '..', leading '.', white space at "
                                           "either end, control or format characters; at most 255 UTF-8 bytes")


UPLOADS = "/api/v1/packages/"  # PackageController.path + "/": a package's route, and Uploads' door
MAX_NAMES = 100  # exact names one list request may ask for (?name=a&name=b…)


class ClientGone(Exception):
    pass


_name_locks: dict[str, asyncio.Lock] = {}


def _lock_for(name: str) -> asyncio.Lock:
    """One lock per package: every spelling of a name shares it (naming.name_key)."""
    key = name_key(name)
    lock = _name_locks.get(key)
    if lock is None:
        lock = _name_locks[key] = asyncio.Lock()
    return lock


# Large uploads in progress in this process, by actor. Each holds two threads and up to
# MAX_BACKLOG bytes while its body comes (StreamingUpload); body_timeout_s ends a stalled one,
# and uploads_per_user bounds how many one user or token runs at once.
_large_uploads: Counter[str] = Counter()


def _start_large_upload(actor: str, limit: int) -> None:
    if _large_uploads[actor] >= limit:
        log.warning("upload refused: too many large uploads in progress", actor=actor, limit=limit)
        raise TooManyUploads(f"{limit} large uploads of yours are in progress here (uploads_per_user); "
                             "send this one when one of them has ended")
    _large_uploads[actor] += 1


def _end_large_upload(actor: str) -> None:
    _large_uploads[actor] -= 1
    if not _large_uploads[actor]:
        del _large_uploads[actor]


async def _receive_body(receive, upload: StreamingUpload, limit: int, length: int | None) -> None:
    """The body into ``upload``. A large one of announced length is taken as memoryviews read
    straight into the protocol's buffers (``receive.into_buffers``, protocol.py), with no copy
    on the event loop's thread; the threads hash and write them where they lie."""
    if length is not None and length > upload.small_bytes:
        into_buffers = getattr(receive, "into_buffers", None)
        if into_buffers is not None:
            into_buffers()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body = message.get("body", b"")
        if body:
            if upload.received + len(body) > limit:
                raise UploadTooLarge(f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")
            await upload.feed(body)
        if not message.get("more_body", False):
            return


def _refused(decision) -> Exception:
    """An upload decision (odst.events.uploads) that refuses, as the HTTP error it is."""
    kind = {uploads.TooLarge: UploadTooLarge, uploads.NoSpace: InsufficientStorage,
            uploads.Conflict: PackageConflict}[type(decision)]
    return kind(decision.detail)


def _strict(scope) -> str:
    """The {name} path segment exactly as the client sent it (see odst.naming.request_path)."""
    return name_in_path(scope, UPLOADS)


def _with_local_transfer(site: GatewayContext, pkg: views.Package | views.PackageRow):
    """Show this site's transfer in progress (pending/downloading/failed) beside the logged availability."""
    here = pkg.availability.get(site.id)
    if site.replicator is None or (here and here.status == "available"):
        return pkg
    progress = site.replicator.progress.get((pkg.name, pkg.blake3))
    if progress is not None and progress.status != "available":
        t = progress.as_dict()
        now = views.Availability(status=t["status"], detail=t["detail"], chunks_done=t["chunks_done"],
                                 chunks_total=t["chunks_total"], rate_bytes_per_s=t["rate_bytes_per_s"],
                                 updated_at=here.updated_at if here else None)
        pkg = msgspec.structs.replace(pkg, availability={**pkg.availability, site.id: now})
    return pkg


async def _replace(site: GatewayContext, actor: str, name: str, stage: str | None, path, manifest) -> tuple[int, Any]:
    """Swap a verified upload in under ``name``: downloads that opened the old file finish it
    (rename over keeps its inode), new ones get the new file; if the event cannot be recorded
    the old file is put back. Other sites swap when they hold the new content verified."""
    async with _lock_for(name):
        served = views.servable(site.reader, name, site.id)
        decision = uploads.accept_replace(name, stage, site.settings.default_stage, manifest,
                                          views.package(site.reader, name), served.blake3 if served else None)
        if isinstance(decision, uploads.Identical):
            path.unlink(missing_ok=True)
            site.stats.uploads["identical"] += 1
            return 200, decision.existing
        if isinstance(decision, uploads.Conflict):  # another spelling of the name
            path.unlink(missing_ok=True)
            site.stats.uploads["refused"] += 1
            raise _refused(decision)
        with site.store.publishing(name):
            backup = site.store.swap(path, name)
            try:
                appended = await site.append(decision.event, actor=actor)
            except NotYetApplied as exc:  # recorded: the new file stays, as the log says
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise Unavailable(_not_yet(exc)) from None
            except AppendFailed as exc:
                site.store.swap_back(backup, name)
                raise Unavailable(f"replacement not recorded, try again: {exc}") from None
            except BaseException:
                site.store.swap_back(backup, name)
                raise
            if backup is not None:
                backup.unlink(missing_ok=True)
    log.info("package replaced" if isinstance(decision, uploads.Replaced) else "upload published",
             package=name, size=manifest.size, sha1=manifest.sha1)
    site.stats.uploads["replaced" if isinstance(decision, uploads.Replaced) else "published"] += 1
    current = views.package(site.reader, name)
    lost = uploads.lost_race(name, manifest, current)
    if lost is not None:
        raise _refused(lost)
    return 201, Uploaded.of(current, appended)


async def take_upload(site: GatewayContext, actor: str, raw_name: str, stage: str | None, replace: bool,
                      announced: str | None, receive) -> tuple[int, Any]:
    """An upload, whichever door it came in by (the Litestar route or ``Uploads``, in front of
    it): ``raw_name`` is the {name} path segment exactly as sent, ``announced`` the
    Content-Length header, ``receive`` the request's ASGI receive. Streams the body into the
    store (never held in memory), publishes it and appends its event; returns the status and
    the answer's body (201 ``Uploaded``, 200 the identical package already there) or raises
    the OdstError to answer. With ``replace`` other content under an existing name replaces
    it (see ``_replace``) instead of being refused."""
    settings = site.settings
    name = check_name(raw_name, settings.allowed_extensions)
    requested_stage = stage
    stage = stage or settings.default_stage
    if stage not in settings.stages:
        raise StageInvalid(f"unknown stage {stage!r}; allowed: {', '.join(settings.stages)}")
    length = None
    if announced is not None:
        length = ascii_int(announced)
        if length is None:
            raise RequestInvalid("Content-Length is not a number")
    known = views.package(site.reader, name)
    refusal = uploads.admit_upload(name, length, known,
                                   max_bytes=settings.max_upload_bytes, free_bytes=site.store.free_bytes(),
                                   reserve_bytes=site.store.reserve_bytes(), replace=replace)
    if refusal is not None:
        raise _refused(refusal)
    large = length is None or length > SMALL_BYTES  # a small body is one job on a shared pool
    if large:  # (nothing below raises before the try that ends it)
        _start_large_upload(actor, settings.uploads_per_user)
    extra = extra_types(settings.jamf_url, settings.jamf_hash_type)  # Jamf Pro's MD5/SHA3_512, same pass
    upload = StreamingUpload(site.store.new_temp(), extra_digests=extra)
    log.debug("upload started", package=name, length=length)  # info: the one "upload published" line
    try:
        await _receive_body(receive, upload, settings.max_upload_bytes, length)
        # a new package's file is fsynced once linked (Store.publishing_upload), a replacement's
        # here; a small one of a name not known yet is published in the job that writes it
        # (undone if refused below)
        if replace:
            manifest, published = await upload.finish(fsync=True), None
        elif known is not None:  # the name's file may be another's (a pull): never touched before deciding
            manifest, published = await upload.finish(fsync=False), None
        else:
            manifest, published = await upload.finish_publishing(site.store, name)
    except ClientGone:
        await upload.abort()
        log.warning("upload truncated: client disconnected", package=name, received=upload.received)
        raise UploadIncomplete("client disconnected before the upload completed") from None
    except StoreFull as exc:
        await upload.abort()
        log.error("upload failed: store full", package=name)
        raise InsufficientStorage(str(exc)) from None
    except asyncio.CancelledError:
        upload.abort_now()  # the server is stopping: clean up without awaiting anything
        log.warning("upload interrupted by shutdown", package=name, received=upload.received)
        raise Unavailable("the server is shutting down; the upload was not stored: retry") from None
    except BaseException:
        await upload.abort()
        raise
    finally:
        if large:
            _end_large_upload(actor)
    if length is not None and manifest.size != length:
        site.store.unpublish(name, published) if published is not None else upload.path.unlink(missing_ok=True)
        raise UploadIncomplete(f"received {manifest.size} bytes, Content-Length said {length}")
    if extra:
        await asyncio.get_running_loop().run_in_executor(
            None, Digests(digests_path(site.data)).put, manifest.blake3, upload.extra_digests)
    if replace:
        return await _replace(site, actor, name, requested_stage, upload.path, manifest)
    async with _lock_for(name):
        decision = uploads.accept_upload(name, stage, manifest, views.package(site.reader, name), site.id)
        if not isinstance(decision, uploads.Uploaded):
            site.store.unpublish(name, published) if published is not None else upload.path.unlink(missing_ok=True)
            if isinstance(decision, uploads.Identical):
                site.stats.uploads["identical"] += 1
                return 200, decision.existing
            site.stats.uploads["refused"] += 1
            raise _refused(decision)
        try:
            async with (site.store.published_upload(name) if published is not None  # file and link durable
                        else site.store.publishing_upload(upload.path, name)):
                appended = await _record(site, decision.event, actor, name, ours=True)
        except FileExistsError:  # from the link alone: nothing was published
            upload.path.unlink(missing_ok=True)
            if not site.store.left_behind(name, manifest.blake3):
                raise PackageConflict(f"a file named {name!r} is being published; retry") from None
            # These very bytes, left under the name by an earlier upload whose answer was "not
            # known whether recorded" (its file kept) and which the log does not name: this
            # upload records them. (Refused with 409 until the janitor's next full pass, up to
            # 5 minutes, the retry the 503 asks for could not succeed.)
            with site.store.publishing(name):
                appended = await _record(site, decision.event, actor, name, ours=False)
    log.info("upload published", package=name, size=manifest.size, sha1=manifest.sha1)
    site.stats.uploads["published"] += 1
    current = views.package(site.reader, name)
    lost = uploads.lost_race(name, manifest, current)
    if lost is not None:
        raise _refused(lost)
    return 201, Uploaded.of(current, appended)


async def _record(site: GatewayContext, event, actor: str, name: str, ours: bool):
    """Append an upload's event; its file is in place under ``name``. Not recorded: the file
    goes if this upload put it there (``ours``); one it found there stays for the janitor."""
    try:
        return await site.append(event, actor=actor)
    except NotYetApplied as exc:  # recorded: the file stays, as the log says
        raise Unavailable(_not_yet(exc)) from None
    except AppendFailed as exc:
        if ours:
            site.store.remove(name)
        raise Unavailable(f"upload not recorded, try again: {exc}") from None


class PackageController(Controller):
    path = UPLOADS.rstrip("/")
    tags = ["packages"]

    @get("/", operation_id="listPackages", opt={"roles": READ})
    async def list_packages(self, request: Request,
                            stage: str | None = None, q: str | None = None,
                            name: list[str] | None = Parameter(default=None, max_items=MAX_NAMES),
                            sort: Literal[views.PACKAGE_SORTS] = "name", order: Literal["asc", "desc"] = "asc",
                            include: Literal["chunks", ""] | None = None,
                            limit: int = Parameter(default=1000, ge=1, le=10000),
                            offset: int = Parameter(default=0, ge=0, le=MAX_INT64)) -> dict[str, Any]:
        """A page of packages (``limit``/``offset``), filtered by ``stage``, ``q`` (part of a name)
        or exact ``name`` (repeatable, up to 100), ordered by ``sort`` (name, stage, size,
        uploaded_at, updated_at) and ``order`` (asc, desc). ``total`` counts every match. Rows
        carry ``chunk_count``, not the chunk hashes: ``include=chunks`` (or the package route) has them."""
        site: GatewayContext = request.app.state.site
        items = [_with_local_transfer(site, p)
                 for p in views.packages(site.reader, stage=stage, q=q, names=name, sort=sort,
                                         descending=order == "desc", limit=limit, offset=offset,
                                         chunks=include == "chunks")]
        total = len(items) if name is not None else views.package_count(site.reader, stage=stage, q=q)
        # spellings that were two packages before names compared as on a Mac: shown, not merged
        return {"packages": items, "count": len(items), "total": total, "offset": offset,
                "name_collisions": views.name_collisions(site.reader)}

    @get("/{name:str}", operation_id="getPackage", opt={"roles": READ})
    async def get_package(self, request: Request, name: str = PACKAGE_NAME_PARAM) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        name = check_name(_strict(request.scope))
        pkg = views.package(site.reader, name)
        if pkg is None:
            raise PackageNotFound(f"no package named {name!r}")
        return _with_local_transfer(site, pkg)

    @put("/{name:str}", operation_id="uploadPackage", opt={"roles": WRITE, "body": bytes}, status_code=201,
         request_max_body_size=None)  # the cap is max_upload_bytes, enforced in _receive_body
    async def upload(self, request: Request, name: str = PACKAGE_NAME_PARAM, stage: str | None = None,
                     replace: bool = False) -> Response[dict[str, Any]]:
        """Stream the raw request body into the store; the body is never held in memory.
        With ``replace=true`` other content under an existing name replaces it (see
        ``_replace``) instead of being refused."""
        site: GatewayContext = request.app.state.site
        status, answer = await take_upload(site, request.state.actor, _strict(request.scope), stage, replace,
                                           request.headers.get("content-length"), request.receive)
        return Response(answer, status_code=status)

    @patch("/{name:str}", operation_id="updatePackage", opt={"roles": WRITE, "body": PackageUpdate})
    async def update_package(self, request: Request, name: str = PACKAGE_NAME_PARAM) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        name = check_name(_strict(request.scope))
        change = decode_json(await request.body(), PackageUpdate)
        async with _lock_for(name):
            pkg = views.package(site.reader, name)
            if pkg is None:
                raise PackageNotFound(f"no package named {name!r}")
            if change.stage is not None and change.stage != pkg.stage:
                if change.stage not in site.settings.stages:
                    raise StageInvalid(f"unknown stage {change.stage!r}; allowed: "
                                       f"{', '.join(site.settings.stages)}")
                await site.append(ev.PackageStaged(name=pkg.name, stage=change.stage, previous=pkg.stage),
                                  actor=request.state.actor)
        return views.package(site.reader, name)

    @delete("/{name:str}", operation_id="deletePackage", opt={"roles": WRITE}, status_code=200)
    async def delete_package(self, request: Request, name: str = PACKAGE_NAME_PARAM) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        name = check_name(_strict(request.scope))
        async with _lock_for(name):
            pkg = views.package(site.reader, name)
            if pkg is None:
                raise PackageNotFound(f"no package named {name!r}")
            await site.append(ev.PackageDeleted(name=pkg.name, blake3=pkg.blake3), actor=request.state.actor)
            site.store.remove(name)
        log.info("package deleted", package=pkg.name)
        return {"deleted": pkg.name, "blake3": pkg.blake3}



def error_answer(exc: Exception) -> tuple[int, dict[str, str], dict[str, str]]:
    """Status, body and headers of the API's answer to an error, in the one shape every error
    has (``{"error": code, "detail": text}``): a named error (OdstError) as it says, a refused
    append as 503, anything else as 500 (its details go to the log, never to the client)."""
    if isinstance(exc, OdstError):
        retry = getattr(exc, "retry_after", None)
        return exc.status, {"error": exc.code, "detail": exc.detail}, {"Retry-After": str(retry)} if retry else {}
    if isinstance(exc, AppendFailed):
        return 503, {"error": "unavailable", "detail": f"change not recorded, try again: {exc}"}, {}
    return 500, {"error": "internal_error", "detail": "internal error; the server log has the details"}, {}


class Uploads:
    """``PUT /api/v1/packages/{name}`` with an API token, answered in front of Litestar (as
    ``downloads.Downloads`` answers the distribution point): the same ``take_upload``, the same
    token check and role (``auth.bearer``, ``auth.allowed``), the same error answers
    (``error_answer``), without the framework's routing, guard, parameter parsing and response
    building (about half the CPU of an 8 KiB upload). An upload this door cannot answer exactly
    as the route would (``_takes``) goes on to Litestar, which calls ``take_upload`` too."""

    def __init__(self, site: GatewayContext) -> None:
        self.site = site
        self._version = None  # the read model's data_version the principals were read at
        self._principals: dict[str, Principal] = {}  # by Authorization header

    def _principal(self, authorization: str) -> Principal:
        """``auth.bearer``, remembered while the read model is unchanged: PRAGMA data_version
        moves with every fold, so a revoked token is refused from the fold that revokes it on,
        exactly as a fresh lookup would (uploads side by side share one lookup per fold)."""
        version = self.site.reader.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._principals.clear()
            self._version = version
        principal = self._principals.get(authorization)
        if principal is None:
            principal = bearer(self.site, authorization)  # Unauthorized: not remembered
            if len(self._principals) >= MAX_PRINCIPALS:
                self._principals.clear()
            self._principals[authorization] = principal
        return principal

    def front(self, app):
        """An ASGI app taking token uploads here and everything else to ``app``."""
        async def front(scope, receive, send) -> None:
            if scope["type"] == "http" and scope["method"] == "PUT" and scope["path"].startswith(UPLOADS):
                taken = _takes(scope)
                if taken is not None:
                    return await self.serve(scope, receive, send, *taken)
            await app(scope, receive, send)
        return front

    async def serve(self, scope, receive, send, authorization: str, stage: str | None, replace: bool,
                    announced: str | None) -> None:
        site = self.site
        headers: dict[str, str] = {}
        try:
            principal = allowed(self._principal(authorization), WRITE)
            status, answer = await take_upload(site, principal.actor, _strict(scope), stage, replace,
                                               announced, receive)
        except (OdstError, AppendFailed) as exc:
            if isinstance(exc, AppendFailed):
                log.error("event append failed", error=str(exc), path=scope["path"])
            status, answer, headers = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - as Litestar's handler of last resort (app._internal)
            log.exception("unhandled error", path=scope["path"])
            status, answer, headers = error_answer(exc)
        body = _JSON.encode(answer)
        await send({"type": "http.response.start", "status": status, BODY_FOLLOWS: True, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("latin-1")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": body})


_JSON = msgspec.json.Encoder()
MAX_PRINCIPALS = 64  # tokens remembered between two folds
_TAKES_ONCE = {b"stage", b"replace"}


def _takes(scope) -> tuple[str, str | None, bool, str | None] | None:
    """(Authorization, stage, replace, Content-Length) of an upload ``Uploads`` answers as the
    route would, else None (Litestar's turn): only a bearer token (a session's cookie and CSRF
    check stay with the guard), a name Litestar's path rules would not look at twice (one
    segment, at most PACKAGE_NAME_MAX characters), and a query of at most one ``stage`` (plain
    ASCII, not blank) and one ``replace=true|false`` (no escapes, no other parameter)."""
    name = scope["path"][len(UPLOADS):]
    if not name or "/" in name or len(name) > PACKAGE_NAME_MAX:
        return None
    stage, replace = None, False
    query = scope.get("query_string", b"")
    if query:
        if b"%" in query or b"+" in query or not query.isascii():
            return None
        seen = set()
        for pair in query.split(b"&"):
            key, eq, value = pair.partition(b"=")
            if not eq or not value or key in seen or key not in _TAKES_ONCE:
                return None
            seen.add(key)
            if key == b"stage":
                stage = value.decode("ascii")
            elif value in (b"true", b"false"):
                replace = value == b"true"
            else:
                return None
    authorization = announced = None
    for key, value in scope["headers"]:
        if key == b"authorization":
            if authorization is not None:
                return None
            authorization = value.decode("latin-1")
        elif key == b"content-length":
            if announced is not None:
                return None
            announced = value.decode("latin-1")
    if authorization is None:
        return None
    return authorization, stage, replace, announced
