"""Settings come from flags, then ODST_* environment, then TOML, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from odst.config import ConfigError, load


def test_precedence_flags_env_toml_default(tmp_path):
    (tmp_path / "odst.toml").write_text('http = "127.0.0.1:1111"\ncontext = "FromToml"\n'
                                        'max_upload_bytes = 5\nstages = ["a", "b"]\ndefault_stage = "a"\n')
    s = load({"data": str(tmp_path), "http": "127.0.0.1:3333"},
             env={"ODST_HTTP": "127.0.0.1:2222", "ODST_CONTEXT": "FromEnv"})
    assert s.http == "127.0.0.1:3333"          # flag beats env and file
    assert s.context == "FromEnv"               # env beats file
    assert s.max_upload_bytes == 5              # file beats default
    assert s.stages == ["a", "b"]
    assert s.download_auth == "none"            # default
    assert s.store_dir == Path(tmp_path) / "store"


def test_env_lists_and_numbers(tmp_path):
    s = load({"data": str(tmp_path)}, env={"ODST_ALLOWED_EXTENSIONS": "pkg, .DMG",
                                           "ODST_MAX_UPLOAD_BYTES": "42"})
    assert s.allowed_extensions == [".pkg", ".dmg"]
    assert s.max_upload_bytes == 42


@pytest.mark.parametrize("env,needle", [
    ({"ODST_HTTP": "nonsense"}, "HOST:PORT"),
    ({"ODST_MAX_UPLOAD_BYTES": "lots"}, "whole number"),
    ({"ODST_DOWNLOAD_AUTH": "basic"}, "download_user"),
    ({"ODST_DOWNLOAD_AUTH": "kerberos"}, "download_auth"),
    ({"ODST_DEFAULT_STAGE": "nope"}, "default_stage"),
    ({"ODST_CONTEXT": "a/b"}, "context"),
])
def test_bad_settings_say_what_is_wrong(tmp_path, env, needle):
    with pytest.raises(ConfigError, match=needle):
        load({"data": str(tmp_path)}, env=env)


def test_unknown_or_broken_toml(tmp_path):
    (tmp_path / "odst.toml").write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load({"data": str(tmp_path)}, env={})
    (tmp_path / "odst.toml").write_text("http = \n")
    with pytest.raises(ConfigError):
        load({"data": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load({"data": str(tmp_path)}, env={}, config_file=tmp_path / "missing.toml")


def test_settings_pass_through_the_environment_unchanged(tmp_path):
    """`odst serve`'s extra gateway processes get the parent's settings as ODST_* variables:
    flags such as --site-name and --context must survive the trip."""
    from odst.config import settings_env
    chosen = load(flags={"data": str(tmp_path), "site_name": "Paris", "context": "dp", "http": "127.0.0.1:9443",
                         "leaf_remotes": ["nats-leaf://127.0.0.1:1", "nats-leaf://127.0.0.1:2"],
                         "metrics_public": True, "replication_streams": 3}, env={})
    assert load(env=settings_env(chosen)) == chosen
