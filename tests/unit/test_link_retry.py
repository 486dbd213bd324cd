"""link_peers' retry while a known peer is not mirrored yet (odst.site.link_retry): steady for
the first seconds, when a new peer's leaf link comes up, then doubling up to LINK_EVERY_S."""

from __future__ import annotations

from odst.site import LINK_EVERY_S, LINK_RETRY_S, LINK_STEADY_S, link_retry


def test_a_new_peer_is_looked_for_steadily_then_less_and_less_often():
    waits, waited, backoff = [], 0.0, None
    while waited < LINK_STEADY_S + 60:
        backoff = link_retry(backoff, waited)
        waits.append((waited, backoff))
        waited += backoff
    steady = [w for at, w in waits if at < LINK_STEADY_S]
    later = [w for at, w in waits if at >= LINK_STEADY_S]
    # the pass that finds the leaf link up comes at most LINK_RETRY_S after it (doubling from the
    # start, the fifth pass came 4 s after the fourth)
    assert steady and set(steady) == {LINK_RETRY_S}
    assert later[:5] == [LINK_RETRY_S * 2, LINK_RETRY_S * 4, LINK_RETRY_S * 8, LINK_RETRY_S * 16, LINK_EVERY_S]
    assert set(later[4:]) == {LINK_EVERY_S}


def test_the_first_wait_is_the_shortest_whenever_it_starts():
    assert link_retry(None, 0.0) == LINK_RETRY_S
    assert link_retry(None, LINK_STEADY_S * 10) == LINK_RETRY_S
