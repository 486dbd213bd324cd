"""The CLI's HTTP client for a running site: token handling, errors, streamed upload."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx


PAGE_SIZE = 1000  # packages a list request asks for (the API's default page)


class ClientError(Exception):
    """The server refused or could not be reached; the message is for the user."""


def _token(token: str | None) -> str:
    token = token or os.environ.get("ODST_TOKEN", "")
    if not token:
        raise ClientError("no token: pass --token or set ODST_TOKEN")
    return token


class Client:
    def __init__(self, server: str, token: str | None):
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server,
                                 headers={"Authorization": f"Bearer {_token(token)}"},
                                 timeout=httpx.Timeout(30.0, read=600.0))

    def _check(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("detail") or body
            except ValueError:
                msg = r.text.strip()
            raise ClientError(f"{r.status_code}: {msg}")
        return r.json()

    def request(self, method: str, path: str, **kw) -> dict:
        try:
            return self._check(self.http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach {self.server}: {exc}") from None

    def packages(self, *, limit: int | None = None, page_size: int = PAGE_SIZE) -> tuple[list[dict], int]:
        """Every package (or the first ``limit``) in name order, a page of ``page_size`` at a time,
        and how many the site has (``total``). A package added or removed while paging may shift
        the pages: one seen twice is kept once."""
        found: dict[str, dict] = {}
        total, offset = 0, 0
        while limit is None or len(found) < limit:
            size = page_size if limit is None else min(page_size, limit - len(found))
            page = self.request("GET", "/api/v1/packages", params={"limit": size, "offset": offset})
            total = page["total"]
            for p in page["packages"]:
                found.setdefault(p["name"], p)
            offset += len(page["packages"])
            if not page["packages"] or offset >= total:
                break
        return list(found.values())[:limit], total

    def upload(self, path: Path, name: str, stage: str | None, progress: bool = True,
               replace: bool = False) -> tuple[dict, bool]:
        """Stream the file up; the package as the site records it, and whether the content was new
        (201) or the same bytes were already there under this name (200)."""
        size = path.stat().st_size
        started = time.monotonic()
        sent = 0

        def body():
            nonlocal sent
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    sent += len(block)
                    if progress:
                        _bar(sent, size, started)
                    yield block
            if progress:
                sys.stderr.write("\n")

        params = {"stage": stage} if stage else {}
        if replace:
            params["replace"] = "true"
        try:
            r = self.http.put(f"/api/v1/packages/{quote(name, safe='')}", content=body(),
                              params=params, headers={"Content-Length": str(size),
                                                      "Content-Type": "application/octet-stream"})
        except httpx.TransportError as exc:
            raise ClientError(f"upload failed after {sent} of {size} bytes: {exc}") from None
        return self._check(r), r.status_code == 201


def _bar(done: int, total: int, started: float) -> None:
    width = 30
    frac = done / total if total else 1.0
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done / elapsed / 1e6
    filled = int(frac * width)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
                     f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB {rate:,.1f} MB/s")
    sys.stderr.flush()
