//! The TCP listener against the real binary: bearer tokens issued, rotated
//! and revoked with the admin CLI on the Unix admin socket, agents over TLS
//! (a CA and a server certificate made here with rcgen), and what is
//! refused: no token, a wrong one, a revoked one, another agent's name,
//! admin methods, a plaintext client on the TLS port, and a non-loopback
//! listener without TLS.

mod harness;

use harness::{config, run_with_stdin, serve_command, Launch, Server, BIN};
use keyturn::ipc::client::{Client, ClientError};
use keyturn::ipc::tcp_endpoint::TcpTarget;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Writes a CA and a server certificate for `localhost` and 127.0.0.1
/// (signed by it) into `dir`: `(ca.pem, cert.pem, key.pem)`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf named like its issuer reads as self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyturn test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = {
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        p
    }
    .signed_by(&leaf_key, &ca, &ca_key)
    .expect("leaf cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write ca");
    std::fs::write(&paths.1, leaf.pem()).expect("write cert");
    std::fs::write(&paths.2, leaf_key.serialize_pem()).expect("write key");
    (paths.0, paths.1, paths.2)
}

/// A server with a TLS listener on a free loopback port: the server, its
/// URL and the CA file.
fn tls_server() -> (Server, String, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certificates(dir.path());
    let extra = format!(
        "[tcp]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let text = config::claude_code(dir.path(), &extra);
    let s = Launch::new(dir, text).start();
    let url = tcp_url(&s);
    (s, url, ca)
}

/// The URL serve printed for its TCP listener.
fn tcp_url(s: &Server) -> String {
    s.log()
        .lines()
        .find_map(|l| l.strip_prefix("keyturn: tcp on "))
        .map(|u| u.trim().to_string())
        .unwrap_or_else(|| panic!("no tcp line:\n{}", s.log()))
}

/// `keyturn token ARGS --json` on the admin socket.
fn token_cli(s: &Server, args: &[&str]) -> Value {
    let mut a = vec!["token"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = s.cli(&a);
    assert!(
        out.status.success(),
        "keyturn token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("token --json")
}

/// Issues a token for `agent`: `(id, token)`.
fn issue(s: &Server, agent: &str) -> (String, String) {
    let v = token_cli(s, &["issue", "--agent", agent]);
    (
        v["id"].as_str().expect("id").to_string(),
        v["token"].as_str().expect("token").to_string(),
    )
}

fn target(url: &str, token: &str, ca: &Path) -> TcpTarget {
    TcpTarget::new(url, token.to_string(), Some(ca.to_path_buf())).expect("target")
}

async fn connect(url: &str, token: &str, ca: &Path) -> Result<Client, ClientError> {
    Client::connect_tcp(&target(url, token, ca)).await
}

fn code(e: &ClientError) -> String {
    match e {
        ClientError::Rpc(r) => r.data.code.clone(),
        other => format!("not an rpc error: {other}"),
    }
}

/// A raw TLS connection (no auth sent), for what the typed client never sends.
async fn raw_tls(
    url: &str,
    ca: &Path,
) -> BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let t = target(url, "kt_unused", ca);
    let sock = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .expect("tcp connect");
    let tls = tokio_rustls::TlsConnector::from(t.tls_config().expect("tls config"))
        .connect(
            rustls_pki_types::ServerName::try_from(t.host.clone()).expect("name"),
            sock,
        )
        .await
        .expect("tls handshake");
    BufReader::new(tls)
}

/// The next line, or `None` at EOF or a reset, within `within`.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    within: Duration,
) -> Option<String> {
    let mut line = String::new();
    match tokio::time::timeout(within, r.read_line(&mut line)).await {
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(_)) => Some(line),
        Err(_) => panic!("no line and no close within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_tls_is_approved_on_the_admin_socket_and_answered() {
    let (s, url, ca) = tls_server();
    assert!(url.starts_with("keyturn+tls://127.0.0.1:"), "{url}");
    let (_, token) = issue(&s, "cli");
    // The secret is in the issuing answer only: never in the server's log.
    // `kt_<hex id>_<secret>`: the secret (base64url) may itself hold `_`.
    let secret = token
        .strip_prefix("kt_")
        .and_then(|rest| rest.split_once('_'))
        .expect("secret")
        .1
        .to_string();
    assert!(secret.len() >= 43, "{secret}");
    let mut c = connect(&url, &token, &ca).await.expect("connect over TLS");
    assert_eq!(
        c.call("ping", json!({})).await.expect("ping")["admin"],
        false
    );
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        c.call(
            "submit",
            json!({"agent": "cli", "tool": "Bash", "args": {"command": "ls"}, "wait": true}),
        )
        .await
    });
    let id = tokio::task::block_in_place(|| s.wait_queued("Bash"));
    let out = s.cli(&["approve", &id, "--reason", "looks fine"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = waiting.await.expect("join").expect("decision");
    println!(
        "submit → approve → answer over TLS: {:?}",
        started.elapsed()
    );
    assert_eq!(d["approved"], true, "{d}");
    assert_eq!(d["agent"], "cli");
    assert!(
        !s.log().contains(&secret),
        "the token's secret is in the log"
    );
    // The requester has no uid: nothing to compare a voter's uid with.
    let audit = s.cli(&["audit", "tail", "--json"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("token_issued"), "{audit}");
    assert!(
        !audit.contains(&secret),
        "the token's secret is in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_a_wrong_one_or_another_agent_is_refused() {
    let (s, url, ca) = tls_server();
    let (id, token) = issue(&s, "cli");

    // A first line that is not `auth`: refused and closed.
    let mut raw = raw_tls(&url, &ca).await;
    raw.get_mut()
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"submit\",\"params\":{\"agent\":\"cli\",\"tool\":\"Read\"}}\n")
        .await
        .expect("write");
    let line = next_line(&mut raw, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(
        line.contains("\"unauthorized\"") && line.contains("auth"),
        "{line}"
    );
    assert_eq!(next_line(&mut raw, Duration::from_secs(10)).await, None);

    // Nothing at all: refused after the auth timeout, saying so.
    let mut raw = raw_tls(&url, &ca).await;
    let started = Instant::now();
    let line = next_line(&mut raw, Duration::from_secs(15))
        .await
        .expect("an answer");
    println!("no auth line: refused after {:?}", started.elapsed());
    assert!(
        line.contains("\"unauthorized\"") && line.contains("within 5 s"),
        "{line}"
    );

    // A wrong secret and an unknown id get the same answer.
    let (good_id, _) = token.trim_start_matches("kt_").split_once('_').expect("id");
    assert_eq!(good_id, id);
    let wrong_secret = format!("kt_{id}_{}", "A".repeat(43));
    let unknown_id = format!("kt_{}_{}", "0".repeat(24), "A".repeat(43));
    let mut messages = Vec::new();
    for bad in [wrong_secret.as_str(), unknown_id.as_str(), "kt_garbage"] {
        let e = connect(&url, bad, &ca).await.err().expect("refused");
        assert_eq!(code(&e), "unauthorized", "{e}");
        messages.push(e.to_string());
    }
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    // Logged with the token id, never the secret sent.
    let line = tokio::task::block_in_place(|| {
        s.wait_log(
            |l| l.contains("token not accepted") && l.contains(&id),
            Duration::from_secs(5),
        )
    });
    assert!(line.contains("wrong secret"), "{line}");
    assert!(!s.log().contains(&"A".repeat(43)));

    // A valid token acts as its agent only, and never as an admin.
    let mut c = connect(&url, &token, &ca).await.expect("connect");
    let e = c
        .call(
            "submit",
            json!({"agent": "robot", "tool": "Read", "args": {}}),
        )
        .await
        .expect_err("another agent");
    assert_eq!(code(&e), "not_authorized", "{e}");
    let e = c
        .call("pending", json!({}))
        .await
        .expect_err("admin method");
    assert_eq!(code(&e), "not_admin", "{e}");
    let d = c
        .call(
            "submit",
            json!({"agent": "cli", "tool": "Read", "args": {}}),
        )
        .await
        .expect("own agent");
    assert_eq!(d["approved"], true, "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_and_its_live_connection_closed() {
    let (s, url, ca) = tls_server();
    let (id, token) = issue(&s, "cli");
    // A live connection, authenticated by hand so its close can be read.
    let mut raw = raw_tls(&url, &ca).await;
    raw.get_mut()
        .write_all(
            format!("{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"auth\",\"params\":{{\"token\":\"{token}\"}}}}\n")
                .as_bytes(),
        )
        .await
        .expect("write auth");
    let ok = next_line(&mut raw, Duration::from_secs(10))
        .await
        .expect("auth answer");
    assert!(ok.contains("\"agent\":\"cli\""), "{ok}");

    let revoked_at = Instant::now();
    let v = token_cli(&s, &["revoke", &id]);
    assert_eq!(v["id"], id.as_str());
    let line = next_line(&mut raw, Duration::from_secs(10))
        .await
        .expect("a closing line");
    println!(
        "revoked → live connection closed in {:?}",
        revoked_at.elapsed()
    );
    assert!(
        line.contains("\"unauthorized\"") && line.contains("revoked"),
        "{line}"
    );
    assert_eq!(next_line(&mut raw, Duration::from_secs(10)).await, None);

    let e = connect(&url, &token, &ca)
        .await
        .err()
        .expect("refused after revoke");
    assert_eq!(code(&e), "unauthorized", "{e}");
    let list = token_cli(&s, &["list"]);
    assert!(list[0]["revoked_ms"].is_i64(), "{list}");
    // Tokens are for configured agents only; a revoke acts once.
    for (args, says) in [
        (
            &["token", "issue", "--agent", "nobody"][..],
            "not configured",
        ),
        (&["token", "revoke", id.as_str()][..], "already revoked"),
        (&["token", "revoke", "not-an-id"][..], "not a token id"),
    ] {
        let out = s.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
    assert!(list[0].get("secret_hash").is_none(), "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_token_works_through_the_overlap_then_stops() {
    let (s, url, ca) = tls_server();
    let (_, old) = issue(&s, "cli");
    let mut live = connect(&url, &old, &ca).await.expect("old token");
    let v = token_cli(&s, &["rotate", "--agent", "cli", "--overlap", "3s"]);
    let new = v["token"].as_str().expect("new token").to_string();
    assert_eq!(v["others"], 1, "{v}");
    // During the overlap both work.
    connect(&url, &old, &ca)
        .await
        .expect("old token within the overlap");
    assert!(live.call("ping", json!({})).await.is_ok());
    let mut fresh = connect(&url, &new, &ca).await.expect("new token");
    // After it, the old one is refused and its connection closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused_at = loop {
        match connect(&url, &old, &ca).await {
            Err(e) => {
                assert_eq!(code(&e), "unauthorized", "{e}");
                break Instant::now();
            }
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("the old token still works 20 s after a 3 s overlap"),
        }
    };
    let closed = loop {
        match live.call("ping", json!({})).await {
            Err(_) => break Instant::now(),
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("the old token's connection is still open"),
        }
    };
    println!(
        "overlap 3 s: old token refused at +{:?}, its connection closed {:?} later",
        refused_at.duration_since(deadline - Duration::from_secs(20)),
        closed.saturating_duration_since(refused_at)
    );
    assert!(fresh.call("ping", json!({})).await.is_ok());
    connect(&url, &new, &ca)
        .await
        .expect("new token after the overlap");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_client_on_the_tls_port_is_closed_and_the_server_keeps_serving() {
    let (s, url, ca) = tls_server();
    let (_, token) = issue(&s, "cli");
    let addr = url.trim_start_matches("keyturn+tls://");
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut plain = BufReader::new(sock);
    let _ = plain
        .get_mut()
        .write_all(format!("{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"auth\",\"params\":{{\"token\":\"{token}\"}}}}\n").as_bytes())
        .await;
    // Closed: whatever came back is no JSON-RPC answer.
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut got),
    )
    .await;
    assert!(read.is_ok(), "the plaintext connection was not closed");
    assert!(!String::from_utf8_lossy(&got).contains("jsonrpc"));
    // The keyturn+tcp form is refused by the client itself off loopback,
    // and over TLS the server still answers.
    let mut c = connect(&url, &token, &ca).await.expect("TLS still served");
    assert!(c.call("ping", json!({})).await.is_ok());
    tokio::task::block_in_place(|| {
        s.wait_log(
            |l| l.contains("TLS handshake failed"),
            Duration::from_secs(5),
        )
    });
    assert!(!s.log().contains("ERROR"), "{}", s.log());
}

#[test]
fn a_non_loopback_listener_without_tls_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config::claude_code(dir.path(), "[tcp]\nlisten = \"0.0.0.0:0\"\n");
    let cfg = dir.path().join("config.toml");
    config::write_config(&cfg, &text);
    let out = harness::output_within(serve_command(&cfg), Duration::from_secs(20));
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tcp.listen") && err.contains("in clear"),
        "{err}"
    );
    let out = harness::run(&["check-config"], &cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tcp.tls_cert") && err.contains("in clear"),
        "{err}"
    );
    // An unreadable key: named at start.
    let text = config::claude_code(
        dir.path(),
        "[tcp]\nlisten = \"0.0.0.0:0\"\ntls_cert = \"nope.pem\"\ntls_key = \"nope-key.pem\"\n",
    );
    config::write_config(&cfg, &text);
    let out = harness::run(&["check-config"], &cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tcp.tls_cert") && err.contains("nope.pem"),
        "{err}"
    );
}

#[test]
fn the_hook_asks_over_tls_with_a_token_from_the_environment() {
    let (s, url, ca) = tls_server();
    let (_, token) = issue(&s, "claude-code");
    let hook = |token: &str| {
        let mut c = Command::new(BIN);
        c.args(["hook", "claude-code", "--url", &url, "--ca"])
            .arg(&ca)
            .env("KEYTURN_TOKEN", token)
            .env_remove("KEYTURN_AGENT")
            .env_remove("KEYTURN_CONFIG")
            .env_remove("KEYTURN_SOCKET");
        c
    };
    let input = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-code/read.json"),
    )
    .expect("fixture");
    let (code, out, err) = run_with_stdin(hook(&token), &input);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let decision = &v["hookSpecificOutput"]["permissionDecision"];
    assert_eq!((code, decision.as_str()), (0, Some("allow")), "{out} {err}");
    // A wrong token fails closed.
    let (_, out, _) = run_with_stdin(
        hook(&format!("kt_{}_{}", "0".repeat(24), "A".repeat(43))),
        &input,
    );
    let v: Value = serde_json::from_str(out.trim()).expect("json");
    assert_ne!(
        v["hookSpecificOutput"]["permissionDecision"], "allow",
        "{out}"
    );
}

#[test]
fn the_cli_asks_over_plaintext_loopback_with_a_token_from_a_named_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config::claude_code(
        dir.path(),
        "[tcp]\nlisten = \"127.0.0.1:0\"\nmax_connections_per_ip = 2\n",
    );
    let mut s = Launch::new(dir, text).start();
    let url = tcp_url(&s);
    assert!(url.starts_with("keyturn+tcp://127.0.0.1:"), "{url}");
    let (_, token) = issue(&s, "cli");
    let cli = |args: &[&str], var: &str| {
        let mut c = harness::cli(&s.dir.path().join("config.toml"), args);
        c.args(["--url", &url, "--token-env", "MY_KEYTURN_TOKEN"])
            .env("MY_KEYTURN_TOKEN", var)
            .env_remove("KEYTURN_TOKEN");
        harness::output_within(c, Duration::from_secs(20))
    };
    let out = cli(&["request", "--agent", "cli", "--tool", "Read"], &token);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("approved by policy"), "{text}");
    let out = cli(&["health"], &token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong token: refused, exit 2, the reason printed.
    let out = cli(&["request", "--agent", "cli", "--tool", "Read"], "kt_nope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unauthorized"), "{err}");

    // Two connections from one address at most: a third is closed unanswered.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let t = TcpTarget::new(&url, token.clone(), None).expect("target");
        let mut a = Client::connect_tcp(&t).await.expect("first");
        let b = Client::connect_tcp(&t).await.expect("second");
        let third = Client::connect_tcp(&t).await;
        assert!(
            third.is_err(),
            "a third connection from one address was served"
        );
        drop(b);
        // Its place is given back once the server sees it closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect_tcp(&t).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the closed connection's place never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Shutdown with a TCP connection open: drained, then a clean exit.
        assert!(a.call("ping", json!({})).await.is_ok());
        let status = s.stop_async().await;
        assert!(status.success(), "{status:?}");
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_on_one_server_closes_its_connections_on_another_sharing_the_database() {
    let Some(schema) = harness::pg::Schema::new().await else {
        return;
    };
    let start = |init: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = format!("sqlite://{}", dir.path().join("k.db").display());
        let text = config::claude_code(dir.path(), "[tcp]\nlisten = \"127.0.0.1:0\"\n")
            .replace(&sqlite, &schema.url());
        assert!(text.contains("search_path"), "{text}");
        if init {
            let cfg = dir.path().join("init.toml");
            config::write_config(&cfg, &text);
            let out = harness::run(&["init"], &cfg);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let s = Launch::new(dir, text).start();
        let url = tcp_url(&s);
        (s, url)
    };
    let (a, _) = tokio::task::block_in_place(|| start(true));
    let (b, url_b) = tokio::task::block_in_place(|| start(false));
    let (id, token) = issue(&a, "cli");
    // Issued on one server, admitted by the other.
    let addr = url_b.trim_start_matches("keyturn+tcp://");
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut live = BufReader::new(sock);
    live.get_mut()
        .write_all(
            format!("{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"auth\",\"params\":{{\"token\":\"{token}\"}}}}\n")
                .as_bytes(),
        )
        .await
        .expect("write auth");
    let ok = next_line(&mut live, Duration::from_secs(10))
        .await
        .expect("auth answer");
    assert!(ok.contains("\"agent\":\"cli\""), "{ok}");
    // Revoked on the first: the second closes its connection.
    let revoked_at = Instant::now();
    token_cli(&a, &["revoke", &id]);
    let line = next_line(&mut live, Duration::from_secs(10))
        .await
        .expect("a closing line");
    println!(
        "revoked on one server → closed on the other in {:?}",
        revoked_at.elapsed()
    );
    assert!(line.contains("\"unauthorized\""), "{line}");
    let t = TcpTarget::new(&url_b, token, None).expect("target");
    let e = Client::connect_tcp(&t).await.err().expect("refused");
    assert_eq!(code(&e), "unauthorized", "{e}");
    drop(b);
}
