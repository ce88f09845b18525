//! Agents are never admins: admin methods only on the admin socket, no vote
//! from the uid that made a request, configs that would make agents admins
//! (or let them claim each other's names) refused, and operator names that
//! cannot pass for another uid. All through the real binary.

mod harness;

use harness::config::{self, write_config};
use harness::rpc::{err_code, submit};
use harness::{Server, BIN};
use keyturn::ipc::client::Client;
use serde_json::{json, Value};
use std::process::Command;

fn id_of(v: &Value) -> String {
    v["request_id"].as_str().expect("request_id").to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A pending high-risk request from agent `bot`, submitted on the agent socket.
async fn pending_request(s: &Server) -> String {
    let r = s
        .agent_client()
        .await
        .call(
            "submit",
            submit("delete_file", json!({"timeout_secs": 600})),
        )
        .await
        .expect("submit");
    assert_eq!(r["state"], "pending", "{r}");
    id_of(&r)
}

#[tokio::test]
async fn the_agent_socket_refuses_admin_methods_even_from_an_admin_uid() {
    // This uid is both the agent and the (only) admin: the worst case.
    let s = Server::start(config::files, "");
    let id = pending_request(&s).await;
    let mut agent = s.agent_client().await;
    for (method, params) in [
        ("approve", json!({"id": id, "operator": "mallory"})),
        ("deny", json!({"id": id})),
        ("pending", json!({})),
        ("stats", json!({})),
        ("grant", json!({"scope": "global", "tool": "*"})),
        ("tools.list", json!({})),
        ("pairing.add", json!({"user_id": "66"})),
        ("audit.tail", json!({})),
    ] {
        match agent.call(method, params).await {
            Err(keyturn::ipc::client::ClientError::Rpc(e)) => {
                assert_eq!(e.data.code, "not_admin", "{method}");
                assert!(
                    e.message.contains("admin socket"),
                    "{method}: {}",
                    e.message
                );
            }
            other => panic!("{method}: expected not_admin, got {other:?}"),
        }
    }
    // Nor may the agent socket act on any request without naming its agent.
    assert_eq!(
        err_code(agent.call("status", json!({"id": id})).await),
        "invalid_params"
    );
    assert_eq!(agent.call("ping", json!({})).await.unwrap()["admin"], false);
    // Nothing was decided: still pending, and the admin socket can approve.
    let d = agent
        .call("status", json!({"agent": "bot", "id": id}))
        .await
        .unwrap();
    assert_eq!(d["state"], "pending");
    let mut admin = s.client().await;
    assert_eq!(admin.call("ping", json!({})).await.unwrap()["admin"], true);
    let v = admin
        .call("approve", json!({"id": id, "operator": "alice"}))
        .await
        .unwrap();
    assert_eq!(v["decision"]["state"], "approved");
}

#[tokio::test]
async fn the_admin_socket_refuses_a_uid_that_is_not_an_admin() {
    let s = Server::start(config::files, "[admin]\nuids = [4000000001]\n");
    let mut admin = Client::connect(s.admin_socket()).await.unwrap();
    assert_eq!(
        err_code(admin.call("pending", json!({})).await),
        "not_admin"
    );
    // Agents still work on their socket.
    let r = s
        .agent_client()
        .await
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["state"], "approved");
}

#[tokio::test]
async fn the_cli_approves_through_the_admin_socket_only() {
    let s = Server::start(config::files, "");
    let id = pending_request(&s).await;
    // Pointed at the agent socket, approve is refused and changes nothing.
    let out = Command::new(BIN)
        .args(["approve", &id, "--admin-socket"])
        .arg(s.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stderr(&out).contains("not_admin"), "{}", stderr(&out));
    let d = s
        .agent_client()
        .await
        .call("status", json!({"agent": "bot", "id": id}))
        .await
        .unwrap();
    assert_eq!(d["state"], "pending");
    // Found through --config, it works.
    let out = s.cli(&["approve", &id, "--reason", "ok", "--as", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("approved by alice (uid:"),
        "{}",
        stdout(&out)
    );
    // And through KEYTURN_ADMIN_SOCKET.
    let id2 = pending_request(&s).await;
    let out = Command::new(BIN)
        .args(["deny", &id2, "--json"])
        .env("KEYTURN_ADMIN_SOCKET", s.admin_socket())
        .env_remove("KEYTURN_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["state"], "denied");
}

/// `bot` and `cli` on another uid, each with a token: a config that passes
/// without the demo switch (this test's uid is then only the admin).
fn production_config(dir: &std::path::Path, admin_extra: &str) -> String {
    config::files(
        dir,
        &format!("[admin]\nsingle_user_demo = false\n{admin_extra}"),
    )
    .replace(
        "name = \"bot\"",
        "name = \"bot\"\nuids = [4000000002]\ntoken = \"bot-token\"",
    )
    .replace(
        "name = \"cli\"",
        "name = \"cli\"\nuids = [4000000002]\ntoken = \"cli-token\"",
    )
}

#[tokio::test]
async fn a_vote_from_the_uid_that_made_the_request_is_refused() {
    // The request is made as this uid (demo config), then the server comes
    // back with agents on their own uid and this uid as the admin: the
    // admin's uid made the request, so it may not vote on it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mut s = Server::start_in(dir, &config::files(&path, ""));
    let id = pending_request(&s).await;
    let me = nix::unistd::getuid().as_raw();
    let listed = s.client().await.call("pending", json!({})).await.unwrap();
    assert_eq!(listed[0]["requester_uid"], me, "{listed}");

    write_config(&s.config, &production_config(&path, ""));
    s.kill_and_restart();
    // Only the first (demo) run said it was a demo.
    assert_eq!(
        s.log().matches("single-user demo mode").count(),
        1,
        "{}",
        s.log()
    );
    let mut admin = s.client().await;
    for method in ["approve", "deny"] {
        assert_eq!(
            err_code(admin.call(method, json!({"id": id})).await),
            "self_approval",
            "{method}"
        );
    }
    // The CLI gets the same answer.
    let out = s.cli(&["approve", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("self_approval"), "{}", stderr(&out));
    let d = admin.call("status", json!({"id": id})).await.unwrap();
    assert_eq!(d["state"], "pending");

    // Only an explicit switch allows it.
    write_config(
        &s.config,
        &production_config(&path, "allow_self_approval = true\n"),
    );
    s.kill_and_restart();
    let v = s
        .client()
        .await
        .call("approve", json!({"id": id}))
        .await
        .unwrap();
    assert_eq!(v["decision"]["state"], "approved");
}

fn check_config(text: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    write_config(&p, text);
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", "--config"]).arg(&p);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), stdout(&out), stderr(&out))
}

#[test]
fn check_config_and_serve_refuse_agents_running_as_the_server_uid() {
    let me = nix::unistd::getuid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    // The shipped default: agents with `uids = []`, i.e. the server's uid.
    let text = config::files(dir.path(), "[admin]\nsingle_user_demo = false\n");
    let (code, _, err) = check_config(&text, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("agents[0].uids")
            && err.contains("`bot`")
            && err.contains(&format!("uid {me}")),
        "{err}"
    );
    assert!(err.contains("single_user_demo"), "{err}");
    // An agent on an admin uid (not the server's).
    let admin_agent = config::files(
        dir.path(),
        "[admin]\nsingle_user_demo = false\nuids = [4000000001]\n",
    )
    .replace("name = \"bot\"", "name = \"bot\"\nuids = [4000000001]");
    let (code, _, err) = check_config(&admin_agent, &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("4000000001") && err.contains("admin uid"),
        "{err}"
    );
    // serve refuses the same file before creating anything.
    let p = dir.path().join("config.toml");
    write_config(&p, &text);
    let out = harness::serve_command(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("agents[0].uids"), "{}", stderr(&out));
    assert!(!dir.path().join("k.db").exists());
    assert!(!dir.path().join("k.sock").exists());
    assert!(!dir.path().join("keyturn-admin.sock").exists());
    // The real layout passes.
    let (code, out, err) = check_config(&production_config(dir.path(), ""), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains("DEMO"), "{out}");
}

#[test]
fn check_config_refuses_token_less_agents_sharing_a_uid() {
    let dir = tempfile::tempdir().unwrap();
    let shared = production_config(dir.path(), "").replace("token = \"cli-token\"", "");
    let (code, _, err) = check_config(&shared, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("agents[1].token") && err.contains("share uid 4000000002"),
        "{err}"
    );
    assert!(err.contains("KEYTURN_AGENT_CLI_TOKEN"), "{err}");
    // A token from the environment counts.
    let (code, _, err) = check_config(&shared, &[("KEYTURN_AGENT_CLI_TOKEN", "from-env")]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn the_demo_switch_is_named_at_start_and_by_check_config() {
    let s = Server::start(config::files, "");
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("single-user demo mode"))
        .unwrap_or_else(|| panic!("no demo sentence in the log:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("read and write its database") && line.contains("approve their own calls"),
        "{line}"
    );
    let (code, out, err) = check_config(&std::fs::read_to_string(&s.config).unwrap(), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("SINGLE-USER DEMO"), "{out}");
}

#[tokio::test]
async fn an_operator_name_cannot_read_as_another_uid() {
    let s = Server::start(config::files, "");
    let me = nix::unistd::getuid().as_raw();
    let id = pending_request(&s).await;
    let mut admin = s.client().await;
    for name in [
        "alice (uid:1000)",
        "uid:1000",
        "a, bob (uid:1000)",
        "ali\u{202e}ce",
    ] {
        assert_eq!(
            err_code(
                admin
                    .call("approve", json!({"id": id, "operator": name}))
                    .await
            ),
            "invalid_params",
            "{name:?}"
        );
    }
    let out = s.cli(&["approve", &id, "--as", "alice (uid:1000)"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("operator name"), "{}", stderr(&out));
    let d = admin.call("status", json!({"id": id})).await.unwrap();
    assert_eq!(d["state"], "pending", "a refused name changes nothing");
    let out = s.cli(&["approve", &id, "--as", "alice", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["who"], format!("alice (uid:{me})"));
}

#[test]
fn the_admin_socket_has_its_own_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = Server::start(config::files, "");
    let meta = std::fs::metadata(s.admin_socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    drop(s);
    let gid = nix::unistd::getgid().as_raw();
    let s = Server::start(
        config::files,
        &format!("[admin]\nsocket_mode = \"0660\"\nsocket_group = \"{gid}\"\n"),
    );
    let meta = std::fs::metadata(s.admin_socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    // The agent socket keeps its own (default) mode.
    let agent = std::fs::metadata(s.socket()).unwrap();
    assert_eq!(agent.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn every_admin_method_is_refused_on_the_agent_socket_whatever_its_params() {
    // This uid is both the agent and the (only) admin. Every admin method
    // the server knows, with params it would refuse as well: the refusal is
    // `not_admin`, decided before the params are judged.
    let s = Server::start(config::files, "");
    let mut agent = s.agent_client().await;
    let admin = keyturn::ipc::protocol::MethodName::ALL
        .iter()
        .filter(|m| m.requires_admin());
    for m in admin {
        for params in [json!({}), json!({"id": "not-a-uuid", "no_such_param": 1})] {
            match agent.call(m.as_str(), params).await {
                Err(keyturn::ipc::client::ClientError::Rpc(e)) => {
                    assert_eq!(e.data.code, "not_admin", "{}", m.as_str());
                    assert!(e.message.contains("admin socket"), "{}", e.message);
                }
                other => panic!("{}: expected not_admin, got {other:?}", m.as_str()),
            }
        }
    }
}
