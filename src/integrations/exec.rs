//! `keyturn exec --tool NAME -- cmd args…`: ask Keyturn, then run a command.
//!
//! The request's arguments are the command line and the working directory
//! (`{"argv": [...], "cwd": "..."}`), so the human sees exactly what will
//! run. Only an approval runs it; a denial, a timeout or any failure to reach
//! Keyturn exits 126 without running anything. The command gets a minimal
//! environment (`PATH`, `HOME`, `LANG`, `TERM` and the names declared with
//! `--keep-env` or `[exec] keep_env`): tokens and keys in the caller's
//! environment (`GITHUB_TOKEN`, `AWS_SECRET_ACCESS_KEY`, Keyturn's own agent
//! token) never reach it unless named, and a few never at all. It also gets a
//! wall-clock limit, and its output is cut at a configurable size with a
//! visible marker. Blocking `std` only, no runtime.

use super::hook::parse_duration;
use super::{ask_announcing, Identity, Outcome};
use serde_json::json;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Not approved (denied, timed out, or Keyturn unreachable): like a shell's
/// "found but cannot execute".
pub const EXIT_NOT_APPROVED: u8 = 126;
/// The command could not be found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// The command ran past `--timeout` and was killed (as `timeout(1)` does).
pub const EXIT_TIMED_OUT: u8 = 124;

#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    /// Tool name the policy sees, e.g. `shell.deploy`.
    #[arg(long)]
    pub tool: String,
    /// Why the agent wants to run it (shown to the approver).
    #[arg(long, default_value = "")]
    pub justification: String,
    /// Agent name.
    #[arg(long, env = "KEYTURN_AGENT", default_value = "cli")]
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
    /// On whose behalf (a paired user id).
    #[arg(long)]
    pub user: Option<String>,
    /// Channel id the work belongs to.
    #[arg(long)]
    pub channel: Option<String>,
    /// Task id (for per-task budgets).
    #[arg(long)]
    pub task: Option<String>,
    /// Nobody is watching: if a human is needed, deny at once.
    #[arg(long)]
    pub unattended: bool,
    /// Longest wait for a decision (default: Keyturn's own deadline).
    #[arg(long, value_parser = parse_duration)]
    pub approval_timeout: Option<Duration>,
    /// Kill the command after this long (`30s`, `5m`; exit 124).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Bytes of stdout, and of stderr, passed through; the rest is dropped
    /// after a `[keyturn: output truncated …]` marker.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_output: u64,
    /// Pass this environment variable to the command (repeatable). Only
    /// `PATH`, `HOME`, `LANG`, `TERM` and the names given here or in the
    /// config's `[exec] keep_env` are passed; the approver sees the names.
    #[arg(long = "keep-env", value_name = "NAME")]
    pub keep_env: Vec<String>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Passed to the command whenever the caller has them.
pub const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "TERM"];

/// CA-bundle overrides: not passed unless named (`--keep-env SSL_CERT_FILE`),
/// since they decide whom the command's TLS trusts.
pub const CA_BUNDLE_ENV: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
];

/// Names that may never be passed, even when named: they change what a
/// program loads or where its traffic goes.
const NEVER_EXACT: &[&str] = &[
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "PYTHONUSERBASE",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "BASH_ENV",
    "ENV",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "GLOBIGNORE",
    "IFS",
    "CDPATH",
    "GCONV_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
    "GIT_CONFIG_GLOBAL",
];
/// Prefixes never passed: the dynamic loader's knobs and exported shell functions.
const NEVER_PREFIX: &[&str] = &["LD_", "DYLD_", "BASH_FUNC_"];
/// Proxy settings, any case: never passed.
const NEVER_PROXY: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "socks_proxy",
];

/// Why `name` may not be passed to the command, or `None` if it may be
/// (when named). Keyturn's own secrets (`KEYTURN_AGENT_TOKEN`,
/// `KEYTURN_*_TOKEN`) are never passed: with it the command could submit
/// and cancel as the agent.
pub fn never_passed(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Some("is not an environment variable name");
    }
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("KEYTURN_") && upper.ends_with("TOKEN") {
        return Some("is a Keyturn secret and is never passed to the command");
    }
    if NEVER_EXACT.contains(&name)
        || NEVER_PREFIX.iter().any(|p| name.starts_with(p))
        || NEVER_PROXY.iter().any(|p| name.eq_ignore_ascii_case(p))
    {
        return Some(
            "changes what the command loads or where its traffic goes, so it is never passed",
        );
    }
    None
}

/// The names passed to the command: the base set and `keep`, deduplicated
/// in that order. Refuses a name that may never be passed.
pub fn passed_names(keep: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = BASE_ENV.iter().map(|s| s.to_string()).collect();
    for k in keep {
        if let Some(why) = never_passed(k) {
            return Err(format!("`{k}` {why}"));
        }
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    Ok(out)
}

/// `[exec] keep_env` from the config file, if one is given.
fn config_keep_env(config: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    let Some(c) = config else {
        return Ok(vec![]);
    };
    let text = std::fs::read_to_string(c)
        .map_err(|e| format!("cannot read config file {}: {e}", c.display()))?;
    let cfg = crate::config::Config::parse(&text)
        .map_err(|e| format!("config file {}: {e}", c.display()))?;
    Ok(cfg.exec.keep_env)
}

/// Copies `from` to `to` up to `limit` bytes, then writes a marker and
/// drains the rest so the command never blocks on a full pipe.
fn pass_through(mut from: impl Read, mut to: impl Write, limit: u64, stream: &str) {
    let mut buf = [0u8; 8192];
    let mut written: u64 = 0;
    let mut dropped: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = limit.saturating_sub(written) as usize;
        let take = room.min(n);
        if take > 0 {
            let _ = to.write_all(&buf[..take]);
            let _ = to.flush();
            written += take as u64;
        }
        if take < n {
            if dropped == 0 {
                let _ = write!(
                    to,
                    "\n[keyturn: {stream} truncated at {limit} bytes (--max-output)]\n"
                );
                let _ = to.flush();
            }
            dropped += (n - take) as u64;
        }
    }
    if dropped > 0 {
        let _ = writeln!(to, "[keyturn: {dropped} more bytes of {stream} dropped]");
        let _ = to.flush();
    }
}

pub fn main(a: ExecArgs) -> u8 {
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let socket = match a.url.endpoint(a.socket.as_deref(), a.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            crate::errln!("keyturn exec: {e}; not running the command");
            return EXIT_NOT_APPROVED;
        }
    };
    // What the command will see is settled before asking, so the approver
    // sees which variables it gets (by name; values may be secrets).
    let keep = match config_keep_env(a.config.as_deref()).and_then(|mut k| {
        k.extend(a.keep_env.iter().cloned());
        // The variable holding the bearer token for --url is a Keyturn
        // secret whatever its name.
        if let Some(t) = a.url.token_env.as_ref().filter(|t| k.contains(t)) {
            return Err(format!(
                "`{t}` holds the agent's bearer token (--token-env) and is never passed to the command"
            ));
        }
        passed_names(&k)
    }) {
        Ok(k) => k,
        Err(e) => {
            crate::errln!("keyturn exec: {e}; not running the command");
            return EXIT_NOT_APPROVED;
        }
    };
    let declared: Vec<&String> = keep.iter().skip(BASE_ENV.len()).collect();
    let id = Identity {
        socket,
        agent: a.agent.clone(),
        token: a.token.clone(),
    };
    let mut args = json!({"argv": a.command, "cwd": cwd});
    if !declared.is_empty() {
        args["keep_env"] = json!(declared);
    }
    let mut p = json!({
        "tool": a.tool,
        "args": args.clone(),
        "justification": a.justification,
        "unattended": a.unattended,
    });
    for (k, v) in [
        ("user_id", &a.user),
        ("channel_id", &a.channel),
        ("task_id", &a.task),
    ] {
        if let Some(v) = v {
            p[k] = json!(v);
        }
    }
    // Without --approval-timeout, Keyturn's own deadline ends the wait.
    let budget = a
        .approval_timeout
        .unwrap_or(Duration::from_secs(7 * 24 * 3600));
    let outcome = ask_announcing(&id, p, budget);
    crate::errln!("keyturn: {}", outcome.reason());
    let Outcome::Approved(d) = &outcome else {
        return EXIT_NOT_APPROVED;
    };
    if d.edited {
        // The approver edited the command line: run theirs, and only if
        // nothing but `argv` changed (the directory and the environment
        // names are this process's, as asked).
        let Some(argv) = edited_argv(d.args.as_ref(), &args) else {
            crate::errln!(
                "keyturn exec: an approver edited this call beyond its argv (or the edit cannot be \
                 read); failing closed, the command was not run"
            );
            return EXIT_NOT_APPROVED;
        };
        crate::errln!("keyturn: running the command line as the approver edited it");
        let mut edited = a.clone();
        edited.command = argv;
        return run(&edited, &keep);
    }
    run(&a, &keep)
}

/// The argv of an approver's edit of `asked` (`{"argv", "cwd", "keep_env"}`):
/// `None` unless it is a non-empty array of strings and every other field
/// is unchanged.
fn edited_argv(
    edited: Option<&serde_json::Value>,
    asked: &serde_json::Value,
) -> Option<Vec<String>> {
    let edited = edited?.as_object()?;
    let asked = asked.as_object()?;
    let same_rest = edited
        .keys()
        .chain(asked.keys())
        .filter(|k| *k != "argv")
        .all(|k| edited.get(k) == asked.get(k));
    let argv: Vec<String> = edited
        .get("argv")?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(String::from))
        .collect::<Option<_>>()?;
    (same_rest && !argv.is_empty()).then_some(argv)
}

fn run(a: &ExecArgs, keep: &[String]) -> u8 {
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env_clear();
    let mut passed = Vec::new();
    let mut missing = Vec::new();
    for name in keep {
        match std::env::var_os(name) {
            Some(v) => {
                cmd.env(name, v);
                passed.push(name.as_str());
            }
            None if !BASE_ENV.contains(&name.as_str()) => missing.push(name.as_str()),
            None => {}
        }
    }
    let dropped = std::env::vars_os()
        .filter(|(k, _)| !keep.iter().any(|n| k.as_os_str() == n.as_str()))
        .count();
    crate::errln!(
        "keyturn: the command's environment is {} ({dropped} other variables not passed; \
         --keep-env NAME passes one)",
        if passed.is_empty() {
            "empty".to_string()
        } else {
            passed.join(" ")
        }
    );
    if !missing.is_empty() {
        crate::errln!("keyturn: not set, so not passed: {}", missing.join(" "));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            crate::errln!("keyturn exec: cannot run {}: {e}", a.command[0]);
            return if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_NOT_APPROVED
            };
        }
    };
    let limit = a.max_output;
    let readers = [
        child.stdout.take().map(|o| {
            std::thread::spawn(move || pass_through(o, std::io::stdout(), limit, "stdout"))
        }),
        child.stderr.take().map(|e| {
            std::thread::spawn(move || pass_through(e, std::io::stderr(), limit, "stderr"))
        }),
    ];
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match a.timeout {
        Some(t) => match rx.recv_timeout(t) {
            Ok(s) => s,
            Err(_) => {
                use nix::sys::signal::{kill, Signal};
                use nix::unistd::Pid;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = rx.recv();
                crate::errln!(
                    "\nkeyturn: {} ran past --timeout {t:?} and was killed",
                    a.command[0]
                );
                // Output a grandchild still holds open is not waited for.
                return EXIT_TIMED_OUT;
            }
        },
        None => rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("waiter gone"))),
    };
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(c), _) => c.clamp(0, 255) as u8,
                (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
                _ => 1,
            }
        }
        Err(e) => {
            crate::errln!("keyturn exec: lost the command: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_and_keyturn_variables_are_never_passed() {
        for v in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "DYLD_INSERT_LIBRARIES",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "PYTHONHOME",
            "NODE_OPTIONS",
            "PERL5OPT",
            "RUBYOPT",
            "BASH_ENV",
            "ENV",
            "http_proxy",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "no_proxy",
            "BASH_FUNC_ls%%",
            "KEYTURN_AGENT_TOKEN",
            "KEYTURN_AGENT_CLI_TOKEN",
            "KEYTURN_DISCORD_TOKEN",
            "",
            "A=B",
        ] {
            assert!(never_passed(v).is_some(), "{v}");
            assert!(passed_names(&[v.to_string()]).is_err(), "{v}");
        }
        for v in [
            "GITHUB_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "PYTHONUNBUFFERED",
            "KEYTURN_SOCKET",
        ]
        .iter()
        .chain(CA_BUNDLE_ENV)
        {
            assert!(never_passed(v).is_none(), "{v}");
            // Passed only when named.
            assert!(!BASE_ENV.contains(v), "{v}");
        }
        assert_eq!(
            passed_names(&["X".into(), "PATH".into(), "X".into()]).unwrap(),
            ["PATH", "HOME", "LANG", "TERM", "X"]
        );
    }

    #[test]
    fn output_is_cut_with_a_marker() {
        let mut out = Vec::new();
        pass_through(&b"abcdefghij"[..], &mut out, 4, "stdout");
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("abcd\n[keyturn: stdout truncated at 4 bytes"),
            "{s}"
        );
        assert!(s.contains("6 more bytes"), "{s}");
        let mut out = Vec::new();
        pass_through(&b"abcd"[..], &mut out, 4, "stdout");
        assert_eq!(out, b"abcd");
    }
}
