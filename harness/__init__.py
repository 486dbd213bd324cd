"""Process harness: real ``odst serve`` processes on 127.0.0.1 for tests, scenarios and benches.

It lives in the checkout, not in the ``odst`` wheel (pyproject packages only ``odst*``):

* :mod:`harness.ports`   one free-port allocator (safe under pytest-xdist);
* :mod:`harness.wait`    one ``wait_until``: poll a condition with a deadline, never sleep blindly;
* :mod:`harness.site`    one ``SiteProcess``: start, health-check, stop or kill one ``odst serve``;
* :mod:`harness.network` one ``Network``: sites linked, registered and checked, telling a story;
* :mod:`harness.runner`  the scenario runner behind ``odst scenario run|list``.
"""
