//! Killing what a previous Keyturn process left running: a run's process
//! group, recognised by its leader's start time so that a recycled pid is
//! never signalled.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How far a leader's start time may be from the run's recorded start.
const START_TOLERANCE_MS: i64 = 5_000;

/// Sends SIGKILL to process group `pid` if `/proc/<pid>` is a process
/// started within a few seconds of `started_ms` (epoch ms). Best effort.
pub fn kill_leftover(pid: i64, started_ms: i64) {
    let Ok(raw) = i32::try_from(pid) else {
        tracing::warn!(run.pid = pid, "leftover run: pid out of range");
        return;
    };
    if raw <= 1 {
        tracing::warn!(run.pid = pid, "leftover run: refusing to signal this pid");
        return;
    }
    let Some(start_ms) = process_start_ms(raw) else {
        tracing::info!(run.pid = pid, "leftover run: process is gone");
        return;
    };
    if (start_ms - started_ms).abs() > START_TOLERANCE_MS {
        tracing::info!(
            run.pid = pid,
            process.start_ms = start_ms,
            run.started_ms = started_ms,
            "leftover run: the pid belongs to another process now; not signalled"
        );
        return;
    }
    match killpg(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) => tracing::warn!(run.pid = pid, "leftover run: process group killed"),
        Err(e) => tracing::warn!(run.pid = pid, error = %e, "leftover run: kill failed"),
    }
}

/// The start time of process `pid` in epoch milliseconds, from
/// `/proc/<pid>/stat` (field 22, clock ticks since boot) and `/proc/stat`'s
/// `btime`.
pub(super) fn process_start_ms(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = start_ticks(&stat)?;
    let btime = boot_time_secs(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|h| *h > 0)
        .unwrap_or(100);
    Some(btime * 1000 + ticks * 1000 / i64::from(hz as i32))
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may contain spaces and `)`, so fields are
/// counted after its last `)`.
fn start_ticks(stat: &str) -> Option<i64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: starttime is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

fn boot_time_secs(proc_stat: &str) -> Option<i64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_past_a_strange_name() {
        let stat = "123 (a) b) c) S 1 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 2";
        assert_eq!(start_ticks(stat), Some(98765));
        assert_eq!(
            boot_time_secs("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn own_start_time_is_recent() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let start = process_start_ms(std::process::id() as i32).unwrap();
        assert!(start <= now + 2_000 && start > now - 3_600_000);
    }
}
