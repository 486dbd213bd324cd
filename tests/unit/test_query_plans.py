"""Lookups made once per package while a site catches up must not scan a table: a scan there
costs O(N) per package and O(N^2) for the catch-up (a peer's batch request looked each content
up by its hash with a full scan of ``contents``). Checked on the real schema's query plans."""

from __future__ import annotations

import re

from odst.projections.db import open_read_model


def plan(conn, sql: str, args: tuple) -> list[str]:
    return [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]


def test_a_content_found_by_its_hash_alone_is_found_by_an_index(tmp_path):
    conn = open_read_model(tmp_path / "read.db")
    for sql, args in (
            ("SELECT c.name, c.size, c.chunk_size FROM live_contents c JOIN serving s"
             " ON s.key=c.key AND s.blake3=c.blake3 AND s.site=? WHERE c.blake3=? LIMIT 1", ("site", "b" * 64)),
            ("SELECT 1 FROM live_contents WHERE blake3=? LIMIT 1", ("b" * 64,))):
        steps = plan(conn, sql, args)
        assert not [s for s in steps if re.match(r"SCAN (c|contents)\b", s)], steps
        assert any("contents_blake3" in s for s in steps), steps


def test_the_lookups_are_the_ones_views_makes():
    """The SQL above is views.local_content's and views.content_is_live's (kept in step)."""
    import inspect
    from odst.projections import views
    assert "WHERE c.blake3=? LIMIT 1" in inspect.getsource(views.local_content)
    assert "FROM live_contents WHERE blake3=? LIMIT 1" in inspect.getsource(views.content_is_live)
