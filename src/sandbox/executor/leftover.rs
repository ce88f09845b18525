//! Killing what a previous Keyturn process left running: a run's process
//! group, recognised by its leader's start time so that a recycled pid is
//! never signalled.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How far a leader's start time may be from the run's recorded start.
const START_TOLERANCE_MS: i64 = 5_000;

/// Sends SIGKILL to process group `pid` if it is still the run's: its leader
/// `/proc/<pid>` started within a few seconds of `started_ms` (epoch ms),
/// or, when the leader is gone (the host profile's leader dies with
/// Keyturn, its children may not), members of group `pid` that started
/// after the run did. Best effort, logged.
pub fn kill_leftover(pid: i64, started_ms: i64) {
    kill_leftover_as(pid, started_ms, None)
}

/// [`kill_leftover`], also requiring the processes to run as `uid`.
pub(super) fn kill_leftover_as(pid: i64, started_ms: i64, uid: Option<u32>) {
    let Ok(raw) = i32::try_from(pid) else {
        tracing::warn!(run.pid = pid, "leftover run: pid out of range");
        return;
    };
    if raw <= 1 {
        tracing::warn!(run.pid = pid, "leftover run: refusing to signal this pid");
        return;
    }
    let uid_ok = |p: i32| uid.is_none() || process_uid(p) == uid;
    match process_start_ms(raw) {
        Some(start_ms) => {
            if (start_ms - started_ms).abs() > START_TOLERANCE_MS || !uid_ok(raw) {
                tracing::info!(
                    run.pid = pid,
                    process.start_ms = start_ms,
                    run.started_ms = started_ms,
                    "leftover run: the pid belongs to another process now; not signalled"
                );
                return;
            }
        }
        None => {
            // The leader is gone; the group id cannot have been reused while
            // any member lives, but check the members' start times anyway.
            let members = group_members(raw);
            let ours = members.iter().any(|&m| {
                process_start_ms(m).is_some_and(|s| s >= started_ms - START_TOLERANCE_MS)
                    && uid_ok(m)
            });
            if !ours {
                tracing::info!(run.pid = pid, "leftover run: nothing of it is left");
                return;
            }
        }
    }
    match killpg(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) => tracing::warn!(run.pid = pid, "leftover run: process group killed"),
        Err(nix::errno::Errno::ESRCH) => {
            tracing::info!(run.pid = pid, "leftover run: nothing of it is left")
        }
        Err(e) => tracing::warn!(run.pid = pid, error = %e, "leftover run: kill failed"),
    }
}

/// Pids of the processes in process group `pgid` (field 5 of their stat).
/// The variable every run's environment carries (set by Keyturn, so a
/// run's processes can be found again by it, whatever group or session
/// they moved to).
pub const RUN_ID_VAR: &str = "KEYTURN_RUN_ID";

/// SIGKILLs every process whose environment holds `KEYTURN_RUN_ID=<run_id>`
/// (and that runs as `uid`, when given): what is left of a run after its
/// group is gone, e.g. a sandbox that Keyturn's death reached while
/// bubblewrap was still setting it up (before its `--die-with-parent` was
/// armed, and in a session of its own). Returns how many were signalled.
pub fn kill_by_run_id(run_id: &str, uid: Option<u32>) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let want = format!("{RUN_ID_VAR}={run_id}");
    let me = std::process::id() as i32;
    let mut n = 0;
    for p in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if p <= 1 || p == me || (uid.is_some() && process_uid(p) != uid) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{p}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|e| e == want.as_bytes()) {
            match nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL) {
                Ok(()) => {
                    n += 1;
                    tracing::warn!(run.id = %run_id, process.pid = p, "leftover run process killed");
                }
                Err(e) => {
                    tracing::warn!(run.id = %run_id, process.pid = p, error = %e, "leftover run process not killed")
                }
            }
        }
    }
    n
}

fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| stat_field(&s, 5))
                == Some(i64::from(pgid))
        })
        .collect()
}

/// The real uid of process `pid`.
fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
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
    Some(btime * 1000 + ticks * 1000 / hz)
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may contain spaces and `)`, so fields are
/// counted after its last `)`.
fn start_ticks(stat: &str) -> Option<i64> {
    stat_field(stat, 22)
}

/// Field `n` (1-based, `n >= 3`) of a `/proc/<pid>/stat` line, as a number.
fn stat_field(stat: &str, n: usize) -> Option<i64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name come fields 3 (state) onwards.
    after
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
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
        assert_eq!(stat_field(stat, 5), Some(123));
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
