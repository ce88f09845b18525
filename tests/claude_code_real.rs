//! Keyturn's `PreToolUse` hook inside the real Claude Code CLI (installed by
//! `.ci/run` into target/claude-code), pointed with `ANTHROPIC_BASE_URL` at a
//! stand-in Anthropic Messages API written here (axum). The stand-in answers
//! each turn from a script of `Bash` tool calls, streamed as the real API
//! streams them, and records every request, so a test sees the
//! `tool_result` Claude Code sent back: whether the command ran, or the
//! hook's reason for blocking it. Each command touches a marker file, so
//! "it ran" is a file on disk, not a claim. Without Claude Code the tests
//! fail under `CI=true` and are skipped, loudly, elsewhere.

mod harness;

use harness::{config, Server, BIN};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a whole `claude -p` run may take before the test fails.
const CLAUDE_DEADLINE: Duration = Duration::from_secs(60);

fn claude_bin() -> Option<PathBuf> {
    let p = std::env::var_os("KEYTURN_CLAUDE_CODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/claude-code/node_modules/.bin/claude")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "Claude Code is required under CI at {}; .ci/run installs it",
            p.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: Claude Code not installed at {} (run .ci/run) ***\n",
        p.display()
    );
    None
}

// ---------------------------------------------------------------- stand-in

/// One tool call the stand-in model makes: a `Bash` tool_use.
#[derive(Clone)]
struct Call {
    id: String,
    command: String,
}

/// Every request the stand-in received: (method, path, JSON body or null,
/// when it arrived).
#[derive(Default)]
struct Log {
    requests: Mutex<Vec<(String, String, Value, Instant)>>,
    changed: Condvar,
}

/// A stand-in for `POST /v1/messages`: the N-th request (0-based) that offers
/// tools answers with script[N] as a streamed `tool_use`, and once the
/// script is done with a short text and `end_turn`. Turns are counted by
/// requests, not by the assistant messages in the history: Claude Code
/// 2.1.332 leaves a turn whose tool_use id repeats an earlier one out of the
/// history it sends, so counting those would replay the script forever.
struct StandIn {
    url: String,
    log: Arc<Log>,
    _rt: tokio::runtime::Runtime,
}

fn sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect()
}

/// The streamed answer for one turn: a tool call, or text that ends the turn.
fn stream_for(model: &str, call: Option<&Call>) -> String {
    let start = json!({"type": "message_start", "message": {
        "id": "msg_standin", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 1, "output_tokens": 1}}});
    let (block, delta, stop) = match call {
        Some(c) => (
            json!({"type": "tool_use", "id": c.id, "name": "Bash", "input": {}}),
            json!({"type": "input_json_delta", "partial_json":
                json!({"command": c.command, "description": "touch a marker"}).to_string()}),
            "tool_use",
        ),
        None => (
            json!({"type": "text", "text": ""}),
            json!({"type": "text_delta", "text": "All done."}),
            "end_turn",
        ),
    };
    sse(&[
        start,
        json!({"type": "content_block_start", "index": 0, "content_block": block}),
        json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": 1}}),
        json!({"type": "message_stop"}),
    ])
}

fn answer(script: &[Call], turns: &AtomicUsize, body: &Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Side requests without tools (none seen in 2.1.332) just get text.
    let call = if body.get("tools").is_some() {
        script.get(turns.fetch_add(1, Ordering::SeqCst))
    } else {
        None
    };
    let model = body["model"].as_str().unwrap_or("claude-standin");
    if body["stream"] == true {
        (
            [("content-type", "text/event-stream")],
            stream_for(model, call),
        )
            .into_response()
    } else {
        let content = match call {
            Some(c) => json!([{"type": "tool_use", "id": c.id, "name": "Bash",
                "input": {"command": c.command, "description": "touch a marker"}}]),
            None => json!([{"type": "text", "text": "All done."}]),
        };
        axum::Json(
            json!({"id": "msg_standin", "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": if call.is_some() { "tool_use" } else { "end_turn" },
            "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}}),
        )
        .into_response()
    }
}

impl StandIn {
    fn start(script: Vec<Call>) -> StandIn {
        use axum::extract::{Request, State};
        use axum::response::IntoResponse;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let log = Arc::new(Log::default());
        let state = (log.clone(), Arc::new(script), Arc::new(AtomicUsize::new(0)));
        type Shared = (Arc<Log>, Arc<Vec<Call>>, Arc<AtomicUsize>);
        let app = axum::Router::new().fallback(
            |State((log, script, turns)): State<Shared>, req: Request| async move {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let at = Instant::now();
                let bytes = axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024)
                    .await
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let resp = match (method.as_str(), path.as_str()) {
                    ("POST", "/v1/messages") => answer(&script, &turns, &body),
                    ("POST", "/v1/messages/count_tokens") => {
                        axum::Json(json!({"input_tokens": 1})).into_response()
                    }
                    ("GET", _) => {
                        axum::Json(json!({"data": [], "has_more": false})).into_response()
                    }
                    _ => {
                        eprintln!("stand-in: unexpected {method} {path}");
                        (axum::http::StatusCode::NOT_FOUND, "").into_response()
                    }
                };
                let mut r = log.requests.lock().expect("lock");
                r.push((method, path, body, at));
                log.changed.notify_all();
                resp
            },
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move {
            let _ = axum::serve(listener, app.with_state(state)).await;
        });
        StandIn {
            url: format!("http://{addr}"),
            log,
            _rt: rt,
        }
    }

    /// Every `POST /v1/messages` body received so far.
    fn messages(&self) -> Vec<Value> {
        self.log
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(m, p, _, _)| m == "POST" && p == "/v1/messages")
            .map(|(_, _, b, _)| b.clone())
            .collect()
    }

    /// Waits until a `/v1/messages` request carries a `tool_result` for
    /// the `n`-th (0-based) tool call, and returns that block.
    fn wait_tool_result(&self, n: usize, within: Duration) -> Value {
        let until = Instant::now() + within;
        let mut reqs = self.log.requests.lock().expect("lock");
        loop {
            let found = reqs
                .iter()
                .filter_map(|(_, _, b, _)| nth_tool_result(b, n))
                .next();
            if let Some(r) = found {
                return r;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no tool_result #{n} within {within:?}");
            reqs = self.log.changed.wait_timeout(reqs, left).expect("lock").0;
        }
    }

    /// Waits until the first request arrived; returns when it did.
    fn wait_first_request(&self, within: Duration) -> Instant {
        let until = Instant::now() + within;
        let mut reqs = self.log.requests.lock().expect("lock");
        loop {
            if let Some((_, _, _, at)) = reqs.first() {
                return *at;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "Claude Code sent no request within {within:?}"
            );
            reqs = self.log.changed.wait_timeout(reqs, left).expect("lock").0;
        }
    }

    /// Every method and path requested, in order (for the report).
    fn paths(&self) -> Vec<String> {
        self.log
            .requests
            .lock()
            .expect("lock")
            .iter()
            .map(|(m, p, _, _)| format!("{m} {p}"))
            .collect()
    }
}

/// The `n`-th `tool_result` block in a request's conversation.
fn nth_tool_result(body: &Value, n: usize) -> Option<Value> {
    body["messages"]
        .as_array()?
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|c| c["type"] == "tool_result")
        .nth(n)
        .cloned()
}

/// A tool_result's text, whether `content` is a string or text blocks.
fn result_text(r: &Value) -> String {
    match &r["content"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(|c| c["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

// ------------------------------------------------------------- claude -p

struct Run {
    code: Option<i32>,
    started: Instant,
    /// `--output-format stream-json` lines: Claude Code's own transcript.
    transcript: Vec<Value>,
    stderr: String,
    took: Duration,
}

impl Run {
    /// The `tool_result` blocks of the transcript, in order. Unlike the
    /// history sent to the API, this keeps every turn.
    fn tool_results(&self) -> Vec<Value> {
        self.transcript
            .iter()
            .filter(|l| l["type"] == "user")
            .filter_map(|l| l["message"]["content"].as_array())
            .flatten()
            .filter(|c| c["type"] == "tool_result")
            .cloned()
            .collect()
    }

    /// The final `result` line's text.
    fn result(&self) -> String {
        self.transcript
            .iter()
            .rfind(|l| l["type"] == "result")
            .map(|l| l["result"].to_string())
            .unwrap_or_default()
    }
}

/// A temp project for one Claude Code run: its `HOME`, cwd and settings.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("home")).expect("mkdir home");
        std::fs::create_dir(dir.path().join("work")).expect("mkdir work");
        Project { dir }
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.dir.path().join("work").join(name)
    }

    /// A call that creates marker `name`.
    fn touch(&self, id: &str, name: &str) -> Call {
        Call {
            id: id.into(),
            command: format!("touch {}", self.marker(name).display()),
        }
    }
}

/// The README's hook entry (its `command` and `timeout` replaced).
fn hook_entry(command: &str, claude_timeout: u64, on_failure_block: bool) -> Value {
    let mut h = json!({"type": "command", "command": command, "timeout": claude_timeout});
    if on_failure_block {
        h["onFailure"] = json!("block");
    }
    h
}

/// The command line of the README's snippet, for this server.
fn keyturn_hook(socket: &Path) -> String {
    format!(
        "'{BIN}' hook claude-code --socket '{}' --timeout 540 --claude-timeout 600",
        socket.display()
    )
}

/// settings.json: `Bash` allowed by Claude Code's own permissions, so only
/// the hook decides.
fn settings(hook: Value) -> Value {
    json!({
        "permissions": {"allow": ["Bash"]},
        "hooks": {"PreToolUse": [{"matcher": "*", "hooks": [hook]}]}
    })
}

/// Runs `claude -p` in `project` against `api` with `settings`, to exit or
/// [`CLAUDE_DEADLINE`] (then it is killed and the test fails).
fn claude(claude: &Path, project: &Project, api: &StandIn, settings: &Value) -> Run {
    let file = project.dir.path().join("settings.json");
    std::fs::write(&file, settings.to_string()).expect("write settings");
    let started = Instant::now();
    let mut cmd = Command::new(claude);
    cmd.args(["-p", "Touch the marker file, please."])
        .args(["--output-format", "stream-json", "--verbose", "--settings"])
        .arg(&file)
        .current_dir(project.dir.path().join("work"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", project.dir.path().join("home"))
        .env("ANTHROPIC_BASE_URL", &api.url)
        .env("ANTHROPIC_API_KEY", "test")
        .env("DISABLE_TELEMETRY", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn claude");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(CLAUDE_DEADLINE) {
        Ok(out) => out.expect("wait claude"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("claude -p did not exit within {CLAUDE_DEADLINE:?}");
        }
    };
    let run = Run {
        code: out.status.code(),
        started,
        transcript: String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    };
    eprintln!(
        "claude -p exited {:?} after {:?}; result {}; stderr {:?}; API calls {:?}",
        run.code,
        run.took,
        run.result(),
        run.stderr.trim(),
        api.paths()
    );
    run
}

/// Runs `claude` on a thread, so the test can act (approve, deny) meanwhile.
fn claude_in_background(
    bin: PathBuf,
    project: Arc<Project>,
    api: Arc<StandIn>,
    settings: Value,
) -> std::thread::JoinHandle<Run> {
    std::thread::spawn(move || claude(&bin, &project, &api, &settings))
}

/// The id of the hook's request, once Claude Code (start-up: about a second
/// here, more on a loaded machine) has asked the stand-in and run the hook.
fn queued(s: &Server, api: &StandIn) -> String {
    api.wait_first_request(CLAUDE_DEADLINE);
    s.wait_queued("Bash")
}

// ------------------------------------------------------------------ tests

/// The baseline every figure is measured against: no hook at all.
#[test]
fn claude_code_runs_the_stand_ins_tool_call_without_a_hook() {
    let Some(bin) = claude_bin() else { return };
    let p = Project::new();
    let api = StandIn::start(vec![p.touch("toolu_plain", "plain")]);
    let run = claude(&bin, &p, &api, &json!({"permissions": {"allow": ["Bash"]}}));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(p.marker("plain").exists());
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    assert_eq!(r["tool_use_id"], "toolu_plain", "{r}");
    assert_ne!(r["is_error"], true, "{r}");
    eprintln!(
        "FIGURE: no hook: spawn to first API request {:?}, spawn to exit (two turns) {:?}",
        api.wait_first_request(Duration::ZERO)
            .duration_since(run.started),
        run.took
    );
}

#[test]
fn a_human_approval_lets_the_command_run() {
    let Some(bin) = claude_bin() else { return };
    let s = Server::start(config::claude_code, "");
    let p = Arc::new(Project::new());
    let api = Arc::new(StandIn::start(vec![p.touch("toolu_ok", "approved")]));
    let started = Instant::now();
    let running = claude_in_background(
        bin,
        p.clone(),
        api.clone(),
        settings(hook_entry(&keyturn_hook(s.socket()), 600, true)),
    );
    let id = queued(&s, &api);
    let queued = started.elapsed();
    assert!(!p.marker("approved").exists(), "ran before the approval");
    s.approve(&id, "fine to touch");
    let run = running.join().expect("claude thread");
    eprintln!(
        "FIGURE: approve case: Bash queued {queued:?} after spawn, claude exited after {:?}",
        run.took
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        p.marker("approved").exists(),
        "the approved command did not run"
    );
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    assert_eq!(r["tool_use_id"], "toolu_ok", "{r}");
    assert_ne!(r["is_error"], true, "{r}");
}

#[test]
fn a_human_denial_blocks_the_command_and_claude_sees_why() {
    let Some(bin) = claude_bin() else { return };
    let s = Server::start(config::claude_code, "");
    let p = Arc::new(Project::new());
    let api = Arc::new(StandIn::start(vec![p.touch("toolu_no", "denied")]));
    let running = claude_in_background(
        bin,
        p.clone(),
        api.clone(),
        settings(hook_entry(&keyturn_hook(s.socket()), 600, true)),
    );
    let id = queued(&s, &api);
    s.deny(&id, "not on a Friday");
    let run = running.join().expect("claude thread");
    eprintln!("FIGURE: deny case: claude exited after {:?}", run.took);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!p.marker("denied").exists(), "a denied command ran");
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    let text = result_text(&r);
    eprintln!("OBSERVED: tool_result after a denial: {r}");
    assert_eq!(r["is_error"], true, "{r}");
    assert!(
        text.contains(&format!("Keyturn {id}"))
            && text.contains("denied by")
            && text.contains("not on a Friday")
            && text.contains("the call was not run"),
        "{text}"
    );
}

#[test]
fn a_policy_deny_blocks_the_command_without_asking_anyone() {
    let Some(bin) = claude_bin() else { return };
    let s = Server::start(
        config::claude_code,
        "[[grants]]\nscope = \"agent:claude-code\"\ntool = \"Bash\"\neffect = \"deny\"\n",
    );
    let p = Project::new();
    let api = StandIn::start(vec![p.touch("toolu_policy", "policy")]);
    let run = claude(
        &bin,
        &p,
        &api,
        &settings(hook_entry(&keyturn_hook(s.socket()), 600, true)),
    );
    eprintln!(
        "FIGURE: policy deny case: claude exited after {:?}",
        run.took
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!p.marker("policy").exists(), "a denied command ran");
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    let text = result_text(&r);
    assert_eq!(r["is_error"], true, "{r}");
    assert!(
        text.contains("Keyturn") && text.contains("the call was not run"),
        "{text}"
    );
    let pending = s.rpc("pending", json!({})).expect("pending");
    assert_eq!(pending.as_array().map(Vec::len), Some(0), "{pending}");
}

/// A hook command that cannot start (exit 127 from the shell): with
/// `"onFailure": "block"` the call is blocked; without it Claude Code 2.1.332
/// runs the command anyway. That is why the README's snippet carries it.
#[test]
fn a_mistyped_hook_path_blocks_only_with_on_failure_block() {
    let Some(bin) = claude_bin() else { return };
    let missing = "/nonexistent/keyturn hook claude-code --socket /nonexistent/k.sock \
                   --timeout 540 --claude-timeout 600";

    let p = Project::new();
    let api = StandIn::start(vec![p.touch("toolu_typo", "blocked")]);
    let run = claude(&bin, &p, &api, &settings(hook_entry(missing, 600, true)));
    eprintln!(
        "FIGURE: mistyped hook, onFailure block: claude exited after {:?}",
        run.took
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!p.marker("blocked").exists(), "onFailure block let it run");
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    eprintln!("OBSERVED: tool_result, mistyped hook with onFailure block: {r}");
    assert_eq!(r["is_error"], true, "{r}");
    assert!(result_text(&r).contains("onFailure"), "{r}");

    let p = Project::new();
    let api = StandIn::start(vec![p.touch("toolu_typo", "ran")]);
    let run = claude(&bin, &p, &api, &settings(hook_entry(missing, 600, false)));
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    eprintln!(
        "OBSERVED: mistyped hook WITHOUT onFailure: marker exists = {}, tool_result {r}",
        p.marker("ran").exists()
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Claude Code's documented behaviour for a hook exit other than 0 or 2:
    // report it and go ahead. Asserted so a change in Claude Code is noticed.
    assert!(
        p.marker("ran").exists(),
        "Claude Code no longer runs the tool when the hook fails without onFailure"
    );
}

/// Claude Code reuses nothing by itself, but the model picks the tool_use
/// ids: one id for two different commands must not carry the first
/// approval over to the second.
#[test]
fn a_reused_tool_use_id_for_another_command_is_denied() {
    let Some(bin) = claude_bin() else { return };
    let s = Server::start(config::claude_code, "");
    let p = Arc::new(Project::new());
    let api = Arc::new(StandIn::start(vec![
        p.touch("toolu_same", "first"),
        p.touch("toolu_same", "second"),
    ]));
    let running = claude_in_background(
        bin,
        p.clone(),
        api.clone(),
        settings(hook_entry(&keyturn_hook(s.socket()), 600, true)),
    );
    let id = queued(&s, &api);
    s.approve(&id, "the first one only");
    let run = running.join().expect("claude thread");
    eprintln!("FIGURE: reused id case: claude exited after {:?}", run.took);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        p.marker("first").exists(),
        "the approved command did not run"
    );
    assert!(!p.marker("second").exists(), "the approval was reused");
    // Claude Code's transcript has both calls; the history it sends the API
    // leaves out the second (same id), so its result is read from the former.
    let results = run.tool_results();
    assert_eq!(results.len(), 2, "{results:?}");
    let second = &results[1];
    eprintln!("OBSERVED: second tool_result (transcript): {second}");
    assert_eq!(second["tool_use_id"], "toolu_same", "{second}");
    assert_eq!(second["is_error"], true, "{second}");
    assert!(
        result_text(second).contains("idempotency_conflict")
            && result_text(second).contains("the call was not run"),
        "{second}"
    );
    let sent = api.messages();
    assert_eq!(sent.len(), 3, "{:?}", api.paths());
    eprintln!(
        "OBSERVED: tool_results in the last API request: {:?}",
        (0..3)
            .map_while(|n| nth_tool_result(&sent[2], n))
            .map(|r| result_text(&r))
            .collect::<Vec<_>>()
    );
}

/// Claude Code's own hook `timeout` (2 s) fires long before the hook's wait
/// (540 s, the command lying that Claude's is 600 s): with onFailure the call
/// is blocked, and the killed hook's request is withdrawn (`client_gone`),
/// so a late approval can run nothing. Without onFailure the command runs.
#[test]
fn claude_codes_hook_timeout_blocks_and_withdraws_the_request() {
    let Some(bin) = claude_bin() else { return };
    let s = Server::start(config::claude_code, "");
    let p = Arc::new(Project::new());
    let api = Arc::new(StandIn::start(vec![p.touch("toolu_slow", "slow")]));
    let running = claude_in_background(
        bin,
        p.clone(),
        api.clone(),
        settings(hook_entry(&keyturn_hook(s.socket()), 2, true)),
    );
    let id = queued(&s, &api);
    let run = running.join().expect("claude thread");
    eprintln!(
        "FIGURE: hook timeout case: claude exited after {:?}",
        run.took
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!p.marker("slow").exists(), "a timed-out hook let it run");
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    eprintln!("OBSERVED: tool_result after Claude Code's hook timeout: {r}");
    assert_eq!(r["is_error"], true, "{r}");
    s.wait_log(
        |l| l.contains("the client went away; request cancelled") && l.contains(&id),
        Duration::from_secs(10),
    );
    let st = s.rpc("status", json!({"id": id})).expect("status");
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["reason"], "client_gone", "{st}");
    let late = s
        .rpc("approve", json!({"id": id, "reason": "too late"}))
        .expect_err("approving a withdrawn request must fail");
    assert_eq!(late["data"]["code"], "already_decided", "{late}");

    // The same without onFailure: Claude Code gives up on the hook and runs
    // the command (what the README warns about), while Keyturn still
    // withdraws the request, so no card is left for a late click.
    let p = Arc::new(Project::new());
    let api = Arc::new(StandIn::start(vec![p.touch("toolu_slow_open", "open")]));
    let running = claude_in_background(
        claude_bin().expect("claude"),
        p.clone(),
        api.clone(),
        settings(hook_entry(&keyturn_hook(s.socket()), 2, false)),
    );
    let id = queued(&s, &api);
    let run = running.join().expect("claude thread");
    let r = api.wait_tool_result(0, Duration::from_secs(1));
    eprintln!(
        "OBSERVED: hook timeout WITHOUT onFailure: marker exists = {}, tool_result {r}",
        p.marker("open").exists()
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        p.marker("open").exists(),
        "Claude Code no longer runs the tool when the hook times out without onFailure"
    );
    s.wait_log(
        |l| l.contains("the client went away; request cancelled") && l.contains(&id),
        Duration::from_secs(10),
    );
}
