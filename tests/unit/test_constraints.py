"""Each regex of odst.gateway.constraints against the named check it documents: a name the
pattern admits passes the check and one the check refuses breaks the pattern (hypothesis)."""

from __future__ import annotations

import re
import string
import unicodedata

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from odst.errors import OdstError
from odst.gateway import constraints as c
from odst.gateway.bodies import decode_json
from odst.gateway.credentials import CredentialCreate, CredentialNameInvalid
from odst.gateway.notifications import EMAIL
from odst.gateway.peers import InviteCreate
from odst.gateway.settings import check_site_name
from odst.naming import check_name

# Text that reaches the edges: dots, slashes, white space, control and format characters.
EDGES = st.text(st.one_of(st.sampled_from("..//\\ \t\u00a0\u3000\x00\x1f\x7f\x85\u00ad\u200b\u2028\ufeff"
                                          "\U000e0001\U0001d173@<>,;"),
                          st.characters(codec="utf-8"), st.sampled_from(string.ascii_letters)), max_size=12)


def _passes(check, value) -> bool:
    try:
        check(value)
        return True
    except OdstError:
        return False


@settings(max_examples=400)
@given(EDGES)
@example(".pkg")
@example("a..b")
@example(" a")
@example("a\u3000")
def test_the_package_name_pattern_is_check_name(name):
    assert bool(re.search(c.PACKAGE_NAME, name)) == _passes(check_name, name)


@settings(max_examples=300)
@given(EDGES.map(lambda s: s + ".PKG"), )
@example("x.pkg")
@example(".pkg")
def test_the_upload_pattern_is_check_name_with_extensions(name):
    extensions = [".pkg", ".dmg"]
    assert bool(re.search(c.package_name_with_extension(extensions), name)) == \
        _passes(lambda n: check_name(n, extensions), name)


@settings(max_examples=300)
@given(EDGES)
@example("   ")
@example(" Paris ")
def test_the_site_name_pattern_is_check_site_name(name):
    # the body is checked as sent: a control character the check would trim away is refused too
    untrimmed = not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name)
    assert bool(re.search(c.SITE_NAME, name)) == (_passes(check_site_name, name) and untrimmed)


@settings(max_examples=300)
@given(EDGES)
@example(" admin@example.com ")
def test_the_email_pattern_is_the_recipient_check(recipient):
    assert bool(re.search(c.EMAIL_ADDRESS, recipient)) == bool(EMAIL.match(recipient.strip()))


@settings(max_examples=200)
@given(EDGES)
def test_not_blank_is_what_strip_leaves(text):
    assert bool(re.search(c.NOT_BLANK, text)) == bool(text.strip())


def test_the_planes_left_unscanned_hold_no_control_or_format_character():
    categories = ("Cc", "Cf", "Zl", "Zp")
    assert c.char_class(categories, [range(0x110000)]) == c.char_class(categories)


def test_a_refused_field_keeps_its_named_error_and_says_the_rule_in_words():
    with pytest.raises(CredentialNameInvalid, match="ASCII letters, digits") as refused:
        decode_json(b'{"name": "odst.*.ev.>"}', CredentialCreate)
    assert c.PACKAGE_NAME not in refused.value.detail and "regex" not in refused.value.detail


def test_an_integer_written_with_a_zero_fraction_is_an_integer():
    assert decode_json(b'{"ttl_s": 3600.0}', InviteCreate).ttl_s == 3600
    for body in (b'{"ttl_s": 3600.5}', b'{"ttl_s": "3600"}', b'{"ttl_s": 59.0}', b"\x00", b"{"):
        with pytest.raises(OdstError):
            decode_json(body, InviteCreate)


def test_the_document_gets_the_patterns_an_ecma_engine_reads():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    for pattern in (c.PACKAGE_NAME, c.SITE_NAME, c.NOT_BLANK, c.DISPLAY_NAME, c.EMAIL_ADDRESS,
                    c.package_name_with_extension([".pkg", ".mpkg"])):
        jsonschema_rs.meta.validate({"type": "string", "pattern": pattern})  # "format": "regex" is ECMA 262
    assert msgspec.json.schema(CredentialCreate)
