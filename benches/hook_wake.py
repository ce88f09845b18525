#!/usr/bin/env python3
"""Benchmark (not a test): how long from a human's approval to the waiting
`keyturn hook claude-code` printing its answer.

For each round: start the hook on a high-risk Bash call, wait until the
server logs it as queued, then time from sending `approve` on the admin
socket to the hook's JSON line arriving on its stdout (the hook is woken by
the server, it does not poll).

    KEYTURN_BIN=target/release/keyturn python3 benches/hook_wake.py [ROUNDS]
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients/python/tests"))
from conftest import Server, keyturn_bin  # noqa: E402

CONFIG_EXTRA_AGENT = "claude-code"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    tmp = pathlib.Path(tempfile.mkdtemp())
    srv = Server(tmp)
    fixture = json.loads((ROOT / "tests/fixtures/claude-code/bash.json").read_text())
    wake, click = [], []
    try:
        for i in range(rounds):
            fixture["tool_use_id"] = f"toolu_bench_{i}_{time.time_ns()}"
            p = subprocess.Popen(
                [keyturn_bin(), "hook", "claude-code", "--socket", srv.sock, "--agent", "py"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            p.stdin.write(json.dumps(dict(fixture, tool_name="delete_file")))
            p.stdin.close()
            rid = srv.wait_queued("delete_file")
            t0 = time.perf_counter()
            srv.approve(rid)
            t1 = time.perf_counter()
            line = p.stdout.readline()
            t2 = time.perf_counter()
            p.wait()
            assert '"allow"' in line, line
            click.append((t1 - t0) * 1000)
            wake.append((t2 - t0) * 1000)
    finally:
        srv.stop()
    print(f"rounds: {rounds}")
    print(f"approve call (admin socket round trip): median {statistics.median(click):.2f} ms")
    print(f"approve sent -> hook answer on stdout:   median {statistics.median(wake):.2f} ms, "
          f"p90 {sorted(wake)[int(len(wake) * 0.9) - 1]:.2f} ms, max {max(wake):.2f} ms")


if __name__ == "__main__":
    main()
