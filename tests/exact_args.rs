//! What the approver sees is what runs, for the arguments' text itself:
//! integers beyond 64 bits keep every digit (display, hash, `verify`), and
//! JSON that two readers could read differently (a duplicate key, a number
//! a double cannot hold, `-0`) is refused on the socket, in the CLI's
//! `--args` and in the Claude Code hook's `tool_input`, naming the key or
//! number, and queues nothing. The real binary throughout.

mod harness;

use harness::{config, run_with_stdin, Server, BIN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

const APPROVED: &str = "123456789012345678901";
const OFF_BY_ONE: &str = "123456789012345678900";

/// One raw line on a fresh connection (the agent side), its answer parsed.
fn raw(s: &Server, line: &str) -> Value {
    let mut sock = UnixStream::connect(s.socket()).expect("connect");
    writeln!(sock, "{line}").expect("write");
    let mut buf = String::new();
    BufReader::new(sock).read_line(&mut buf).expect("read");
    serde_json::from_str(&buf).unwrap_or_else(|e| panic!("{e}: {buf}"))
}

fn cli(s: &Server, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.args(args)
        .arg("--config")
        .arg(&s.config)
        .env_remove("KEYTURN_SOCKET")
        .env_remove("KEYTURN_AGENT");
    run_with_stdin(c, b"")
}

fn pending_json(s: &Server) -> Vec<Value> {
    let (code, out, err) = cli(s, &["pending", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}"))
        .as_array()
        .cloned()
        .expect("a list")
}

fn submit_line(id: u64, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"submit","params":{{"agent":"cli","tool":"Bash","args":{args},"justification":"pay"}}}}"#
    )
}

fn verify_line(request: &str, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":3,"method":"verify","params":{{"agent":"cli","id":"{request}","args":{args}}}}}"#
    )
}

#[test]
fn integers_beyond_64_bits_survive_display_hash_and_verify() {
    let s = Server::start(config::claude_code, "");
    let args = format!(r#"{{"to":"acct-1","amount":{APPROVED},"neg":-{APPROVED}}}"#);
    let r = raw(&s, &submit_line(1, &args));
    assert_eq!(r["result"]["state"], "pending", "{r}");
    let id = r["result"]["request_id"].as_str().expect("id").to_string();
    let hash = r["result"]["args_hash"].as_str().expect("hash").to_string();
    // The hash is over the exact digits (the canonical form is the text itself here).
    let canonical = format!(r#"{{"amount":{APPROVED},"neg":-{APPROVED},"to":"acct-1"}}"#);
    assert_eq!(
        hash,
        keyturn::domain::canonical::args_hash(
            &keyturn::domain::canonical::parse_strict(&canonical).unwrap()
        )
    );

    // What the approver reads shows every digit.
    let (code, out, err) = cli(&s, &["pending"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("\"amount\":{APPROVED}")) && out.contains(&format!("-{APPROVED}")),
        "{out}"
    );
    assert!(!out.contains("e+20") && !out.contains("e20"), "{out}");
    let listed = pending_json(&s);
    assert_eq!(
        listed[0]["args"]["amount"].to_string(),
        APPROVED,
        "{listed:?}"
    );

    s.approve(&id, "ok");

    // Off by one in the last digit: not the approved call.
    let v = raw(
        &s,
        &verify_line(
            &id,
            &args.replace(&format!(":{APPROVED}"), &format!(":{OFF_BY_ONE}")),
        ),
    );
    assert_eq!(v["result"]["matches"], false, "{v}");
    assert_ne!(v["result"]["args_hash"], json!(hash));
    let v = raw(&s, &verify_line(&id, &args));
    assert_eq!(
        (&v["result"]["matches"], &v["result"]["approved"]),
        (&json!(true), &json!(true)),
        "{v}"
    );

    // The CLI reads --args exactly too.
    let off = args.replace(&format!(":{APPROVED}"), &format!(":{OFF_BY_ONE}"));
    let (code, out, _) = cli(&s, &["verify", &id, "--agent", "cli", "--args", &off]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH"), "{out}");
    let (code, out, err) = cli(&s, &["verify", &id, "--agent", "cli", "--args", &args]);
    assert_eq!(code, 0, "{out}{err}");

    // `1` and `1.0` are different values; `1e2` and `100.0` the same.
    let a = raw(&s, &submit_line(4, r#"{"n":1}"#));
    let b = raw(&s, &submit_line(5, r#"{"n":1.0}"#));
    assert_ne!(a["result"]["args_hash"], b["result"]["args_hash"]);
    let c = raw(&s, &submit_line(6, r#"{"n":1e2}"#));
    let d = raw(&s, &submit_line(7, r#"{"n":100.0}"#));
    assert_eq!(c["result"]["args_hash"], d["result"]["args_hash"]);
}

#[test]
fn ambiguous_json_is_refused_on_the_socket_and_queues_nothing() {
    let s = Server::start(config::claude_code, "");
    let cases = [
        // (args, key or number named, pointer named)
        (
            r#"{"path":"/tmp/ok","path":"/etc/passwd"}"#,
            "`path`",
            "/params/args",
        ),
        (
            r#"{"opts":{"deep":[{"k":1,"k":2}]}}"#,
            "`k`",
            "/params/args/opts/deep/0",
        ),
        (r#"{"n":-0}"#, "-0", "/params/args/n"),
        (r#"{"n":1e400}"#, "range", "/params/args/n"),
        (r#"{"n":1e-400}"#, "exactly", "/params/args/n"),
        (
            r#"{"n":0.10000000000000000001}"#,
            "exactly",
            "/params/args/n",
        ),
        (
            r#"{"$serde_json::private::Number":"1"}"#,
            "reserved",
            "/params/args",
        ),
    ];
    for (i, (args, named, at)) in cases.iter().enumerate() {
        let v = raw(&s, &submit_line(100 + i as u64, args));
        assert_eq!(v["error"]["data"]["code"], "invalid_params", "{args}: {v}");
        assert_eq!(v["error"]["code"], -32602, "{v}");
        assert_eq!(v["id"], 100 + i as u64, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(named) && msg.contains(at), "{args}: {msg}");
    }
    // In params themselves: two `tool`s, the policy and the card could disagree.
    let v = raw(
        &s,
        r#"{"jsonrpc":"2.0","id":9,"method":"submit","params":{"agent":"cli","tool":"Read","tool":"Bash"}}"#,
    );
    assert_eq!(v["error"]["data"]["code"], "invalid_params", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("`tool`"));
    // In the envelope: which method?
    let v = raw(
        &s,
        r#"{"jsonrpc":"2.0","id":9,"method":"ping","method":"submit","params":{"agent":"cli","tool":"Bash"}}"#,
    );
    assert_eq!(v["error"]["data"]["code"], "invalid_request", "{v}");
    assert_eq!(v["id"], Value::Null);
    // `verify` refuses them too (it must never match an ambiguous text).
    let v = raw(
        &s,
        &verify_line("00000000-0000-0000-0000-000000000000", r#"{"a":1,"a":1}"#),
    );
    assert_eq!(v["error"]["data"]["code"], "invalid_params", "{v}");

    assert_eq!(pending_json(&s), Vec::<Value>::new());
}

#[test]
fn ambiguous_json_is_refused_by_the_cli_and_the_hook() {
    let s = Server::start(config::claude_code, "");
    // CLI --args: refused before anything is sent.
    for (args, named) in [
        (r#"{"path":"a","path":"b"}"#, "duplicate key `path`"),
        (r#"{"x":{"n":1e400}}"#, "/x/n"),
    ] {
        let (code, out, err) = cli(
            &s,
            &[
                "request",
                "--tool",
                "Bash",
                "--agent",
                "cli",
                "--no-wait",
                "--args",
                args,
            ],
        );
        assert_ne!(code, 0, "{out}");
        assert!(err.contains(named), "{args}: {err}");
    }
    assert_eq!(pending_json(&s), Vec::<Value>::new());

    // The hook: a duplicate key in tool_input is denied, naming it; the same
    // call without it is allowed (Read is low risk).
    let hook = || {
        let mut c = Command::new(BIN);
        c.args(["hook", "claude-code", "--socket"])
            .arg(s.socket())
            .env_remove("KEYTURN_AGENT")
            .env_remove("KEYTURN_CONFIG");
        c
    };
    let decision = |out: &str| -> (String, String) {
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        let h = &v["hookSpecificOutput"];
        (
            h["permissionDecision"].as_str().unwrap_or("?").into(),
            h["permissionDecisionReason"].as_str().unwrap_or("").into(),
        )
    };
    let input = |tool_input: &str| {
        format!(
            r#"{{"session_id":"s1","hook_event_name":"PreToolUse","tool_name":"Read","tool_input":{tool_input},"tool_use_id":"t1"}}"#
        )
    };
    let (code, out, _) = run_with_stdin(
        hook(),
        input(r#"{"file_path":"/tmp/a","file_path":"/etc/shadow"}"#).as_bytes(),
    );
    let (d, why) = decision(&out);
    assert_eq!((code, d.as_str()), (0, "deny"), "{why}");
    assert!(
        why.contains("duplicate key `file_path`") && why.contains("/tool_input"),
        "{why}"
    );
    let (code, out, _) = run_with_stdin(
        hook(),
        input(&format!(r#"{{"file_path":"/tmp/a","limit":{APPROVED}}}"#)).as_bytes(),
    );
    let (d, why) = decision(&out);
    assert_eq!((code, d.as_str()), (0, "allow"), "{why}");
    let (_, out, _) = run_with_stdin(hook(), input(r#"{"file_path":"/tmp/a","n":-0}"#).as_bytes());
    assert_eq!(decision(&out).0, "deny");
}
