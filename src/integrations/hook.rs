//! `keyturn hook claude-code`: a Claude Code `PreToolUse` hook.
//!
//! Claude Code runs the hook before every tool call with one JSON object on
//! stdin and reads a permission decision from stdout. Without
//! `"onFailure": "block"` in settings.json, any exit code other than 0 or 2
//! (a mistyped binary: 127) and Claude Code's own hook timeout let the tool
//! run, so the documented snippet sets it, and this command answers with a
//! JSON `deny` (exit 0) for every failure it can see — no socket, garbage
//! input, a protocol error, a panic — and exits 2 only if it cannot even
//! write that answer. Its own wait always ends before Claude Code's hook
//! timeout (`--claude-timeout`), so a slow human is a *timed out* deny from
//! Keyturn, never Claude Code giving up on the hook. It uses blocking `std` I/O and no async runtime: it runs before
//! every tool call, so its start-up time is the product.

use super::{ask, policy_tool_name, Identity, Outcome};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Largest hook input read from stdin.
const MAX_INPUT_BYTES: u64 = 16 * 1024 * 1024;
/// Longest `idempotency_key` / `task_id` the gateway accepts.
const MAX_KEY_LEN: usize = 200;

#[derive(clap::Subcommand)]
pub enum HookCmd {
    /// Claude Code `PreToolUse` hook: reads the hook JSON on stdin, prints allow or deny.
    ClaudeCode(ClaudeCodeArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClaudeCodeArgs {
    /// Agent name (an `[[agents]]` entry in the config).
    #[arg(long, env = "KEYTURN_AGENT", default_value = "claude-code")]
    pub agent: String,
    /// Agent token, if the agent has one.
    #[arg(long, env = "KEYTURN_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Socket path (overrides the config).
    #[arg(long, env = "KEYTURN_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub url: super::UrlArgs,
    /// Config file (used to find the socket).
    #[arg(long, env = "KEYTURN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Longest wait for a human (`90s`, `9m`; a bare number is seconds). Must
    /// be below `--claude-timeout`; a longer one is cut to end
    /// [`CLAUDE_TIMEOUT_MARGIN`] before it, with a warning on stderr.
    #[arg(long, default_value = "540s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The hook's `timeout` in settings.json (Claude Code's default: 600 s).
    /// Claude Code stops waiting for the hook then; the hook answers first.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub claude_timeout: Duration,
    /// Nobody is watching: calls that need a human are denied at once.
    #[arg(long)]
    pub unattended: bool,
    /// On whose behalf (a paired user id).
    #[arg(long)]
    pub user: Option<String>,
    /// Channel id the work belongs to.
    #[arg(long)]
    pub channel: Option<String>,
}

/// How long before Claude Code's hook timeout the hook's own wait ends, so
/// it can cancel the request and answer in time.
pub const CLAUDE_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);

/// The hook's effective wait: `--timeout`, cut to end
/// [`CLAUDE_TIMEOUT_MARGIN`] before `--claude-timeout` (or at half of a
/// Claude timeout shorter than twice the margin). `Err` carries the warning
/// when it had to be cut.
pub fn effective_wait(timeout: Duration, claude: Duration) -> Result<Duration, (Duration, String)> {
    let limit = if claude > CLAUDE_TIMEOUT_MARGIN * 2 {
        claude - CLAUDE_TIMEOUT_MARGIN
    } else {
        claude / 2
    };
    if timeout <= limit {
        return Ok(timeout);
    }
    Err((
        limit,
        format!(
            "keyturn hook: --timeout {}s is not below Claude Code's hook timeout {}s \
             (--claude-timeout, settings.json `timeout`) by {}s; waiting {}s instead",
            timeout.as_secs(),
            claude.as_secs(),
            CLAUDE_TIMEOUT_MARGIN.as_secs(),
            limit.as_secs()
        ),
    ))
}

/// The shared duration parser (`90s`, `5m`, `1h`; a bare number is seconds).
pub use crate::config::parse_duration;

/// The fields of Claude Code's hook input that Keyturn uses; the rest
/// (`transcript_path`, `permission_mode`, …) is ignored.
#[derive(Debug, Deserialize)]
pub struct HookInput {
    pub session_id: Option<String>,
    pub cwd: Option<String>,
    pub hook_event_name: Option<String>,
    pub tool_name: String,
    #[serde(default)]
    pub tool_input: Value,
    pub tool_use_id: Option<String>,
}

/// `mcp__server__tool` → `mcp.server.tool`; other names as they are, with
/// characters policies cannot match replaced by `_`.
pub fn map_tool_name(name: &str) -> String {
    if let Some((server, tool)) = name
        .strip_prefix("mcp__")
        .and_then(|rest| rest.split_once("__"))
    {
        return policy_tool_name(&format!("mcp.{server}.{tool}"));
    }
    policy_tool_name(name)
}

/// A key the gateway accepts: as is when it fits, else its SHA-256.
fn key(s: &str) -> String {
    if s.len() <= MAX_KEY_LEN && !s.is_empty() && !s.chars().any(char::is_control) {
        s.to_string()
    } else {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(s.as_bytes())))
    }
}

/// The `submit` params for one hook input.
pub fn submission(input: &HookInput, a: &ClaudeCodeArgs) -> Value {
    let args = match &input.tool_input {
        Value::Object(_) => input.tool_input.clone(),
        Value::Null => json!({}),
        other => json!({ "input": other }),
    };
    let what = args
        .get("description")
        .and_then(Value::as_str)
        .map(|d| d.chars().take(1000).collect::<String>());
    let justification = match (&input.cwd, what) {
        (Some(cwd), Some(d)) => format!("Claude Code in {cwd}: {d}"),
        (Some(cwd), None) => format!("Claude Code in {cwd}"),
        (None, Some(d)) => format!("Claude Code: {d}"),
        (None, None) => "Claude Code".to_string(),
    };
    let mut p = json!({
        "tool": map_tool_name(&input.tool_name),
        "args": args,
        "justification": justification,
        "unattended": a.unattended,
    });
    if let Some(id) = &input.tool_use_id {
        p["idempotency_key"] = json!(key(id));
    }
    if let Some(s) = &input.session_id {
        p["task_id"] = json!(key(s));
    }
    if let Some(u) = &a.user {
        p["user_id"] = json!(u);
    }
    if let Some(c) = &a.channel {
        p["channel_id"] = json!(c);
    }
    p
}

/// Decides one hook input: `(allow, reason)`.
pub fn decide(raw: &[u8], a: &ClaudeCodeArgs) -> (bool, String) {
    let (allow, reason, _) = decide_input(raw, a);
    (allow, reason)
}

/// [`decide`], with the tool input to run instead when an approver edited
/// the call (`updatedInput`): `(allow, reason, updated_input)`. An edited
/// approval the hook cannot pass on exactly is a deny (fail closed).
pub fn decide_input(raw: &[u8], a: &ClaudeCodeArgs) -> (bool, String, Option<Value>) {
    let ((allow, edited), reason) = decide_inner(raw, a);
    match edited {
        Some(Ok(input)) => (allow, reason, Some(input)),
        Some(Err(why)) => (false, why, None),
        None => (allow, reason, None),
    }
}

/// The tool input an approver's edit replaces the call's with (`Err`: it
/// cannot be passed on); `None` when the call was not edited.
type Edited = Option<Result<Value, String>>;

fn decide_inner(raw: &[u8], a: &ClaudeCodeArgs) -> ((bool, Edited), String) {
    // Strict: a duplicate key or a number that would be rounded means the
    // approver could see other arguments than the tool reads.
    let input: HookInput = match crate::domain::canonical::parse_strict_slice(raw)
        .map_err(|e| e.to_string())
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
    {
        Ok(i) => i,
        Err(e) => {
            return (
                (false, None),
                format!(
                "Keyturn could not read the hook input ({e}); failing closed, the call was not run"
            ),
            )
        }
    };
    if let Some(ev) = input.hook_event_name.as_deref() {
        if ev != "PreToolUse" {
            return ((false, None), other_event_message(ev));
        }
    }
    let socket = match a.url.endpoint(a.socket.as_deref(), a.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            return (
                (false, None),
                format!("Keyturn could not be reached ({e}); failing closed, the call was not run"),
            )
        }
    };
    let id = Identity {
        socket,
        agent: a.agent.clone(),
        token: a.token.clone(),
    };
    let wait = effective_wait(a.timeout, a.claude_timeout).unwrap_or_else(|(cut, warning)| {
        crate::errln!("{warning}");
        cut
    });
    let outcome = ask(&id, submission(&input, a), wait);
    let edited = match &outcome {
        Outcome::Approved(d) if d.edited => Some(match (&input.tool_input, &d.args) {
            // The approver's edit replaces the tool input (`updatedInput`).
            (Value::Object(_), Some(args @ Value::Object(_))) => Ok(args.clone()),
            _ => Err(format!(
                "Keyturn {}: an approver edited this call, and its edited input cannot be passed \
                 on; failing closed, the call was not run",
                d.request_id
            )),
        }),
        _ => None,
    };
    let reason = match &edited {
        Some(Ok(_)) => format!("{} (the approver edited the tool input)", outcome.reason()),
        _ => outcome.reason(),
    };
    ((matches!(outcome, Outcome::Approved(_)), edited), reason)
}

/// Runs the hook: stdin in, one JSON line out, exit 0 (or 2 if stdout is gone).
/// The refusal for a hook input whose `hook_event_name` is set and is not
/// `PreToolUse`; `None` for PreToolUse, a missing name or unparsable input
/// (which [`decide`] answers).
fn other_event(raw: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let ev = v.get("hook_event_name")?.as_str()?;
    (ev != "PreToolUse").then(|| other_event_message(ev))
}

fn other_event_message(ev: &str) -> String {
    let shown: String = ev.chars().take(64).collect();
    format!(
        "keyturn hook claude-code answers only PreToolUse events, not {:?}: register it \
         under \"hooks\": {{\"PreToolUse\": ...}} in settings.json and nowhere else; \
         nothing was decided",
        shown
    )
}

pub fn main(cmd: HookCmd) -> u8 {
    let HookCmd::ClaudeCode(a) = cmd;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut raw = Vec::new();
        match std::io::stdin()
            .lock()
            .take(MAX_INPUT_BYTES)
            .read_to_end(&mut raw)
        {
            Ok(_) => match other_event(&raw) {
                Some(msg) => Err(msg),
                None => Ok(decide_input(&raw, &a)),
            },
            Err(e) => Ok((
                false,
                format!("Keyturn could not read stdin ({e}); failing closed"),
                None,
            )),
        }
    }));
    let (allow, reason, updated) = match result {
        Ok(Ok(r)) => r,
        // Another event: a PreToolUse answer would be the wrong shape for
        // it, so say why on stderr and exit 2 (Claude Code blocks where it
        // can and shows the text).
        Ok(Err(msg)) => {
            crate::errln!("{msg}");
            return 2;
        }
        Err(_) => (
            false,
            "Keyturn's hook hit an internal error; failing closed, the call was not run".into(),
            None,
        ),
    };
    let mut out = json!({"hookSpecificOutput": {
        "hookEventName": "PreToolUse",
        "permissionDecision": if allow { "allow" } else { "deny" },
        "permissionDecisionReason": reason,
    }});
    if let (true, Some(input)) = (allow, updated) {
        // An approver edited the call: Claude Code runs this input instead.
        out["hookSpecificOutput"]["updatedInput"] = input;
    }
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{out}").and_then(|_| stdout.flush()) {
        Ok(()) => 0,
        Err(_) => {
            // Exit 2 blocks the call and shows stderr to Claude.
            crate::errln!("{reason}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ClaudeCodeArgs {
        ClaudeCodeArgs {
            agent: "claude-code".into(),
            token: None,
            socket: Some("/nonexistent/keyturn.sock".into()),
            url: Default::default(),
            config: None,
            timeout: Duration::from_secs(1),
            claude_timeout: Duration::from_secs(600),
            unattended: false,
            user: None,
            channel: None,
        }
    }

    #[test]
    fn mcp_tool_names_map_to_dotted_names() {
        assert_eq!(
            map_tool_name("mcp__github__create_issue"),
            "mcp.github.create_issue"
        );
        assert_eq!(map_tool_name("mcp__my-srv__a__b"), "mcp.my-srv.a__b");
        assert_eq!(map_tool_name("Bash"), "Bash");
        assert_eq!(map_tool_name("mcp__solo"), "mcp__solo");
        assert_eq!(map_tool_name("weird name!"), "weird_name_");
    }

    #[test]
    fn submission_carries_ids_and_input() {
        let input: HookInput = serde_json::from_value(json!({
            "session_id": "s1", "cwd": "/p", "hook_event_name": "PreToolUse",
            "tool_name": "Bash", "tool_input": {"command": "ls", "description": "list"},
            "tool_use_id": "toolu_1", "permission_mode": "default", "extra": 1
        }))
        .unwrap();
        let p = submission(&input, &args());
        assert_eq!(p["tool"], "Bash");
        assert_eq!(p["args"], json!({"command": "ls", "description": "list"}));
        assert_eq!(p["idempotency_key"], "toolu_1");
        assert_eq!(p["task_id"], "s1");
        assert_eq!(p["justification"], "Claude Code in /p: list");
        let long = "x".repeat(300);
        assert!(key(&long).starts_with("sha256:"));
    }

    #[test]
    fn garbage_and_unreachable_socket_deny() {
        let (allow, why) = decide(b"not json", &args());
        assert!(
            !allow && why.contains("could not read the hook input"),
            "{why}"
        );
        let (allow, why) = decide(br#"{"tool_name":"Bash","tool_input":{}}"#, &args());
        assert!(!allow && why.contains("cannot connect"), "{why}");
    }

    #[test]
    fn the_wait_ends_before_claude_codes_timeout() {
        let s = Duration::from_secs;
        assert_eq!(effective_wait(s(540), s(600)), Ok(s(540)));
        assert_eq!(effective_wait(s(585), s(600)), Ok(s(585)));
        let (cut, why) = effective_wait(s(600), s(600)).unwrap_err();
        assert_eq!(cut, s(585));
        assert!(why.contains("--claude-timeout"), "{why}");
        assert_eq!(effective_wait(s(900), s(60)).unwrap_err().0, s(45));
        assert_eq!(effective_wait(s(30), s(20)).unwrap_err().0, s(10));
    }

    /// The settings.json snippets in the README and the integration guide:
    /// `onFailure` blocks, and the hook's own wait ends before Claude Code's
    /// hook timeout, which the command states with `--claude-timeout`.
    #[test]
    fn documented_snippets_block_on_failure_and_time_out_first() {
        for (name, text) in [
            ("README.md", include_str!("../../README.md")),
            (
                "docs/integrations.md",
                include_str!("../../docs/integrations.md"),
            ),
        ] {
            let mut found = 0;
            for block in text.split("```json").skip(1) {
                let Some(end) = block.find("```") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&block[..end]) else {
                    continue;
                };
                let Some(groups) = v["hooks"]["PreToolUse"].as_array() else {
                    continue;
                };
                for h in groups
                    .iter()
                    .flat_map(|g| g["hooks"].as_array().into_iter().flatten())
                {
                    let cmd = h["command"].as_str().unwrap_or_default();
                    if !cmd.contains("hook claude-code") {
                        continue;
                    }
                    found += 1;
                    assert_eq!(h["onFailure"], "block", "{name}: {h}");
                    let claude = h["timeout"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("{name}: {h}"));
                    let words: Vec<&str> = cmd.split_whitespace().collect();
                    let flag = |f: &str| {
                        words
                            .iter()
                            .position(|w| *w == f)
                            .and_then(|i| words.get(i + 1))
                            .map(|v| parse_duration(v).unwrap_or_else(|e| panic!("{name}: {e}")))
                            .unwrap_or_else(|| panic!("{name}: no {f} in {cmd}"))
                    };
                    let (hook, stated) = (flag("--timeout"), flag("--claude-timeout"));
                    assert_eq!(stated, Duration::from_secs(claude), "{name}: {cmd}");
                    assert_eq!(
                        effective_wait(hook, stated),
                        Ok(hook),
                        "{name}: --timeout must end before Claude Code's timeout"
                    );
                }
            }
            assert!(found >= 1, "{name}: no Claude Code hook snippet found");
        }
    }
}
