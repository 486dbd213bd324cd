"""`odst packages` lists every package of a site, a page of the API at a time, or the first
--limit of them with a line saying how many there are (issue 12: it showed the first 1,000).
The page is made small (the hidden --page-size) rather than uploading thousands."""

from __future__ import annotations

import json

from tests.conftest import ADMIN_TOKEN, run_odst

NAMES = [f"Tool {i}.pkg" for i in range(7)]


def test_the_package_list_pages_through_the_api(make_site):
    site = make_site().start()
    with site.client() as http:
        for i, name in enumerate(NAMES):
            assert http.put(f"/api/v1/packages/{name}", content=f"package {i}".encode()).status_code == 201
    flags = ["--server", site.url, "--token", ADMIN_TOKEN, "--page-size", "3"]

    r = run_odst("packages", *flags)
    assert r.returncode == 0, r.stderr
    header, *rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert header[0] == "NAME" and [row[0] for row in rows] == NAMES, "every page, in name order, once"
    assert "showing" not in r.stderr

    r = run_odst("packages", *flags, "--json")
    out = json.loads(r.stdout)
    assert [p["name"] for p in out["packages"]] == NAMES and out["count"] == out["total"] == len(NAMES)

    r = run_odst("packages", *flags, "--limit", "4")
    assert r.returncode == 0, r.stderr
    assert [line.split("\t")[0] for line in r.stdout.splitlines()[1:]] == NAMES[:4]
    assert r.stderr.strip() == f"showing 4 of {len(NAMES)} packages"

    r = run_odst("packages", *flags, "--limit", "0")
    assert r.returncode == 2 and "1 or more" in r.stderr
