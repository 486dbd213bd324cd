"""The few OS-specific calls have portable answers (macOS has no /proc)."""

from __future__ import annotations

import os
import subprocess
import sys

from harness.wait import wait_until
from odst.bus.embedded import _alive, _command_of


def test_a_process_command_line_and_liveness_are_read_for_a_live_and_a_gone_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        # right after exec the kernel may still show an empty command line: poll, do not sleep
        wait_until(lambda: b"sys.stdin.read()" in (_command_of(child.pid) or b""), 10, what="the child's cmdline")
        assert _alive(child.pid)
    finally:
        child.communicate(b"")
    assert not _alive(child.pid)
    assert _command_of(child.pid) is None
    assert _alive(os.getpid())


def test_the_launchd_plist_is_a_valid_plist_whose_command_parses_with_the_cli():
    import plistlib
    from pathlib import Path

    from odst.cli import build_parser

    plist = plistlib.loads((Path(__file__).resolve().parents[2] / "deploy" / "macos" / "org.odst.serve.plist").read_bytes())
    argv = plist["ProgramArguments"]
    assert Path(argv[0]).name == "odst" and plist["UserName"] != "root"
    args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown flag
    assert args.command == "serve"
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"]["ODST_LOG_FORMAT"] == "json"
