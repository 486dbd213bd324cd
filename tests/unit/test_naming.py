"""Package names are untrusted input."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from odst.errors import ExtensionNotAllowed, PackageNameInvalid
from odst.naming import check_name

EXT = [".pkg", ".dmg", ".zip", ".mpkg"]


@pytest.mark.parametrize("name", [
    "", "a/b.pkg", "a\\b.pkg", "../x.pkg", "x..pkg", "..", ".hidden.pkg", "a\x00b.pkg",
    "a\x01.pkg", "a\x7f.pkg", "a\n.pkg", "a\u200b.pkg", " a.pkg", "a.pkg ", "x" * 252 + ".pkg",
    "é" * 126 + ".pkg",
])
def test_bad_names_are_refused(name):
    with pytest.raises(PackageNameInvalid):
        check_name(name, EXT)


@pytest.mark.parametrize("name", ["a.exe", "a.sh", "pkg", ".pkg", "a.pkg.exe"])
def test_disallowed_extensions(name):
    with pytest.raises((ExtensionNotAllowed, PackageNameInvalid)):
        check_name(name, EXT)


@pytest.mark.parametrize("name", ["Firefox 120.0.pkg", "GoogleChrome.DMG", "Office_16.80 (x).mpkg",
                                  "Zoom-é.zip", "x" * 251 + ".pkg"])
def test_good_names_pass(name):
    assert check_name(name, EXT) == name


@given(st.text(min_size=1, max_size=300))
def test_anything_either_passes_safely_or_is_refused_by_name(name):
    try:
        checked = check_name(name + ".pkg", EXT)
    except (PackageNameInvalid, ExtensionNotAllowed):
        return
    assert "/" not in checked and "\\" not in checked and ".." not in checked
    assert "\x00" not in checked and len(checked.encode()) <= 255
