"""Which uploads the front door (``gateway.packages.Uploads``) answers and which it leaves to the
Litestar route: only those whose answer cannot depend on what the framework parses."""

from __future__ import annotations

import pytest

from odst.gateway.packages import _takes

TOKEN = (b"authorization", b"Bearer t0k")


def scope(path: str = "/api/v1/packages/a.pkg", query: bytes = b"", headers=(TOKEN, (b"content-length", b"5"))):
    return {"type": "http", "method": "PUT", "path": path, "query_string": query, "headers": list(headers)}


def test_a_token_upload_is_taken_with_what_the_route_would_read():
    assert _takes(scope()) == ("Bearer t0k", None, False, "5")
    assert _takes(scope(query=b"stage=test&replace=true")) == ("Bearer t0k", "test", True, "5")
    assert _takes(scope(query=b"replace=false", headers=[TOKEN])) == ("Bearer t0k", None, False, None)
    assert _takes(scope("/api/v1/packages/Café Ünïcode.pkg")) is not None


@pytest.mark.parametrize("case", [
    scope(headers=[(b"cookie", b"odst_session=s"), (b"x-csrf-token", b"c")]),  # a session: the guard's CSRF check
    scope(headers=[TOKEN, TOKEN]),
    scope(headers=[TOKEN, (b"content-length", b"1"), (b"content-length", b"1")]),
    scope("/api/v1/packages/"), scope("/api/v1/packages/a/b.pkg"), scope("/api/v1/packages/" + "a" * 300),
    scope(query=b"stage=test&stage=dev"), scope(query=b"stage="), scope(query=b"stage"),
    scope(query=b"stage=t%65st"), scope(query=b"stage=a+b"), scope(query="stage=é".encode()),
    scope(query=b"replace=1"), scope(query=b"replace=yes"), scope(query=b"other=1"),
], ids=["session", "two-tokens", "two-lengths", "no-name", "slash", "long-name", "repeated", "blank", "no-value",
        "escaped", "plus", "non-ascii", "replace-1", "replace-yes", "unknown-param"])
def test_anything_the_framework_would_parse_goes_to_the_route(case):
    assert _takes(case) is None
