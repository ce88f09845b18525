//! The process Keyturn starts for a run: sets resource limits, drops to the
//! run uid, asks to die with Keyturn, then execs bwrap or the program.
//!
//! Started as `keyturn sandbox-child <setup> -- <program> <args…>` by the
//! executor ([`crate::sandbox::executor`]), already in its own process
//! group, with the run's environment and its stdio in place. Everything it
//! does goes through safe `nix` calls (no `pre_exec`); it imports nothing
//! from the rest of Keyturn but this module.
//!
//! Order matters: the limits first (as root they can still be set), then
//! groups, gid, uid; `PR_SET_PDEATHSIG` only after the uid change (a
//! credential change clears it), and then a check that the parent is still
//! the Keyturn that started us (it may have died before the signal was
//! armed). Any failure exits 126 (or 127 when the program is missing) with
//! one line on stderr, which the run captures.

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

/// The hidden first argument that makes `keyturn` this child.
pub const SUBCOMMAND: &str = "sandbox-child";

/// What the child sets up before it execs, as passed on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// RLIMIT_CPU in seconds.
    pub cpu_secs: u64,
    /// RLIMIT_AS in MiB.
    pub memory_mb: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC.
    pub processes: u64,
    /// Drop to this uid/gid (only when Keyturn runs as root).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The pid of the Keyturn that starts the child.
    pub parent: i32,
}

impl Setup {
    /// The one command-line argument carrying this setup.
    pub fn encode(&self) -> String {
        let opt = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "v1,cpu={},as={},nofile={},nproc={},uid={},gid={},ppid={}",
            self.cpu_secs,
            self.memory_mb,
            self.open_files,
            self.processes,
            opt(self.uid),
            opt(self.gid),
            self.parent
        )
    }

    /// Parses [`Setup::encode`]'s output; names the bad field.
    pub fn decode(s: &str) -> Result<Setup, String> {
        let mut fields = s.split(',');
        if fields.next() != Some("v1") {
            return Err("unknown setup version".into());
        }
        let mut get = |name: &str| -> Result<String, String> {
            let f = fields
                .next()
                .ok_or_else(|| format!("setup lacks `{name}`"))?;
            f.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| format!("setup field `{name}` expected"))
        };
        let num = |name: &str, v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("setup field `{name}` is not a number"))
        };
        let id = |name: &str, v: String| -> Result<Option<u32>, String> {
            if v == "-" {
                return Ok(None);
            }
            v.parse::<u32>()
                .map(Some)
                .map_err(|_| format!("setup field `{name}` is not an id"))
        };
        let cpu_secs = num("cpu", get("cpu")?)?;
        let memory_mb = num("as", get("as")?)?;
        let open_files = num("nofile", get("nofile")?)?;
        let processes = num("nproc", get("nproc")?)?;
        let uid = id("uid", get("uid")?)?;
        let gid = id("gid", get("gid")?)?;
        let parent = get("ppid")?
            .parse::<i32>()
            .map_err(|_| "setup field `ppid` is not a pid".to_string())?;
        if fields.next().is_some() {
            return Err("setup has extra fields".into());
        }
        Ok(Setup {
            cpu_secs,
            memory_mb,
            open_files,
            processes,
            uid,
            gid,
            parent,
        })
    }
}

/// Entry point of `keyturn sandbox-child <setup> -- <program> <args…>`.
pub fn main() -> ExitCode {
    // argv[0] is keyturn, argv[1] the subcommand.
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    match run(&args) {
        Ok(never) => match never {},
        Err((code, msg)) => {
            eprintln!("keyturn sandbox-child: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Sets everything up and execs; returns only on failure (exit code, why).
fn run(args: &[OsString]) -> Result<std::convert::Infallible, (u8, String)> {
    let fail = |m: String| (126u8, m);
    let [setup, dashdash, program @ ..] = args else {
        return Err(fail(
            "usage: sandbox-child <setup> -- <program> [args…]".into(),
        ));
    };
    if dashdash != "--" || program.is_empty() {
        return Err(fail(
            "usage: sandbox-child <setup> -- <program> [args…]".into(),
        ));
    }
    let setup = setup
        .to_str()
        .ok_or_else(|| fail("setup is not UTF-8".into()))
        .and_then(|s| Setup::decode(s).map_err(fail))?;
    let argv: Vec<CString> = program
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| fail("an argument contains NUL".into())))
        .collect::<Result<_, _>>()?;

    limit(
        Resource::RLIMIT_CPU,
        setup.cpu_secs,
        setup.cpu_secs.saturating_add(1),
        "cpu",
    )
    .map_err(fail)?;
    let bytes = setup.memory_mb.saturating_mul(1024 * 1024);
    limit(Resource::RLIMIT_AS, bytes, bytes, "memory").map_err(fail)?;
    limit(
        Resource::RLIMIT_NOFILE,
        setup.open_files,
        setup.open_files,
        "open files",
    )
    .map_err(fail)?;
    limit(
        Resource::RLIMIT_NPROC,
        setup.processes,
        setup.processes,
        "processes",
    )
    .map_err(fail)?;

    if let (Some(uid), Some(gid)) = (setup.uid, setup.gid) {
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        nix::unistd::setgroups(&[]).map_err(|e| fail(format!("setgroups: {e}")))?;
        nix::unistd::setgid(gid).map_err(|e| fail(format!("setgid({gid}): {e}")))?;
        nix::unistd::setuid(uid).map_err(|e| fail(format!("setuid({uid}): {e}")))?;
        if nix::unistd::getuid() != uid || nix::unistd::geteuid() != uid {
            return Err(fail("the uid did not change".into()));
        }
    }

    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| fail(format!("PR_SET_PDEATHSIG: {e}")))?;
    if nix::unistd::getppid() != Pid::from_raw(setup.parent) {
        return Err(fail("Keyturn exited before the run started".into()));
    }

    let shown = program[0].to_string_lossy();
    match nix::unistd::execvp(&argv[0], &argv) {
        Ok(never) => Ok(never),
        Err(nix::errno::Errno::ENOENT) => Err((127, format!("`{shown}`: program not found"))),
        Err(e) => Err(fail(format!("cannot run `{shown}`: {e}"))),
    }
}

fn limit(resource: Resource, soft: u64, hard: u64, what: &str) -> Result<(), String> {
    setrlimit(resource, soft, hard).map_err(|e| format!("cannot set the {what} limit: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_round_trips_and_names_bad_fields() {
        let s = Setup {
            cpu_secs: 60,
            memory_mb: 2048,
            open_files: 256,
            processes: 64,
            uid: Some(65534),
            gid: None,
            parent: 42,
        };
        assert_eq!(Setup::decode(&s.encode()).unwrap(), s);
        assert!(Setup::decode("v2,cpu=1").is_err());
        assert!(
            Setup::decode("v1,cpu=x,as=1,nofile=1,nproc=1,uid=-,gid=-,ppid=1")
                .unwrap_err()
                .contains("cpu")
        );
        assert!(Setup::decode("v1,cpu=1,as=1,nofile=1,nproc=1,uid=-,gid=-")
            .unwrap_err()
            .contains("ppid"));
    }
}
