//! What a newcomer does on day one, taken from the README itself: copy
//! `config.example.toml`, run the quick start's commands, then every command
//! of "More to try" in order, and check the quick start still works after
//! them. The commands are parsed out of README.md, so this test follows the
//! README when it changes. Also: the integrations' agents are defined in the
//! example config, an agent refusal names its real cause, and `request`
//! prints the waiting request's id and how to approve it.

mod harness;

use harness::{config, Server, BIN};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(15);

/// The shell lines of the fenced block that follows the first line
/// containing `marker` in README.md.
fn readme_block(marker: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in README"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("end of block") + start;
    rest[start..end].lines().map(str::to_string).collect()
}

/// A README line split into its command(s) and the comment after `#`.
fn commands(line: &str) -> (Vec<String>, String) {
    let (cmd, comment) = match line
        .find("  #")
        .or_else(|| line.starts_with('#').then_some(0))
    {
        Some(i) => (
            &line[..i],
            line[i..].trim_start_matches([' ', '#']).to_string(),
        ),
        None => (line, String::new()),
    };
    let cmds = cmd
        .split(" ; ")
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("keyturn "))
        .collect();
    (cmds, comment)
}

struct Demo {
    dir: tempfile::TempDir,
    serve: Child,
    /// Keeps the server's stdout drained.
    _log: Receiver<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

/// Lines of `r`, sent as they come.
fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &Receiver<String>, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let until = Instant::now() + WITHIN;
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!("no line {what} within {WITHIN:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("stream ended before a line {what}"),
        }
    }
}

fn bin_dir() -> PathBuf {
    Path::new(BIN).parent().expect("bin dir").to_path_buf()
}

impl Demo {
    /// Copies config.example.toml into a fresh directory and runs the quick
    /// start's `serve` line there.
    fn start() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml"),
            dir.path().join("config.example.toml"),
        )
        .expect("copy config.example.toml");
        let serve_line = readme_block("## Quick start")
            .into_iter()
            .flat_map(|l| commands(&l).0)
            .find(|c| c.starts_with("keyturn serve"))
            .expect("a serve line in the quick start");
        let mut serve = Command::new("sh")
            .args(["-c", &format!("exec {serve_line}")])
            .current_dir(dir.path())
            .env("PATH", path_env())
            .env("NO_COLOR", "1")
            .env_remove("KEYTURN_CONFIG")
            .env_remove("KEYTURN_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let log = lines_of(serve.stdout.take().expect("stdout"));
        wait_line(&log, |l| l.contains("keyturn: listening on"), "listening");
        Demo {
            dir,
            serve,
            _log: log,
        }
    }

    fn sh(&self, cmd: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", cmd])
            .current_dir(self.dir.path())
            .env("PATH", path_env())
            .env("NO_COLOR", "1")
            .env_remove("KEYTURN_CONFIG")
            .env_remove("KEYTURN_ADMIN_SOCKET")
            .env_remove("KEYTURN_AGENT")
            .env_remove("KEYTURN_SOCKET")
            .env_remove("KEYTURN_AGENT_TOKEN")
            .stdin(Stdio::null());
        c
    }

    /// Runs `cmd` to its end: (exit code, stdout, stderr).
    fn run(&self, cmd: &str) -> (i32, String, String) {
        let out = self.sh(cmd).output().expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The quick start's terminal 2 and 3: the blocking request prints its
    /// id and how to approve it, `pending` lists it, `approve` unblocks it.
    fn quick_start(&self) {
        let lines: Vec<String> = readme_block("## Quick start")
            .into_iter()
            .flat_map(|l| commands(&l).0)
            .collect();
        let request = lines
            .iter()
            .find(|c| c.starts_with("keyturn request"))
            .expect("request line");
        let mut waiting = self
            .sh(request)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn request");
        let err = lines_of(waiting.stderr.take().expect("stderr"));
        let notice = wait_line(&err, |l| l.contains("is waiting for approval"), "notice");
        let id = notice
            .split("keyturn approve ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("id in the notice")
            .to_string();
        assert!(notice.contains(&format!("request {id} ")), "{notice}");
        for c in lines
            .iter()
            .filter(|c| !c.starts_with("keyturn serve") && !c.starts_with("keyturn request"))
        {
            let c = c.replace("<id>", &id);
            let (code, out, err) = self.run(&c);
            assert_eq!(code, 0, "{c}: {out}{err}");
            if c.starts_with("keyturn pending") {
                assert!(out.contains(&id), "{c} lists {id}: {out}");
            }
        }
        let until = Instant::now() + WITHIN;
        let status = loop {
            if let Some(s) = waiting.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < until,
                "request still waiting after approve"
            );
            // The request exits as soon as the approval reaches it.
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "approved request exits 0");
    }
}

fn path_env() -> String {
    format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn readme_quick_start_and_more_to_try_in_order_then_the_quick_start_still_works() {
    let demo = Demo::start();
    demo.quick_start();

    let mut code_for_pairing = None::<String>;
    for line in readme_block("More to try:") {
        let (cmds, comment) = commands(&line);
        for c in cmds {
            let c = match (&code_for_pairing, c.contains("<code>")) {
                (Some(code), true) => c.replace("<code>", code),
                (None, true) => panic!("{c}: no pairing code printed before it"),
                _ => c,
            };
            let (code, out, err) = demo.run(&c);
            if c.starts_with("keyturn request") && comment.starts_with("denied") {
                assert_eq!(code, 1, "{c} ({comment}): {out}{err}");
                if let Some(rule) = comment
                    .strip_prefix("denied: ")
                    .and_then(|r| r.split_whitespace().next())
                {
                    assert!(out.contains(rule), "{c}: names {rule}: {out}");
                }
            } else {
                assert_eq!(code, 0, "{c} ({comment}): {out}{err}");
            }
            if c.starts_with("keyturn pairing request") {
                code_for_pairing = out.rsplit(": ").next().map(|s| s.trim().to_string());
            }
        }
    }

    // The quick start still works: read_file approved by policy at once,
    // delete_file waits and is approved through `keyturn approve`.
    let (code, out, err) = demo.run("keyturn request --tool read_file --user 42 --channel 7");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("policy"), "{out}");
    demo.quick_start();
}

#[test]
fn the_integrations_agents_are_defined_and_a_refusal_names_its_cause() {
    let demo = Demo::start();
    // The hook's, the MCP proxy's and the example script's agents connect.
    for agent in ["claude-code", "mcp", "example"] {
        let (code, out, err) = demo.run(&format!("keyturn check --agent {agent} --tool read_file"));
        assert_eq!(code, 0, "{agent}: {out}{err}");
        assert!(!err.contains("agent_refused"), "{agent}: {err}");
    }
    // An unknown agent: the message says it is not configured and how to fix it.
    let (code, out, err) = demo.run("keyturn check --agent ghost --tool read_file");
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("agent `ghost` is not configured") && err.contains("[[agents]]"),
        "{err}"
    );
    assert!(!err.contains("from uid"), "not a uid problem: {err}");

    // Durations take units: a 1s deadline times the request out.
    let (code, out, err) =
        demo.run("keyturn request --tool delete_file --user 42 --channel 7 --timeout 1s");
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("timed out"), "{out}");
    assert!(err.contains("is waiting for approval"), "{err}");
}

#[test]
fn agent_refusals_name_uid_and_token_causes_without_the_token() {
    let other_uid = nix::unistd::getuid().as_raw() + 4242;
    let s = Server::start(
        config::claude_code,
        &format!(
            "[[agents]]\nname = \"tok\"\ntoken = \"s3cret-token-value\"\n\n\
         [[agents]]\nname = \"elsewhere\"\nuids = [{other_uid}]\n"
        ),
    );
    let msg = |agent: &str, token: Option<&str>| {
        let mut p = serde_json::json!({"agent": agent, "tool": "Read"});
        if let Some(t) = token {
            p["token"] = t.into();
        }
        let e = s.agent_rpc("check", p).expect_err("refused");
        assert_eq!(e["data"]["code"], "agent_refused", "{e}");
        e["message"].as_str().unwrap_or_default().to_string()
    };
    let m = msg("elsewhere", None);
    assert!(m.contains("from uid") && m.contains("uids"), "{m}");
    let m = msg("tok", None);
    assert!(
        m.contains("none was sent") && m.contains("KEYTURN_AGENT_TOKEN"),
        "{m}"
    );
    let m = msg("tok", Some("wrong"));
    assert!(m.contains("is wrong") && !m.contains("s3cret"), "{m}");
    assert!(s
        .agent_rpc(
            "check",
            serde_json::json!({"agent": "tok", "tool": "Read", "token": "s3cret-token-value"})
        )
        .is_ok());
}
