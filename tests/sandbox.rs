//! The sandbox executor against a real bubblewrap: network, file system,
//! environment, limits, timeout and kill, output cap, hidden paths,
//! credential files, and path resolution. Runs start through the real
//! `keyturn sandbox-child`. Without `bwrap` the tests are skipped with a
//! message, except under `CI=true`, where they fail.

use keyturn::app::ports::{Executor, Finished, Job};
use keyturn::config::RunConfig;
use keyturn::domain::run::{Network, Profile, RunSpec, RunState};
use keyturn::sandbox::executor::{probe, Sandbox};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether to run: bwrap present (else skip, or fail under CI).
fn have_bwrap() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bwrap").is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("bwrap is required under CI: install Debian's `bubblewrap`");
        }
        eprintln!("skipped: bwrap is not installed (install Debian's `bubblewrap`)");
    }
    found
}

fn cfg() -> RunConfig {
    RunConfig {
        kill_grace: keyturn::config::Dur(Duration::from_millis(300)),
        ..RunConfig::default()
    }
}

fn sandbox(cfg: &RunConfig) -> Sandbox {
    Sandbox::new(cfg, PathBuf::from(env!("CARGO_BIN_EXE_keyturn")), vec![])
}

/// A directory the run uid (65534 when the tests run as root) can use.
fn open_dir_in(base: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir_in(base).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn open_dir() -> tempfile::TempDir {
    open_dir_in("/tmp")
}

fn spec(profile: Profile) -> RunSpec {
    let mut s: RunSpec = toml::from_str(r#"argv = ["true"]"#).unwrap();
    s.profile = profile;
    s
}

fn job(spec: RunSpec, argv: &[&str]) -> Job {
    Job {
        run_id: format!("test-{}", rand::random::<u32>()),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        spec,
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        files: vec![],
        hidden: vec![],
        max_output_bytes: 64 * 1024,
    }
}

fn sh(spec: RunSpec, script: &str) -> Job {
    job(spec, &["sh", "-c", script])
}

async fn run(sb: &Sandbox, job: Job) -> Finished {
    let started = sb.start(job).await.expect("run starts");
    started.finished.await.expect("run finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A number to tag a test's processes with (`sleep <marker>`).
fn marker() -> String {
    (100_000 + rand::random::<u32>() % 800_000).to_string()
}

/// How many processes on the host run `sleep <marker>`.
fn count_sleeping(marker: &str) -> usize {
    let want = format!("sleep\0{marker}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| c.ends_with(want.as_bytes()))
                .unwrap_or(false)
        })
        .count()
}

/// How many processes on the host run as `uid`.
fn processes_of(uid: u32) -> usize {
    let want = format!("Uid:\t{uid}\t");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status"))
                .map(|s| s.lines().any(|l| l.starts_with(&want)))
                .unwrap_or(false)
        })
        .count()
}

/// Waits (polling, up to a generous deadline) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn probe_finds_a_working_bwrap_and_names_a_missing_one() {
    if !have_bwrap() {
        return;
    }
    probe(&RunConfig::default()).unwrap();
    let c = RunConfig {
        bwrap: "/nonexistent/bwrap".into(),
        ..RunConfig::default()
    };
    let e = probe(&c).unwrap_err();
    assert!(e.contains("bubblewrap"), "{e}");
}

#[tokio::test]
async fn network_is_absent_unless_declared() {
    if !have_bwrap() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sb = sandbox(&cfg());
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");
    let none = run(&sb, job(spec(Profile::Bwrap), &["bash", "-c", &script])).await;
    assert_eq!(none.state, RunState::Exited);
    assert_ne!(none.exit_code, Some(0), "{}", text(&none.stdout));
    assert!(!text(&none.stdout).contains("connected"));

    let mut s = spec(Profile::Bwrap);
    s.network = Network::Host;
    let host = run(&sb, job(s, &["bash", "-c", &script])).await;
    assert_eq!(host.exit_code, Some(0), "{}", text(&host.stderr));
    assert!(text(&host.stdout).contains("connected"));
}

#[tokio::test]
async fn only_writable_dirs_are_writable() {
    if !have_bwrap() {
        return;
    }
    let w = open_dir();
    let outside = open_dir_in("/var/tmp");
    let mut s = spec(Profile::Bwrap);
    s.writable = vec![w.path().to_string_lossy().into_owned()];
    let sb = sandbox(&cfg());
    let script = format!(
        "echo in > {w}/in.txt && echo wrote-in; echo out > {o}/out.txt && echo wrote-out; echo etc > /etc/keyturn-test || true",
        w = w.path().display(),
        o = outside.path().display()
    );
    let f = run(&sb, sh(s, &script)).await;
    let out = text(&f.stdout);
    assert!(out.contains("wrote-in"), "{out} {}", text(&f.stderr));
    assert!(!out.contains("wrote-out"), "{out}");
    assert!(
        text(&f.stderr).contains("Read-only file system"),
        "{}",
        text(&f.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(w.path().join("in.txt")).unwrap(),
        "in\n"
    );
    assert!(!outside.path().join("out.txt").exists());
    assert!(!Path::new("/etc/keyturn-test").exists());
}

#[tokio::test]
async fn path_slot_roots_under_tmp_stay_visible_read_only() {
    if !have_bwrap() {
        return;
    }
    let root = open_dir();
    std::fs::write(root.path().join("data.txt"), "payload").unwrap();
    std::fs::set_permissions(
        root.path().join("data.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let r = root.path().to_string_lossy().into_owned();
    let s: RunSpec = toml::from_str(&format!(
        r#"
        argv = ["cat", "{{file}}"]
        [slots.file]
        type = "path"
        roots = ["{r}"]
        "#
    ))
    .unwrap();
    let sb = sandbox(&cfg());
    let script = format!("cat {r}/data.txt; echo x > {r}/new.txt || echo refused");
    let f = run(&sb, sh(s, &script)).await;
    assert_eq!(text(&f.stdout), "payloadrefused\n", "{}", text(&f.stderr));
    assert!(!root.path().join("new.txt").exists());
}

#[tokio::test]
async fn env_inside_is_exactly_the_job_env_in_both_profiles() {
    if !have_bwrap() {
        return;
    }
    // Present in Keyturn's own environment: must not reach the run.
    std::env::set_var("KEYTURN_SANDBOX_TEST_PARENT", "must-not-leak");
    let sb = sandbox(&cfg());
    let cwd = open_dir();
    for profile in [Profile::Bwrap, Profile::Host] {
        let mut s = spec(profile);
        s.writable = vec![cwd.path().to_string_lossy().into_owned()];
        let mut j = job(s, &["env"]);
        j.env.push(("ONLY".into(), "this".into()));
        let f = run(&sb, j).await;
        assert_eq!(f.exit_code, Some(0), "{}", text(&f.stderr));
        let mut lines: Vec<String> = text(&f.stdout).lines().map(str::to_string).collect();
        lines.sort();
        let mut want = vec!["ONLY=this".to_string(), "PATH=/usr/bin:/bin".to_string()];
        if profile == Profile::Bwrap {
            // bwrap sets PWD after its --chdir.
            want.push("PWD=/tmp".into());
        }
        want.sort();
        assert_eq!(lines, want, "{profile:?}");
    }
}

#[tokio::test]
async fn a_job_setting_a_loader_variable_is_refused() {
    if !have_bwrap() {
        return;
    }
    let sb = sandbox(&cfg());
    let mut j = job(spec(Profile::Bwrap), &["true"]);
    j.env.push(("LD_PRELOAD".into(), "/tmp/x.so".into()));
    let e = sb.start(j).await.err().expect("refused");
    assert!(e.0.contains("LD_PRELOAD"), "{e}");
}

#[tokio::test]
async fn a_fork_bomb_is_bounded_by_processes_and_ended_by_the_timeout() {
    if !have_bwrap() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the process limit is only per-run when Keyturn runs as root");
        return;
    }
    // RLIMIT_NPROC counts every process of the uid on the host: the bomb
    // gets a uid of its own, so other tests' runs do not count against it.
    const BOMB_UID: u32 = 64_999;
    let c = RunConfig {
        uid: Some(BOMB_UID),
        gid: Some(BOMB_UID),
        ..cfg()
    };
    let sb = sandbox(&c);
    let w = open_dir();
    for profile in [Profile::Bwrap, Profile::Host] {
        until("no process of the bomb's uid is left", || {
            processes_of(BOMB_UID) == 0
        })
        .await;
        let m = marker();
        let mut s = spec(profile);
        s.limits.processes = 20;
        s.timeout_ms = 1500;
        s.writable = vec![w.path().to_string_lossy().into_owned()];
        // The forking loop runs in a subshell; the top shell blocks (without
        // a process) on a FIFO nobody writes, so only the timeout ends it.
        let fifo = w.path().join(format!("fifo-{m}"));
        let script = format!(
            "mkfifo {f}; (while :; do sleep {m} & done) & read x < {f}",
            f = fifo.display()
        );
        let f = run(&sb, sh(s, &script)).await;
        assert_eq!(
            f.state,
            RunState::TimedOut,
            "{profile:?} {}",
            text(&f.stderr)
        );
        assert!(
            text(&f.stderr).contains("Cannot fork"),
            "{profile:?} {}",
            text(&f.stderr)
        );
        until("the bomb's processes are gone", || count_sleeping(&m) == 0).await;
    }
}

#[tokio::test]
async fn killing_bwrap_itself_takes_the_whole_sandbox_down() {
    if !have_bwrap() {
        return;
    }
    let m = marker();
    let sb = sandbox(&cfg());
    let script = format!("sh -c 'trap \"\" TERM; exec sleep {m}' & wait");
    let started = sb.start(sh(spec(Profile::Bwrap), &script)).await.unwrap();
    until("the grandchild runs", || count_sleeping(&m) == 1).await;
    // Not through the kill switch: as if bwrap died on its own.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(started.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let f = started.finished.await.unwrap();
    assert_eq!(f.state, RunState::Exited);
    assert_eq!(f.signal, Some(9));
    until("the sandbox is gone", || count_sleeping(&m) == 0).await;
}

#[tokio::test]
async fn runs_beyond_max_concurrent_are_refused() {
    if !have_bwrap() {
        return;
    }
    let c = RunConfig {
        max_concurrent: 1,
        ..cfg()
    };
    let sb = sandbox(&c);
    let m = marker();
    let first = sb
        .start(sh(spec(Profile::Bwrap), &format!("exec sleep {m}")))
        .await
        .unwrap();
    let e = sb
        .start(sh(spec(Profile::Bwrap), "true"))
        .await
        .err()
        .expect("refused");
    assert!(e.0.contains("too_many_runs"), "{e}");
    first.kill.kill();
    assert_eq!(first.finished.await.unwrap().state, RunState::Killed);
    // The slot is free again once the run has ended.
    let f = run(&sb, sh(spec(Profile::Bwrap), "true")).await;
    assert_eq!(f.exit_code, Some(0));
}

#[test]
fn kill_leftover_checks_the_start_time_before_killing_the_group() {
    use nix::sys::signal::Signal;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let spawn = || {
        std::process::Command::new("sleep")
            .arg("1000")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    // A start time an hour off: another process now owns the pid, so no
    // SIGKILL; the SIGTERM sent after it is what ends the process.
    let mut other = spawn();
    keyturn::sandbox::executor::kill_leftover(other.id() as i64, now_ms() - 3_600_000);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(other.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(other.wait().unwrap().signal(), Some(Signal::SIGTERM as i32));
    // The recorded start time matches: the group is killed.
    let mut ours = spawn();
    keyturn::sandbox::executor::kill_leftover(ours.id() as i64, now_ms());
    assert_eq!(ours.wait().unwrap().signal(), Some(Signal::SIGKILL as i32));
}

#[tokio::test]
async fn kill_leftover_reaches_a_group_whose_leader_is_gone() {
    use std::os::unix::process::CommandExt;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let m = marker();
    // The leader starts a member and exits (as a host-profile program
    // does when Keyturn dies and takes it along, leaving its children).
    let mut leader = std::process::Command::new("sh")
        .args(["-c", &format!("sleep {m} >/dev/null 2>&1 &")])
        .process_group(0)
        .spawn()
        .unwrap();
    assert!(leader.wait().unwrap().success());
    until("the member runs", || count_sleeping(&m) == 1).await;
    keyturn::sandbox::executor::kill_leftover(leader.id() as i64, now_ms);
    until("the member is gone", || count_sleeping(&m) == 0).await;
}

#[tokio::test]
async fn a_grandchild_ignoring_sigterm_dies_with_the_kill_in_both_profiles() {
    if !have_bwrap() {
        return;
    }
    let sb = sandbox(&cfg());
    let cwd = open_dir();
    for profile in [Profile::Bwrap, Profile::Host] {
        let m = marker();
        let mut s = spec(profile);
        s.writable = vec![cwd.path().to_string_lossy().into_owned()];
        let script = format!("sh -c 'trap \"\" TERM; exec sleep {m}' & wait");
        let started = sb.start(sh(s, &script)).await.unwrap();
        until("the grandchild runs", || count_sleeping(&m) == 1).await;
        started.kill.kill();
        started.kill.kill(); // idempotent
        let f = started.finished.await.unwrap();
        assert_eq!(f.state, RunState::Killed, "{profile:?}");
        until("the grandchild is gone", || count_sleeping(&m) == 0).await;
    }
}

#[tokio::test]
async fn output_over_the_cap_is_cut_with_full_size_and_hash() {
    if !have_bwrap() {
        return;
    }
    let sb = sandbox(&cfg());
    let mut j = sh(
        spec(Profile::Bwrap),
        "head -c 300000 /dev/zero; head -c 10 /dev/zero >&2",
    );
    j.max_output_bytes = 1000;
    let f = run(&sb, j).await;
    assert_eq!(f.exit_code, Some(0));
    assert_eq!(f.stdout.len(), 1000);
    assert_eq!(f.stdout_size, 300_000);
    assert_eq!(
        f.stdout_sha256,
        hex::encode(Sha256::digest(vec![0u8; 300_000]))
    );
    assert_eq!(f.stderr.len(), 10);
    assert_eq!(f.stderr_size, 10);
}

#[tokio::test]
async fn hidden_paths_are_empty_inside() {
    if !have_bwrap() {
        return;
    }
    let w = open_dir();
    let dir = w.path().join("secrets");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("db.sqlite"), "rows").unwrap();
    let file = w.path().join("config.toml");
    std::fs::write(&file, "token").unwrap();
    for p in [dir.join("db.sqlite"), file.clone()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut s = spec(Profile::Bwrap);
    s.writable = vec![w.path().to_string_lossy().into_owned()];
    s.hidden = vec![file.to_string_lossy().into_owned()];
    let script = format!(
        "ls -A {d}; cat {f}; echo end",
        d = dir.display(),
        f = file.display()
    );
    let mut j = sh(s, &script);
    j.hidden = vec![dir.to_string_lossy().into_owned()];
    let f = run(&sandbox(&cfg()), j).await;
    assert_eq!(text(&f.stdout), "end\n", "{}", text(&f.stderr));
}

#[tokio::test]
async fn credential_files_are_0400_inside_and_removed_after() {
    if !have_bwrap() {
        return;
    }
    let scratch = open_dir();
    let mut c = cfg();
    c.scratch_dir = Some(scratch.path().to_string_lossy().into_owned());
    let sb = sandbox(&c);
    let mut j = sh(
        spec(Profile::Bwrap),
        "stat -c '%a %u' /tmp/cred/kubeconfig; cat /tmp/cred/kubeconfig",
    );
    j.files = vec![("/tmp/cred/kubeconfig".into(), b"s3cret".to_vec())];
    let f = run(&sb, j).await;
    let uid = if nix::unistd::geteuid().is_root() {
        65534
    } else {
        nix::unistd::geteuid().as_raw()
    };
    assert_eq!(
        text(&f.stdout),
        format!("400 {uid}\ns3cret"),
        "{}",
        text(&f.stderr)
    );
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);

    // The host profile cannot place files: refused, and nothing is left.
    let mut h = spec(Profile::Host);
    h.writable = vec![scratch.path().to_string_lossy().into_owned()];
    let mut j = job(h, &["true"]);
    j.files = vec![("/tmp/cred/x".into(), b"s".to_vec())];
    assert!(sb.start(j).await.is_err());
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn resolve_path_refuses_a_symlink_out_of_a_root() {
    let root = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", root.path().join("out")).unwrap();
    std::fs::write(root.path().join("real.txt"), "x").unwrap();
    std::os::unix::fs::symlink("real.txt", root.path().join("in")).unwrap();
    let sb = sandbox(&cfg());
    let roots = vec![root.path().to_string_lossy().into_owned()];
    let p = |n: &str| format!("{}/{n}", roots[0]);
    let e = sb.resolve_path(&p("out/passwd"), &roots, true).unwrap_err();
    assert!(e.contains("outside the allowed roots"), "{e}");
    let ok = sb.resolve_path(&p("in"), &roots, true).unwrap();
    assert!(ok.ends_with("/real.txt"), "{ok}");
}

#[tokio::test]
async fn a_missing_program_exits_127() {
    if !have_bwrap() {
        return;
    }
    let sb = sandbox(&cfg());
    let cwd = open_dir();
    let mut s = spec(Profile::Host);
    s.writable = vec![cwd.path().to_string_lossy().into_owned()];
    let f = run(&sb, job(s, &["keyturn-no-such-program"])).await;
    assert_eq!(f.exit_code, Some(127));
    assert!(text(&f.stderr).contains("program not found"));
}

#[tokio::test]
async fn limits_and_the_run_uid_apply_in_both_profiles() {
    if !have_bwrap() {
        return;
    }
    let sb = sandbox(&cfg());
    let cwd = open_dir();
    let want_uid = if nix::unistd::geteuid().is_root() {
        "65534".to_string()
    } else {
        nix::unistd::geteuid().to_string()
    };
    for profile in [Profile::Bwrap, Profile::Host] {
        let mut s = spec(profile);
        s.writable = vec![cwd.path().to_string_lossy().into_owned()];
        s.limits.open_files = 77;
        s.limits.processes = 33;
        s.limits.cpu_secs = 9;
        s.limits.memory_mb = 1500;
        let f = run(
            &sb,
            job(
                s,
                &[
                    "bash",
                    "-c",
                    "id -u; id -G; ulimit -n; ulimit -u; ulimit -t; ulimit -v",
                ],
            ),
        )
        .await;
        let out = text(&f.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{profile:?} {out} {}", text(&f.stderr));
        assert_eq!(lines[0], want_uid, "{profile:?}");
        if want_uid == "65534" {
            // setgroups([]) left only the run gid.
            assert_eq!(lines[1], "65534", "{profile:?}");
        }
        assert_eq!(&lines[2..], ["77", "33", "9", "1536000"], "{profile:?}");
    }
}
