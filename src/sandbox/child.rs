//! The process Keyturn starts for a run: sets resource limits, drops to the
//! run uid, asks to die with Keyturn, then execs bwrap or the program.

/// The hidden first argument that makes `keyturn` this child.
pub const SUBCOMMAND: &str = "sandbox-child";

/// Entry point of `keyturn sandbox-child …` (filled in by the executor work).
pub fn main() -> std::process::ExitCode {
    eprintln!("keyturn sandbox-child: not implemented");
    std::process::ExitCode::from(126)
}
