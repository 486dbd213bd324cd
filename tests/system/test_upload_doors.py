"""Token uploads are answered in front of Litestar (``gateway.packages.Uploads``); every other
upload still takes the Litestar route. Both call one ``take_upload``, so the same request must
get the same answer by either door: each request here is sent as it is (the front door) and
again with a query parameter the front door leaves to Litestar and Litestar ignores."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.timeout(120)

VIA_LITESTAR = {"door": "litestar"}  # not one of stage/replace: Uploads._takes passes it on


def both(site, name: str, body: bytes, token: str = ADMIN_TOKEN, **params) -> tuple[httpx.Response, httpx.Response]:
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        front = c.put(f"/api/v1/packages/{name}", content=body, params=params)
        litestar = c.put(f"/api/v1/packages/{name}", content=body, params={**params, **VIA_LITESTAR})
    return front, litestar


def same_refusal(pair: tuple[httpx.Response, httpx.Response], status: int, code: str) -> str:
    front, litestar = pair
    assert (front.status_code, front.json()) == (litestar.status_code, litestar.json()), (front.text, litestar.text)
    assert front.headers["content-type"] == litestar.headers["content-type"] == "application/json"
    assert front.status_code == status and front.json()["error"] == code, front.text
    return front.json()["detail"]


def test_front_door_and_litestar_route_answer_alike(site):
    with site.client() as admin:
        auditor = admin.post("/api/v1/tokens", json={"name": "reader", "role": "auditor"}).json()["token"]
    same_refusal(both(site, "a.pkg", b"x", token="not-a-token"), 401, "unauthorized")
    assert "auditor" in same_refusal(both(site, "a.pkg", b"x", token=auditor), 403, "forbidden")
    assert "'.'" in same_refusal(both(site, ".hidden.pkg", b"x"), 400, "package_name_invalid")
    same_refusal(both(site, "notes.txt", b"x"), 415, "extension_not_allowed")
    assert "'nope'" in same_refusal(both(site, "a.pkg", b"x", stage="nope"), 400, "stage_invalid")

    # new packages: one by each door, the same answer but for what names this upload
    front = httpx.put(f"{site.url}/api/v1/packages/front.pkg", content=b"one" * 1000, params={"stage": "test"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    litestar = httpx.put(f"{site.url}/api/v1/packages/litestar.pkg", content=b"one" * 1000,
                         params={"stage": "test", **VIA_LITESTAR}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert front.status_code == litestar.status_code == 201, (front.text, litestar.text)
    f, s = front.json(), litestar.json()
    assert f.keys() == s.keys() and f["event_id"] != s["event_id"]
    assert (f["stage"], f["size"], f["sha512"]) == (s["stage"], s["size"], s["sha512"]) == (
        "test", 3000, hashlib.sha512(b"one" * 1000).hexdigest())

    # the same bytes again: 200 and the package; other bytes: 409 naming it
    again = both(site, "front.pkg", b"one" * 1000)
    assert [r.status_code for r in again] == [200, 200] and again[0].json() == again[1].json()
    assert again[0].json()["name"] == "front.pkg"
    assert "front.pkg" in same_refusal(both(site, "front.pkg", b"two"), 409, "package_conflict")

    # replace=true by each door; the last one wins, and the log says so
    first, second = both(site, "front.pkg", b"three", replace="true")
    assert first.status_code == 201 and second.status_code == 200, (first.text, second.text)
    assert httpx.get(f"{site.url}/CasperShare/Packages/front.pkg").content == b"three"

    # a repeated parameter is the route's 400 (Uploads leaves it to Litestar's before_request)
    r = httpx.put(f"{site.url}/api/v1/packages/dup.pkg?stage=dev&stage=prod", content=b"x",
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 400 and "'stage'" in r.json()["detail"], r.text


def test_a_revoked_token_uploads_no_more_by_the_front_door(site):
    """The front door remembers a token between folds: revoking it (a fold) must end that."""
    with site.client() as admin:
        made = admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).json()
        ci = {"Authorization": f"Bearer {made['token']}"}
        for i in range(3):  # looked up once, then remembered until the next fold
            r = httpx.put(f"{site.url}/api/v1/packages/ci-{i}.pkg", content=b"%d" % i, headers=ci)
            assert r.status_code == 201, r.text
        assert admin.delete(f"/api/v1/tokens/{made['token_id']}").status_code == 200
    r = httpx.put(f"{site.url}/api/v1/packages/ci-late.pkg", content=b"late", headers=ci)
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), r.text
    with site.client() as admin:
        assert admin.get("/api/v1/packages/ci-late.pkg").status_code == 404
