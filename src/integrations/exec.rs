//! `keyturn exec --tool NAME -- cmd args…`: ask Keyturn, then run a command.
//!
//! The request's arguments are the command line and the working directory
//! (`{"argv": [...], "cwd": "..."}`), so the human sees exactly what will
//! run. Only an approval runs it; a denial, a timeout or any failure to reach
//! Keyturn exits 126 without running anything. The command gets an
//! environment scrubbed of variables that change what a program loads or
//! where its traffic goes, a wall-clock limit, and its output is cut at a
//! configurable size with a visible marker. Blocking `std` only, no runtime.

use super::hook::parse_duration;
use super::{ask, socket_path, Identity, Outcome};
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
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Exact names removed from the command's environment.
const SCRUB_EXACT: &[&str] = &[
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
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];
/// Prefixes removed: the dynamic loader's knobs and exported shell functions.
const SCRUB_PREFIX: &[&str] = &["LD_", "DYLD_", "BASH_FUNC_"];
/// Proxy settings, any case.
const SCRUB_PROXY: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "socks_proxy",
];

/// Whether `name` is removed from the command's environment.
pub fn scrubbed(name: &str) -> bool {
    SCRUB_EXACT.contains(&name)
        || SCRUB_PREFIX.iter().any(|p| name.starts_with(p))
        || SCRUB_PROXY.iter().any(|p| name.eq_ignore_ascii_case(p))
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
    let socket = match socket_path(a.socket.as_deref(), a.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyturn exec: {e}; not running the command");
            return EXIT_NOT_APPROVED;
        }
    };
    let id = Identity {
        socket,
        agent: a.agent.clone(),
        token: a.token.clone(),
    };
    let mut p = json!({
        "tool": a.tool,
        "args": {"argv": a.command, "cwd": cwd},
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
    let outcome = ask(&id, p, budget);
    eprintln!("keyturn: {}", outcome.reason());
    if !matches!(outcome, Outcome::Approved(_)) {
        return EXIT_NOT_APPROVED;
    }
    run(&a)
}

fn run(a: &ExecArgs) -> u8 {
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut removed = Vec::new();
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if scrubbed(&name) {
            removed.push(name.into_owned());
            cmd.env_remove(&k);
        }
    }
    if !removed.is_empty() {
        removed.sort();
        eprintln!(
            "keyturn: removed from the environment: {}",
            removed.join(" ")
        );
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyturn exec: cannot run {}: {e}", a.command[0]);
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
                eprintln!(
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
            eprintln!("keyturn exec: lost the command: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_variables_are_scrubbed() {
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
        ] {
            assert!(scrubbed(v), "{v}");
        }
        for v in [
            "PATH",
            "HOME",
            "LANG",
            "TERM",
            "USER",
            "PYTHONUNBUFFERED",
            "ENVIRONMENT",
        ] {
            assert!(!scrubbed(v), "{v}");
        }
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
