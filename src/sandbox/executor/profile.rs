//! The command a job runs as: the bubblewrap arguments for
//! [`Profile::Bwrap`], the working directory for both profiles, and the
//! checks on a job that make it refuse to start (fail closed).

use crate::app::ports::Job;
use crate::domain::run::{under, Network, Profile, SlotType};
use std::path::{Path, PathBuf};

/// Where the child starts and what it execs.
#[derive(Debug)]
pub(super) struct Plan {
    /// The full command the child execs (bwrap and its arguments, or the
    /// job's argv).
    pub command: Vec<String>,
    /// The child's working directory on the host.
    pub host_cwd: PathBuf,
}

/// A file staged for binding: its source on the host, its path inside.
#[derive(Debug)]
pub(super) struct Staged {
    pub source: PathBuf,
    pub dest: String,
}

/// Environment variables that would change how the child itself (Keyturn,
/// still privileged) or bwrap behave; a job that sets one is refused.
pub(super) fn refused_env(name: &str) -> bool {
    crate::domain::run::never_passed(name)
        || name == "GLIBC_TUNABLES"
        || name.starts_with("MIMALLOC_")
}

fn canonical(p: &str, what: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} `{p}` does not exist"),
        _ => format!("{what} `{p}` cannot be resolved"),
    })
}

fn path_str(p: &Path) -> Result<String, String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("`{}` is not UTF-8", p.display()))
}

/// The roots of the spec's path slots.
fn slot_roots(job: &Job) -> Vec<String> {
    job.spec
        .slots
        .values()
        .filter_map(|s| match s {
            SlotType::Path { roots, .. } => Some(roots.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The declared working directory must be a writable directory or under a
/// path slot's root.
fn check_cwd(job: &Job, cwd: &str) -> Result<(), String> {
    let ok = job.spec.writable.iter().any(|w| under(cwd, w))
        || slot_roots(job).iter().any(|r| under(cwd, r));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the working directory `{cwd}` is neither a writable directory nor under a path slot's root"
        ))
    }
}

/// Checks the job and builds what the child runs.
pub(super) fn plan(
    job: &Job,
    bwrap: &Path,
    hidden_default: &[String],
    staged: &[Staged],
) -> Result<Plan, String> {
    if job.argv.is_empty() {
        return Err("the job has no program".into());
    }
    if let Some((k, _)) = job.env.iter().find(|(k, _)| refused_env(k)) {
        return Err(format!("the environment may not set `{k}`"));
    }
    let writable = job
        .spec
        .writable
        .iter()
        .map(|w| {
            let c = canonical(w, "writable directory")?;
            if !c.is_dir() {
                return Err(format!("writable directory `{w}` is not a directory"));
            }
            Ok(c)
        })
        .collect::<Result<Vec<_>, String>>()?;
    match job.spec.profile {
        Profile::Host => {
            if !staged.is_empty() {
                return Err(
                    "credential files need the bwrap profile (the host profile cannot place files)"
                        .into(),
                );
            }
            let cwd = match (&job.spec.cwd, job.spec.writable.first()) {
                (Some(c), _) => {
                    check_cwd(job, c)?;
                    canonical(c, "working directory")?
                }
                (None, Some(_)) => writable[0].clone(),
                (None, None) => {
                    return Err(
                        "the host profile needs a `cwd` or a writable directory to run in".into(),
                    )
                }
            };
            Ok(Plan {
                command: job.argv.clone(),
                host_cwd: cwd,
            })
        }
        Profile::Bwrap => {
            let mut a: Vec<String> = vec![path_str(bwrap)?];
            let push =
                |a: &mut Vec<String>, xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
            push(
                &mut a,
                &[
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--tmpfs",
                    "/tmp",
                    "--unshare-all",
                ],
            );
            if job.spec.network == Network::Host {
                push(&mut a, &["--share-net"]);
            }
            // --new-session: no TIOCSTI into a terminal Keyturn may hold. The
            // kill still reaches everything: SIGTERM/SIGKILL kill bwrap, whose
            // death kills the sandbox's pid 1 (--die-with-parent), which ends
            // the whole PID namespace.
            push(&mut a, &["--die-with-parent", "--new-session"]);
            for w in &writable {
                let w = path_str(w)?;
                push(&mut a, &["--bind", &w, &w]);
            }
            // The private /tmp covers roots below it: bind them back
            // read-only (unless a writable directory already covers them).
            for r in slot_roots(job) {
                let Ok(c) = std::fs::canonicalize(&r) else {
                    continue;
                };
                let c = path_str(&c)?;
                let covered = writable.iter().any(|w| Path::new(&c).starts_with(w));
                if under(&c, "/tmp") && c != "/tmp" && !covered {
                    push(&mut a, &["--ro-bind", &c, &c]);
                }
            }
            for h in job
                .hidden
                .iter()
                .chain(&job.spec.hidden)
                .chain(hidden_default)
            {
                let Ok(c) = std::fs::canonicalize(h) else {
                    continue; // nothing there to hide
                };
                let c = path_str(&c)?;
                if c == "/" {
                    return Err("`/` cannot be hidden".into());
                }
                if Path::new(&c).is_dir() {
                    push(&mut a, &["--tmpfs", &c]);
                } else {
                    push(&mut a, &["--ro-bind", "/dev/null", &c]);
                }
            }
            for s in staged {
                let src = path_str(&s.source)?;
                push(&mut a, &["--ro-bind", &src, &s.dest]);
            }
            let cwd = match &job.spec.cwd {
                Some(c) => {
                    check_cwd(job, c)?;
                    c.clone()
                }
                None => "/tmp".to_string(),
            };
            push(&mut a, &["--chdir", &cwd, "--"]);
            a.extend(job.argv.iter().cloned());
            Ok(Plan {
                command: a,
                host_cwd: PathBuf::from("/"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::RunSpec;

    fn job(spec_toml: &str) -> Job {
        let spec: RunSpec = toml::from_str(spec_toml).unwrap();
        Job {
            run_id: "r".into(),
            argv: vec!["prog".into(), "--flag".into()],
            spec,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            files: vec![],
            hidden: vec![],
            max_output_bytes: 10,
        }
    }

    fn args(j: &Job, hidden: &[String], staged: &[Staged]) -> Vec<String> {
        plan(j, Path::new("/usr/bin/bwrap"), hidden, staged)
            .unwrap()
            .command
    }

    /// Position of the `n`-element window `w` in `a`.
    fn at(a: &[String], w: &[&str]) -> usize {
        a.windows(w.len())
            .position(|x| x.iter().zip(w).all(|(a, b)| a == b))
            .unwrap_or_else(|| panic!("{w:?} not in {a:?}"))
    }

    #[test]
    fn bwrap_profile_order_and_network() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("w");
        let hid = w.join("secret");
        std::fs::create_dir_all(&hid).unwrap();
        let w = w.to_string_lossy().into_owned();
        let hid = hid.to_string_lossy().into_owned();
        let j = job(&format!("argv = [\"prog\"]\nwritable = [\"{w}\"]"));
        let staged = [Staged {
            source: PathBuf::from("/dev/shm/k/f0"),
            dest: "/tmp/cred".into(),
        }];
        let a = args(&j, std::slice::from_ref(&hid), &staged);
        assert_eq!(a[0], "/usr/bin/bwrap");
        assert!(!a.contains(&"--share-net".to_string()));
        let tmp = at(&a, &["--tmpfs", "/tmp"]);
        let bind = at(&a, &["--bind", &w, &w]);
        let hide = at(&a, &["--tmpfs", &hid]);
        let cred = at(&a, &["--ro-bind", "/dev/shm/k/f0", "/tmp/cred"]);
        assert!(tmp < bind && bind < hide && hide < cred, "{a:?}");
        let dd = at(&a, &["--chdir", "/tmp", "--"]);
        assert_eq!(&a[dd + 3..], ["prog", "--flag"]);

        let j = job("argv = [\"prog\"]\nnetwork = \"host\"");
        assert!(args(&j, &[], &[]).contains(&"--share-net".to_string()));
    }

    #[test]
    fn refusals_name_the_problem() {
        let j = job("argv = [\"prog\"]\nwritable = [\"/nonexistent/keyturn\"]");
        let e = plan(&j, Path::new("/b"), &[], &[]).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");

        let j = job("argv = [\"prog\"]\ncwd = \"/etc\"");
        let e = plan(&j, Path::new("/b"), &[], &[]).unwrap_err();
        assert!(e.contains("working directory"), "{e}");

        let j = job("argv = [\"prog\"]\nprofile = \"host\"");
        let e = plan(&j, Path::new("/b"), &[], &[]).unwrap_err();
        assert!(e.contains("host profile needs"), "{e}");

        let mut j = job("argv = [\"prog\"]");
        j.env.push(("MIMALLOC_VERBOSE".into(), "1".into()));
        assert!(plan(&j, Path::new("/b"), &[], &[])
            .unwrap_err()
            .contains("MIMALLOC_VERBOSE"));

        let j = job("argv = [\"prog\"]\nhidden = [\"/\"]");
        assert!(plan(&j, Path::new("/b"), &[], &[]).is_err());
    }
}
