//! The one way tests run the real binary. [`Server`] is a `keyturn serve`
//! in a temp directory, started from a config text ([`config`] builds the
//! common ones), with sync JSON-RPC calls ([`Server::rpc`], routed to the
//! agent or admin socket as [`rpc::is_admin_call`] says), the library's
//! async [`keyturn::ipc::client::Client`] on either socket, the CLI against
//! it ([`Server::cli`]), its log waited on line by line with a deadline
//! ([`Server::wait_log`]), and SIGKILL, SIGTERM and restarts on the same
//! directory and database. A start that fails is a [`StartFailure`] with
//! the exit status and log. [`serve_command`], [`cli`] and [`run`] give the
//! raw commands, for tests of what the binary refuses. [`fixture`] builds
//! `ApprovalRequest` values for the store tests.
//!
//! Each test binary uses part of it.
#![allow(dead_code, unused_imports)]

pub mod config;
pub mod fixture;
pub mod pg;
pub mod rpc;
mod server;
pub mod tcp_proxy;

pub use server::{closed_pipe, serve_command, Launch, Server, StartFailure, Stderr, BIN};

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `keyturn ARGS --config CONFIG`: no colour, and neither the sockets nor a
/// Discord token from the environment.
pub fn cli(config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env_remove("KEYTURN_SOCKET")
        .env_remove("KEYTURN_ADMIN_SOCKET")
        .env_remove("KEYTURN_DISCORD_TOKEN")
        .stdin(Stdio::null());
    c
}

/// [`cli`] run to its end, which must come within 20 s.
pub fn run(args: &[&str], config: &Path) -> Output {
    output_within(cli(config, args), Duration::from_secs(20))
}

/// Runs `cmd` to its end (stdin closed, stdout and stderr captured, as
/// `Command::output` does), killing it and failing the test if that takes
/// longer than `within`.
pub fn output_within(mut cmd: Command, within: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyturn");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("wait for keyturn"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().ok().and_then(Result::ok);
            panic!(
                "{cmd:?} did not finish within {within:?}; stderr:\n{}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            )
        }
    }
}

/// Runs `cmd` to completion with `stdin`, returning (status code, stdout, stderr).
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut si = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let w = std::thread::spawn(move || {
        let _ = si.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = w.join();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
