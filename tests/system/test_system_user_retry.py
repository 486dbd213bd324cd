"""The system user's pass (odst.bus.system.LinkCutter) right after the users' reload: a real
nats-server that is not there yet when the pass starts."""

from __future__ import annotations

import asyncio
import subprocess

from odst.bus.embedded import nats_server_binary
from odst.bus.identity import new_user_seed, public_key_of_seed, write_secret
from odst.bus.system import LinkCutter, render_system_account
from tests.conftest import free_port


def test_a_pass_refused_for_a_moment_is_made_again_at_once(tmp_path):
    """The users' reload (SIGHUP) and the cutter's pass start together, and nats-server refused
    the system user now and then while its reload ran ("Authorization Violation", seen in the
    replication bench after a registration): the pass was put off to the next link pass, with
    an ERROR and nats-py's traceback. Now it is made again at once, a few times. Here the
    server is not even listening when the pass starts; it comes up 0.3 s later."""
    seed, port = new_user_seed(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\n' + render_system_account(public_key_of_seed(seed)))
    write_secret(tmp_path / "system.nk", seed + "\n")

    async def main() -> bool:
        cutter = LinkCutter(f"nats://127.0.0.1:{port}", tmp_path / "system.nk")
        cutter.reloaded(frozenset())
        await asyncio.sleep(0.3)  # the server down for a moment: the scenario, not a wait for it
        server = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while cutter.busy and loop.time() < deadline:
                await asyncio.sleep(0.05)
            return cutter.pending
        finally:
            await cutter.stop()
            server.terminate()
            server.wait(10)

    assert asyncio.run(main()) is False, "the pass was given up at its first refusal"
