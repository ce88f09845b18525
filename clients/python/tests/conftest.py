"""Fixtures: the client module from this checkout, and a real `keyturn serve`
(the binary from $KEYTURN_BIN, which `cargo test` sets, else target/debug/keyturn)
on a temp socket and database, with its log read line by line so tests wait
for events instead of sleeping."""

import json
import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))

CONFIG = """
[server]
socket_path = "{sock}"

[store]
url = "sqlite://{db}"

[admin]
socket_path = "{admin_sock}"
# Agents and admin are the test's one uid.
single_user_demo = true

[[agents]]
name = "py"
# Only calls that state a lower confidence are held back by it.
min_confidence = 0.7

[[agents]]
name = "robot"
unattended = true

[[tools]]
name = "read_file"
risk = "low"

[[tools]]
name = "delete_file"
risk = "high"

[[tools]]
name = "wire_money"
risk = "high"

[[grants]]
scope = "global"
tool = "*"
effect = "allow"
"""


def keyturn_bin():
    b = os.environ.get("KEYTURN_BIN") or str(ROOT / "target/debug/keyturn")
    if not os.path.exists(b):
        pytest.fail(f"keyturn binary not found at {b}; run `cargo build` or set KEYTURN_BIN")
    return b


class Server:
    def __init__(self, tmp, extra=""):
        self.sock = str(tmp / "k.sock")
        self.admin_sock = str(tmp / "k-admin.sock")
        cfg = tmp / "config.toml"
        cfg.write_text(CONFIG.format(sock=self.sock, admin_sock=self.admin_sock, db=tmp / "k.db") + extra)
        env = dict(os.environ, KEYTURN_LOG="keyturn=info", NO_COLOR="1")
        self.proc = subprocess.Popen(
            [keyturn_bin(), "serve", "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines = queue.Queue()
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()
        self.url = None
        ready = self.wait_log(
            lambda l: l.startswith("keyturn: listening on") or l.startswith("keyturn: tcp on")
        )
        if ready.startswith("keyturn: tcp on"):
            self.url = ready.split(" on ", 1)[1].strip()
            self.wait_log(lambda l: l.startswith("keyturn: listening on"))

    def _pump(self, stream):
        for line in stream:
            self.lines.put(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rstrip("\n")))
        self.lines.put(None)

    def wait_log(self, pred, within=10.0):
        until = time.monotonic() + within
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching server log line in time")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the server exited")
            if pred(line):
                return line

    def wait_queued(self, tool):
        line = self.wait_log(lambda l: "queued for approval" in l and f"tool={tool} " in l)
        return re.search(r"request\.id=(\S+)", line).group(1)

    def admin(self, method, params):
        """One call on the admin socket (admin methods are served only there)."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.admin_sock)
        s.sendall((json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}) + "\n").encode())
        msg = json.loads(s.makefile().readline())
        s.close()
        assert "error" not in msg, msg
        return msg["result"]

    def approve(self, rid, reason="ok"):
        return self.admin("approve", {"id": rid, "reason": reason, "operator": "alice"})

    def deny(self, rid, reason="no"):
        return self.admin("deny", {"id": rid, "reason": reason, "operator": "bob"})

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


def tls_files(tmp):
    """(ca.pem, cert.pem, key.pem): from $KEYTURN_TEST_TLS_DIR (which the
    cargo test that runs this suite writes with rcgen), else made here with
    the openssl command, else the test is skipped."""
    d = os.environ.get("KEYTURN_TEST_TLS_DIR")
    if d:
        d = pathlib.Path(d)
        return d / "ca.pem", d / "cert.pem", d / "key.pem"
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("no certificates: set KEYTURN_TEST_TLS_DIR or install openssl")
    ca, ca_key = tmp / "ca.pem", tmp / "ca-key.pem"
    cert, key, csr, ext = tmp / "cert.pem", tmp / "key.pem", tmp / "cert.csr", tmp / "ext.cnf"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=keyturn test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


@pytest.fixture
def tls_server(tmp_path):
    """A server with a TLS listener on a free loopback port: ``server.url``,
    ``server.ca``."""
    ca, cert, key = tls_files(tmp_path)
    s = Server(
        tmp_path,
        f'\n[tcp]\nlisten = "127.0.0.1:0"\ntls_cert = "{cert}"\ntls_key = "{key}"\n',
    )
    s.ca = str(ca)
    yield s
    s.stop()
