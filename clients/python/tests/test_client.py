"""The Python client against a real `keyturn serve`: approvals, denials,
timeouts, unattended mode, and the decorator's checks."""

import random
import threading

import pytest

import keyturn_client as kc


def client(server, **kw):
    kw.setdefault("agent", "py")
    return kc.Client(server.sock, **kw)


def in_thread(fn, *a, **kw):
    box = {}

    def run():
        try:
            box["value"] = fn(*a, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_low_risk_is_approved_by_policy_and_hash_matches(server):
    kt = client(server)
    args = {"path": "/srv/a.txt", "n": 3, "f": 0.1, "é": ["x", None, True]}
    d = kt.submit("read_file", args)
    assert d.approved and d.decided_by == "policy" and d.rule == "risk_low"
    assert d.args_hash == kc.args_hash(args)


def test_hash_agrees_with_server_on_random_values(server):
    kt = client(server)
    rng = random.Random(5)
    floats = [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(1500)]
    floats += [float(rng.randint(-(2**60), 2**60)) for _ in range(200)]
    ints = [rng.randint(-(2**63), 2**64 - 1) for _ in range(200)]
    ints += [rng.randint(-(2**300), 2**300) for _ in range(200)]
    text = "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(300))
    args = {"floats": floats, "ints": ints, "text": text, text[:5]: 1, "Z": {"b": 1, "a": [2]}}
    # The random text holds invisible characters, so the call is flagged and
    # waits for a human; its hash is known at once.
    d = kt.submit("read_file", args, wait=False)
    assert d.args_hash == kc.args_hash(args)


def test_big_integers_are_hashed_exactly_on_both_sides(server):
    kt = client(server)
    approved = 123456789012345678901
    args = {"amount": approved, "neg": -(2**200), "ints": [2**64, -(2**63) - 1], "f": 1.0}
    d = kt.submit("read_file", args)
    assert d.approved
    assert d.args_hash == kc.args_hash(args)
    # One digit off is another call, and 1 is not 1.0.
    assert d.args_hash != kc.args_hash(dict(args, amount=approved - 1))
    assert d.args_hash != kc.args_hash(dict(args, f=1))
    # The same call given as JSON text hashes the same.
    text = '{"amount": 123456789012345678901, "neg": -%d, "ints": [%d, %d], "f": 1.0}' % (
        2**200, 2**64, -(2**63) - 1)
    assert kt.submit("read_file", text).args_hash == d.args_hash


def test_json_text_with_duplicate_keys_is_refused_before_sending():
    # No socket at all: the refusal comes before any connection.
    kt = kc.Client("/nonexistent/keyturn.sock", agent="py")
    with pytest.raises(ValueError, match="duplicate key 'path'"):
        kt.submit("read_file", '{"path": "/srv/a", "path": "/etc/shadow"}')


def test_decorator_runs_only_after_human_approval(server, tmp_path):
    victim = tmp_path / "old.log"
    victim.write_text("x")

    @kc.require_approval(tool="delete_file", risk="high", client=client(server), justification="rotate logs")
    def delete_file(path):
        victim.unlink()
        return "deleted " + path

    t, box = in_thread(delete_file, str(victim))
    rid = server.wait_queued("delete_file")
    assert victim.exists()
    server.approve(rid, "fine")
    t.join(10)
    assert box.get("value") == "deleted " + str(victim), box
    assert not victim.exists()


def test_decorator_runs_the_approvers_edit(server):
    ran = []

    @kc.require_approval(tool="delete_file", risk="high", client=client(server), justification="rotate logs")
    def delete_file(path):
        ran.append(path)
        return "deleted " + path

    t, box = in_thread(delete_file, "/srv/old.log")
    rid = server.wait_queued("delete_file")
    answer = server.admin("approve", {"id": rid, "args": {"path": "/srv/older.log"}, "operator": "alice"})
    assert answer["decision"]["state"] == "approved", answer
    t.join(10)
    assert box.get("value") == "deleted /srv/older.log", box
    assert ran == ["/srv/older.log"], "only the edited call ran"


def test_an_edited_answer_without_matching_args_is_refused():
    d = kc.Decision(tool="t", args_hash="new", edited=True, original_args_hash="old", args={"a": 1})
    with pytest.raises(kc.AnswerMismatch):
        kc._answering(d, "t", "old")
    good = kc.Decision(d, args_hash=kc.args_hash({"a": 1}))
    assert kc._answering(good, "t", "old").edited


def test_denial_raises_with_reason_and_approver(server):
    ran = []

    @kc.require_approval(tool="wire_money", client=client(server))
    def wire_money(to, amount):
        ran.append(1)

    t, box = in_thread(wire_money, "acct-9", 10_000)
    rid = server.wait_queued("wire_money")
    server.deny(rid, "looks like fraud")
    t.join(10)
    e = box.get("error")
    assert isinstance(e, kc.ApprovalDenied) and not isinstance(e, kc.ApprovalTimedOut), box
    assert e.reason == "looks like fraud"
    assert "bob" in e.approver
    assert "looks like fraud" in str(e)
    assert ran == []


def test_own_timeout_raises_timed_out_and_cancels(server):
    kt = client(server, max_wait=1)
    with pytest.raises(kc.ApprovalTimedOut) as ei:
        kt.submit("delete_file", {"path": "/x"}).raise_unless_approved()
    assert "timed out" in str(ei.value)
    assert kt.status(ei.value.request_id).state == "cancelled"


def test_unattended_denies_at_once(server):
    with pytest.raises(kc.ApprovalDenied) as ei:
        client(server, unattended=True).submit("delete_file", {"path": "/x"}).raise_unless_approved()
    assert ei.value.rule == "unattended"
    d = client(server, agent="robot").submit("delete_file", {"path": "/x"})
    assert not d.approved and d.rule == "unattended"
    assert client(server, agent="robot").submit("read_file", {"path": "/x"}).approved


def test_low_confidence_waits_for_a_human(server):
    kt = client(server)
    d = kt.submit("read_file", {"path": "/x"}, confidence=0.3, wait=False)
    assert d.pending and d.rule == "low_confidence"
    assert d.rule_detail.startswith("the agent's confidence 0.3 is below 0.7")
    kt.cancel(d.request_id)
    assert kt.submit("read_file", {"path": "/x"}, confidence=0.9).approved
    with pytest.raises(kc.RpcError) as ei:
        kt.submit("read_file", {"path": "/x"}, confidence=1.5)
    assert ei.value.code == "invalid_params"


def test_check_and_wait_after_reconnect(server):
    kt = client(server)
    assert kt.check("read_file", {"path": "/x"})["verdict"]["action"] == "allow"
    assert kt.check("delete_file", {"path": "/x"})["verdict"]["action"] == "ask"
    d = kt.submit("delete_file", {"path": "/y"}, wait=False, idempotency_key="k1")
    assert d.pending
    server.approve(d.request_id)
    again = kc.Client(server.sock, agent="py").wait(d.request_id)
    assert again.approved and again.who and "alice" in again.who


def test_args_changed_after_approval_are_refused(server):
    ran = []

    @kc.require_approval(tool="delete_file", client=client(server))
    def delete_many(paths):
        ran.append(list(paths))

    paths = ["/tmp/a"]
    t, box = in_thread(delete_many, paths)
    rid = server.wait_queued("delete_file")
    paths.append("/etc/passwd")  # swapped while the human looked at the card
    server.approve(rid)
    t.join(10)
    assert isinstance(box.get("error"), kc.ArgsMismatch), box
    assert ran == []


def test_declared_risk_is_never_lowered(server):
    @kc.require_approval(tool="read_file", risk="critical", client=client(server))
    def read_file(path):
        return "ran"

    with pytest.raises(kc.RiskMismatch):
        read_file("/x")


def test_socket_down_fails_closed(tmp_path):
    ran = []

    @kc.require_approval(tool="delete_file", client=kc.Client(str(tmp_path / "none.sock"), agent="py"))
    def delete_file(path):
        ran.append(path)

    with pytest.raises(kc.ConnectionFailed):
        delete_file("/x")
    assert ran == []


def test_unknown_agent_is_an_rpc_error(server):
    with pytest.raises(kc.RpcError) as ei:
        kc.Client(server.sock, agent="nobody").submit("read_file", {})
    assert ei.value.code == "agent_refused"


def test_reused_key_for_another_call_is_refused(server):
    kt = client(server)
    assert kt.submit("read_file", {"path": "/a"}, idempotency_key="step-1").approved
    with pytest.raises(kc.RpcError) as ei:
        kt.submit("delete_file", {"path": "/srv"}, idempotency_key="step-1")
    assert ei.value.code == "idempotency_conflict"
    # A true retry still gets its request back.
    assert kt.submit("read_file", {"path": "/a"}, idempotency_key="step-1").approved


def _lying_server(path):
    """Approves everything as `read_file {}`: the client must notice."""
    import json
    import socket

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            req = json.loads(conn.makefile().readline())
            conn.sendall((json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": {
                "request_id": "0190a0a0-0000-7000-8000-000000000001", "state": "approved",
                "approved": True, "decided_by": "human", "rule": "risk_high", "rule_detail": "",
                "who": "uid:0", "reason": None, "tool": "read_file", "agent": "py", "risk": "low",
                "args_hash": kc.args_hash({}), "summary": "approved by uid:0",
            }}) + "\n").encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_an_answer_about_another_call_is_refused(tmp_path):
    sock = str(tmp_path / "liar.sock")
    srv = _lying_server(sock)
    ran = []

    @kc.require_approval(tool="delete_file", client=kc.Client(sock, agent="py"))
    def delete_file(path):
        ran.append(path)

    try:
        with pytest.raises(kc.AnswerMismatch):
            delete_file("/srv")
        # Right tool, other arguments: refused too.
        with pytest.raises(kc.AnswerMismatch):
            kc.Client(sock, agent="py").submit("read_file", {"path": "/etc/shadow"})
    finally:
        srv.close()
    assert ran == []


def test_a_killed_waiting_client_cancels_its_request(server):
    import subprocess
    import sys

    code = (
        "import keyturn_client as kc, sys; "
        "kc.Client(sys.argv[1], agent='py').submit('delete_file', {'path': '/k'})"
    )
    here = __import__("pathlib").Path(__file__).resolve().parent.parent
    p = subprocess.Popen([sys.executable, "-c", code, server.sock], cwd=str(here))
    try:
        rid = server.wait_queued("delete_file")
    finally:
        p.kill()
        p.wait()
    server.wait_log(lambda l: "the client went away; request cancelled" in l and rid in l)
    d = client(server).status(rid)
    assert d.state == "cancelled" and d.reason == "client_gone", d


def test_a_round_trip_over_tls_with_a_bearer_token(tls_server):
    issued = tls_server.admin("token.issue", {"agent": "py"})
    assert tls_server.url.startswith("keyturn+tls://")
    kt = kc.Client(url=tls_server.url, token=issued["token"], ca=tls_server.ca, agent="py")
    assert kt.submit("read_file", {"path": "/srv/a"}).approved
    t, box = in_thread(kt.submit, "delete_file", {"path": "/srv/b"})
    rid = tls_server.wait_queued("delete_file")
    tls_server.approve(rid)
    t.join(10)
    assert box["value"].approved, box
    # A wrong token is refused without saying which part was wrong.
    bad = kc.Client(url=tls_server.url, token="kt_" + "0" * 24 + "_" + "A" * 43, ca=tls_server.ca)
    with pytest.raises(kc.RpcError) as e:
        bad.submit("read_file", {})
    assert e.value.code == "unauthorized"
    # Plaintext is for loopback only, decided before anything is sent.
    with pytest.raises(ValueError, match="loopback"):
        kc.Client(url="keyturn+tcp://192.0.2.1:7443", token="kt_x")
