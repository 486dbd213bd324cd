"""The one hash-chain rule (odst.events.chain) that the projector, the log's head and recovery share."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.chain import Link, link


def envelope(seq: int, prev: str, event=None) -> codec.Envelope:
    return codec.Envelope(id=codec.new_event_id(), origin="ssite", seq=seq, prev=prev, ts=1, actor="t",
                          event=event or ev.TokenRevoked(token_id="x"))


def test_a_chain_grows_only_by_its_next_event():
    founded = envelope(1, codec.GENESIS, ev.SiteFounded(site="ssite", public_key="00"))
    assert link(founded, 0, codec.GENESIS) is Link.NEXT
    assert link(envelope(1, codec.GENESIS), 0, codec.GENESIS) is Link.NOT_FOUNDED
    assert link(envelope(2, "h1"), 1, "h1") is Link.NEXT
    assert link(envelope(2, "other"), 1, "h1") is Link.FORK
    assert link(envelope(4, "h1"), 1, "h1") is Link.GAP
    assert link(envelope(1, codec.GENESIS), 1, "h1") is Link.REPLAY


@given(st.integers(1, 10_000), st.integers(0, 10_000), st.booleans())
def test_exactly_one_verdict_and_next_only_for_seq_plus_one_with_the_head(seq, last, right_prev):
    head = "h" * 64
    env = envelope(seq, head if right_prev else "x" * 64,
                   ev.SiteFounded(site="ssite", public_key="00") if seq == 1 else None)
    verdict = link(env, last, head)
    assert (verdict is Link.NEXT) == (seq == last + 1 and right_prev)
    assert (verdict is Link.REPLAY) == (seq <= last)
    assert (verdict is Link.GAP) == (seq > last + 1)
