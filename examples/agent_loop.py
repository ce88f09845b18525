#!/usr/bin/env python3
"""A tiny agent loop gated by Keyturn.

The "model" here is a script of tool calls (swap in your LLM); every call goes
through Keyturn before it runs. Low-risk tools run at once, risky ones wait
for a human (Discord button or `keyturn approve ID`), denials are fed back
to the model as the tool's result, exactly as an agent framework would.

    keyturn serve --config config.example.toml &
    KEYTURN_SOCKET=./keyturn.sock python3 examples/agent_loop.py [--unattended] [--workdir DIR]

Config needed: an `[[agents]]` entry named `example` and grants for
`read_file`/`delete_file` (see docs/integrations.md).
"""

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "clients" / "python"))
import keyturn_client as kt  # noqa: E402  (or: pip install ./clients/python)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", default=os.environ.get("KEYTURN_AGENT", "example"))
    ap.add_argument("--unattended", action="store_true", help="nobody is watching: deny what needs a human")
    ap.add_argument("--max-wait", type=float, default=None, help="seconds to wait for a human")
    ap.add_argument("--workdir", default=None)
    opts = ap.parse_args()

    client = kt.Client(agent=opts.agent, unattended=opts.unattended, max_wait=opts.max_wait)
    work = pathlib.Path(opts.workdir or tempfile.mkdtemp(prefix="keyturn-agent-"))
    (work / "notes.txt").write_text("buy milk\n")
    (work / "old.log").write_text("x" * 100)

    # The tools the agent may use, each behind the gate.
    @kt.require_approval(tool="read_file", risk="low", client=client)
    def read_file(path):
        return pathlib.Path(path).read_text()

    @kt.require_approval(tool="delete_file", risk="high", client=client,
                         justification=lambda path: f"free space: {path} is an old log")
    def delete_file(path):
        pathlib.Path(path).unlink()
        return f"deleted {path}"

    tools = {"read_file": read_file, "delete_file": delete_file}

    # What a model might decide to do, one step at a time.
    plan = [
        ("read_file", {"path": str(work / "notes.txt")}),
        ("delete_file", {"path": str(work / "old.log")}),
        ("read_file", {"path": str(work / "notes.txt")}),
    ]
    for step, (name, args) in enumerate(plan, 1):
        try:
            result = tools[name](**args)
            print(f"step {step}: {name} -> {result!r}")
        except kt.ApprovalDenied as e:
            # Tell the model, and let it carry on with something else.
            print(f"step {step}: {name} not run: {e.reason or e} ({e.rule}, decided by {e.approver})")
        except kt.KeyturnError as e:
            print(f"step {step}: {name} not run: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
