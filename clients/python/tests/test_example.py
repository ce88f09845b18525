"""examples/agent_loop.py runs against a real server: low-risk steps run,
the risky one is denied at once in unattended mode and the loop carries on."""

import os
import subprocess
import sys

from conftest import ROOT


def test_agent_loop_example_unattended(server, tmp_path):
    env = dict(os.environ, KEYTURN_SOCKET=server.sock)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/agent_loop.py"), "--agent", "py", "--unattended", "--workdir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step 1: read_file -> 'buy milk")
    assert lines[1].startswith("step 2: delete_file not run:") and "unattended" in lines[1], lines[1]
    assert lines[2].startswith("step 3: read_file ->")
    assert (tmp_path / "old.log").exists()
