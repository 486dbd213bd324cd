"""Whether an upload may be published, as pure decisions over what the read model holds.

The gateway streams the body and maps each decision to HTTP; the rules live here, beside
the events they produce, where they can be tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from odst.events import catalogue as ev
from odst.store.hashing import Manifest

if TYPE_CHECKING:  # the read side's answer these rules are given
    from odst.projections.views import Package


@dataclass(frozen=True)
class TooLarge:
    detail: str


@dataclass(frozen=True)
class NoSpace:
    detail: str


@dataclass(frozen=True)
class Conflict:
    detail: str


@dataclass(frozen=True)
class Identical:
    """The same content is already published here under this name: nothing to record."""

    existing: Package


@dataclass(frozen=True)
class Uploaded:
    """Publish the file and record this event."""

    event: ev.PackageUploaded


@dataclass(frozen=True)
class Replaced:
    """Swap the file in (the old one is served until then) and record this event."""

    event: ev.PackageReplaced


def spelled_otherwise(name: str, existing: Package | None) -> Conflict | None:
    """A package already stands for this name under another spelling (odst.naming.name_key:
    case and Unicode normalisation do not count, as on a Mac): refuse, naming that spelling."""
    if existing is None or existing.name == name:
        return None
    return Conflict(f"a package named {existing.name!r} exists, and {name!r} is the same name on a Mac "
                    "(case and Unicode normalisation do not count); use that spelling, or delete that package first")


def admit_upload(name: str, length: int | None, existing: Package | None, *, max_bytes: int,
                 free_bytes: int, reserve_bytes: int, replace: bool = False) -> TooLarge | NoSpace | Conflict | None:
    """Before the body arrives: refuse what cannot end well (None: receive it). A replacement
    may have any size."""
    if (other := spelled_otherwise(name, existing)) is not None:
        return other
    if length is None:
        return NoSpace("the store is full") if free_bytes <= reserve_bytes else None
    if length > max_bytes:
        return TooLarge(f"{length} bytes exceeds max_upload_bytes ({max_bytes})")
    if length + reserve_bytes > free_bytes:
        return NoSpace(f"not enough free space in the store for {length} bytes")
    if existing and existing.size != length and not replace:
        return Conflict(f"a different package named {name!r} exists ({existing.size} bytes, "
                        f"sha1 {existing.sha1}); delete it first or choose another name")
    return None


def accept_upload(name: str, stage: str, manifest: Manifest, existing: Package | None,
                  site: str) -> Uploaded | Identical | Conflict:
    """Once the body is verified: publish it, report it already here, or refuse it."""
    if (other := spelled_otherwise(name, existing)) is not None:
        return other
    if existing is not None:
        held_here = getattr(existing.availability.get(site), "status", None) == "available"
        if held_here and existing.blake3 == manifest.blake3:
            return Identical(existing)
        if existing.blake3 != manifest.blake3 or held_here:
            return Conflict(f"a different package named {name!r} exists (sha1 {existing.sha1}, "
                            f"yours {manifest.sha1}); delete it first or choose another name")
    return Uploaded(_uploaded(name, stage, manifest))


def accept_replace(name: str, stage: str | None, default_stage: str, manifest: Manifest,
                   existing: Package | None, served_here: str | None) -> Uploaded | Replaced | Identical | Conflict:
    """Once the body is verified, with ``?replace=true``: the content this site serves under
    ``name`` is ``served_here``. A new name is an upload; the current content, already served
    here, is nothing to do; the current content not served here yet is an upload of it here
    (the file is swapped in at once); other content replaces the current one, one generation
    up, in the current stage unless ``stage`` says otherwise. Another spelling of the name is
    refused as for an upload: a package keeps its spelling across generations."""
    if (other := spelled_otherwise(name, existing)) is not None:
        return other
    if existing is None:
        return Uploaded(_uploaded(name, stage or default_stage, manifest))
    if existing.blake3 == manifest.blake3:
        if served_here == manifest.blake3:
            return Identical(existing)
        return Uploaded(_uploaded(name, stage or existing.stage, manifest))
    return Replaced(ev.PackageReplaced(name=name, **manifest.event_fields(),
                                       stage=stage or existing.stage, replaces=existing.blake3,
                                       generation=existing.generation + 1))


def _uploaded(name: str, stage: str, manifest: Manifest) -> ev.PackageUploaded:
    return ev.PackageUploaded(name=name, **manifest.event_fields(), stage=stage)


def lost_race(name: str, manifest: Manifest, current: Package | None) -> Conflict | None:
    """After recording: another site's upload of the same name, with other content, won."""
    if current is not None and current.blake3 == manifest.blake3:
        return None
    winner = f" at site {current.origin}" if current else ""
    return Conflict(f"{name!r} was uploaded with other content{winner} at the same time, and earlier: that "
                    "upload wins at every site and replaces yours here (see 'conflicts' in /api/v1/state)")
