"""The lean console renderer (odst.logs) against structlog's own ConsoleRenderer: same text."""

from __future__ import annotations

import structlog
from hypothesis import given
from hypothesis import strategies as st

from odst.logs import LeanConsoleRenderer

values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=3), st.sampled_from(["a b", "k=v", "it's", 'say "x"', "", "\t"]))
fields = st.dictionaries(st.text(min_size=1).filter(lambda k: k not in LeanConsoleRenderer._RARE), values,
                         max_size=6)


@given(fields=fields, timestamp=st.one_of(st.none(), st.text()), event=st.one_of(st.none(), st.text(), st.integers()),
       level=st.one_of(st.none(), st.sampled_from(["debug", "info", "warning", "error", "critical", "exception"])))
def test_the_lean_line_is_consolerenderers_line(fields, timestamp, event, level):
    d = dict(fields)
    for key, value in (("timestamp", timestamp), ("event", event), ("level", level)):
        if value is not None:
            d[key] = value
    assert LeanConsoleRenderer()(None, "info", dict(d)) == structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(d))


def test_a_traceback_is_left_to_consolerenderer():
    # format_exc_info (odst.logs.configure) has made the exception text before the renderer
    d = {"event": "failed", "level": "error", "timestamp": "T", "package": "a b.pkg",
         "exception": "Traceback (most recent call last):\nValueError: boom"}
    line = LeanConsoleRenderer()(None, "error", dict(d))
    assert line == structlog.dev.ConsoleRenderer(colors=False)(None, "error", dict(d))
    assert line.endswith("\nTraceback (most recent call last):\nValueError: boom")
