//! Running what was approved: a run-tool's call is checked against its
//! slots before it is queued, its exact argv is fixed at submit and shown to
//! the approver, and once approved Keyturn runs that argv (never anything the
//! agent sends later) through the [`Executor`] port, with credentials from
//! the [`Credentials`] port, and registers the run ([`ports::Runs`]).
//!
//! Output is masked (the content guard, and every credential value the
//! broker holds) and scanned for indirect prompt injection before anything
//! leaves the process.

use super::ports::{
    Credentials, ExecError, Executor, Finished, Job, KillSwitch, RunRecord, RunRefused,
};
use super::{now_ms, AppError, Gateway, Submission};
use crate::domain::audit::AuditEvent;
use crate::domain::request::{ApprovalRequest, State};
use crate::domain::run::{self, Output, RunPlan, RunSpec, RunState};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// `PATH` inside a run unless the tool sets its own.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What this process needs to run tools: set once by `serve`.
pub struct Runner {
    executor: Arc<dyn Executor>,
    credentials: Arc<dyn Credentials>,
    /// Runs this process started and that still run: their kill switches.
    live: Mutex<HashMap<String, KillSwitch>>,
    /// Paths hidden in every sandbox (the database, config, sockets).
    hidden: Vec<String>,
    host: String,
    server_pid: i64,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Runner {
    pub fn new(
        executor: Arc<dyn Executor>,
        credentials: Arc<dyn Credentials>,
        hidden: Vec<String>,
        host: String,
        server_pid: i64,
        max_concurrent: usize,
    ) -> Runner {
        Runner {
            executor,
            credentials,
            live: Mutex::default(),
            hidden,
            host,
            server_pid,
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1))),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, KillSwitch>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A run-tool call after its checks: the exact argv that will run (never
/// shown: it may hold secrets) and the plan as stored and shown.
#[derive(Clone)]
pub struct Prepared {
    pub spec: RunSpec,
    pub argv: Vec<String>,
    pub plan: RunPlan,
}

/// What `run` answers beside the decision.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run_id: String,
    /// `exited`, `killed`, `timed_out` or `failed_to_start`.
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub stdout: Output,
    pub stderr: Output,
    /// Content flags found in the output (indirect prompt injection…).
    pub flags: Vec<serde_json::Value>,
    /// Why it did not start, when it did not.
    pub error: Option<String>,
}

fn run_error(code: &'static str, message: impl Into<String>) -> AppError {
    AppError::Run {
        code,
        message: message.into(),
    }
}

impl Gateway {
    /// Gives this process what it needs to run tools (`serve`, at start).
    pub fn set_runner(&self, runner: Runner) {
        let _ = self.runner.set(runner);
    }

    fn runner(&self) -> Result<&Runner, AppError> {
        self.runner.get().ok_or_else(|| {
            run_error(
                "run_unavailable",
                "this tool is run by Keyturn, but this process cannot run tools",
            )
        })
    }

    /// The tool's `run` section, if Keyturn runs it.
    pub fn run_spec(&self, tool: &str) -> Option<&RunSpec> {
        self.cfg
            .tools
            .iter()
            .find(|t| t.name == tool)
            .and_then(|t| t.run.as_ref())
    }

    /// Checks a run-tool call's arguments against its slots and resolves
    /// its path slots, before anything is queued: the error names the slot
    /// and the rule. `None` for a tool Keyturn does not run.
    pub fn prepare_run(&self, s: &Submission) -> Result<Option<Prepared>, AppError> {
        let Some(spec) = self.run_spec(&s.tool) else {
            return Ok(None);
        };
        let runner = self.runner()?;
        let checked = run::check_args(spec, &s.args)
            .map_err(|e| super::bad(format!("tool `{}`: {e}", s.tool)))?;
        let mut values = checked.values;
        for p in &checked.paths {
            let resolved = runner
                .executor
                .resolve_path(&p.path, &p.roots, p.must_exist)
                .map_err(|rule| {
                    super::bad(format!("tool `{}`: argument `{}`: {rule}", s.tool, p.slot))
                })?;
            values.insert(p.slot.clone(), resolved);
        }
        let argv = run::render(spec, &values).map_err(super::bad)?;
        let plan = RunPlan {
            argv: argv.iter().map(|a| self.mask_text(a)).collect(),
            profile: spec.profile,
            network: spec.network,
            writable: spec.writable.clone(),
            credentials: spec.credentials.iter().map(|c| c.name.clone()).collect(),
            timeout_ms: spec.timeout_ms,
        };
        Ok(Some(Prepared {
            spec: spec.clone(),
            argv,
            plan,
        }))
    }

    /// Masks text for showing: the content guard's masker, then every
    /// credential value the broker holds.
    fn mask_text(&self, text: &str) -> String {
        let masked = self.redactor.redact_text(text).0;
        let Some(runner) = self.runner.get() else {
            return masked;
        };
        String::from_utf8_lossy(&mask_credentials(
            masked.as_bytes(),
            &runner.credentials.values(),
        ))
        .into_owned()
    }

    /// Submits a run-tool call (the `run` method): checks it, queues it or
    /// has it decided, like `submit`. The caller waits for the decision,
    /// then calls [`Gateway::execute`] with the same [`Prepared`].
    pub async fn submit_run(
        &self,
        agent: &str,
        s: Submission,
    ) -> Result<(ApprovalRequest, Prepared), AppError> {
        self.validate(&s)?;
        let prepared = self.prepare_run(&s)?.ok_or_else(|| {
            super::bad(format!(
                "tool `{}` has no `run` section: Keyturn does not run it (use submit)",
                s.tool.chars().take(64).collect::<String>()
            ))
        })?;
        let r = self
            .submit_planned(agent, s, Some(prepared.plan.clone()))
            .await?;
        Ok((r, prepared))
    }

    /// Runs an approved run-tool request: exactly `prepared.argv`, which must
    /// still be what the request was approved with. A request runs once.
    pub async fn execute(
        &self,
        r: &ApprovalRequest,
        prepared: Prepared,
        args: &serde_json::Value,
    ) -> Result<RunResult, AppError> {
        let runner = self.runner()?;
        if r.state != State::Approved {
            return Err(run_error(
                "not_approved",
                format!(
                    "request {} is {}, not approved: nothing was run",
                    r.id, r.state
                ),
            ));
        }
        // What runs is what was approved: the same arguments (hash) and
        // the same argv as stored with the request.
        if crate::domain::redact::args_hash(args) != r.args_hash
            || r.run.as_ref() != Some(&prepared.plan)
        {
            return Err(run_error(
                "run_mismatch",
                format!(
                    "request {} was approved for other arguments or another argv: nothing was run",
                    r.id
                ),
            ));
        }
        // Paths are resolved again just before the start: a symlink swapped
        // since the approval refuses the run instead of following it.
        let again = self.prepare_run(&Submission {
            tool: r.tool.clone(),
            args: args.clone(),
            ..Submission::default()
        })?;
        if again.as_ref().map(|p| &p.argv) != Some(&prepared.argv) {
            return Err(run_error(
                "run_mismatch",
                "a path in the arguments resolves differently than when it was approved: nothing was run",
            ));
        }
        let Ok(permit) = runner.slots.clone().try_acquire_owned() else {
            return Err(run_error(
                "too_many_runs",
                format!(
                    "{} runs are already going in this process ([run] max_concurrent): try again later",
                    self.cfg.run.max_concurrent
                ),
            ));
        };
        let spec = &prepared.spec;
        // The environment: nothing of Keyturn's unless declared.
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
            env.retain(|(n, _)| n != k);
            env.push((k.to_string(), v));
        };
        for k in &spec.pass_env {
            if run::never_passed(k) {
                continue;
            }
            if let Ok(v) = std::env::var(k) {
                set(&mut env, k, v);
            }
        }
        for (k, v) in &spec.env {
            set(&mut env, k, v.clone());
        }
        let run_id = uuid::Uuid::now_v7().to_string();
        // How what is left of the run is found again, whatever its group.
        set(&mut env, "KEYTURN_RUN_ID", run_id.clone());
        let mut files = Vec::new();
        let mut used = Vec::new();
        let mut secrets: Vec<Vec<u8>> = runner.credentials.values();
        for c in &spec.credentials {
            let fetched = match runner.credentials.fetch(&c.name).await {
                Ok(f) => f,
                Err(e) => {
                    // Approved, but not run: said to the agent and audited.
                    let why = format!("{e}: nothing was run");
                    self.store
                        .append_audit(vec![AuditEvent {
                            at_ms: now_ms(),
                            kind: "run_failed".into(),
                            actor: format!("agent:{}", r.agent),
                            request_id: Some(r.id.to_string()),
                            detail: json!({"tool": r.tool, "error": why, "credential": c.name}),
                        }])
                        .await?;
                    return Err(run_error("credential_unavailable", why));
                }
            };
            secrets.push(fetched.value.clone());
            if let Some(var) = &c.env {
                set(
                    &mut env,
                    var,
                    String::from_utf8_lossy(&fetched.value).into_owned(),
                );
            }
            if let Some(file) = &c.file {
                files.push((file.clone(), fetched.value.clone()));
                if let Some(var) = &c.path_env {
                    set(&mut env, var, file.clone());
                }
            }
            used.push((c.name.clone(), fetched.profile.clone()));
        }
        let now = now_ms();
        let approved_by = r.decided_who.clone().unwrap_or_else(|| "policy".into());
        let mut rec = RunRecord {
            id: run_id.clone(),
            request_id: r.id,
            agent: r.agent.clone(),
            tool: r.tool.clone(),
            argv: prepared.plan.argv.clone(),
            profile: spec.profile,
            pid: None,
            host: runner.host.clone(),
            server_pid: runner.server_pid,
            approved_by,
            started_ms: now,
            deadline_ms: now + spec.timeout_ms as i64,
            state: RunState::Running,
            ended_ms: None,
            exit_code: None,
            signal: None,
            stdout_sha256: None,
            stderr_sha256: None,
            kill_requested_by: None,
        };
        match self
            .store
            .run_started(rec.clone(), run_event("run_started", &rec, json!({
                "argv": rec.argv, "profile": rec.profile, "approved_by": rec.approved_by,
                "deadline_ms": rec.deadline_ms,
                "credentials": used.iter().map(|(n, p)| json!({"name": n, "profile": p})).collect::<Vec<_>>(),
            })))
            .await?
        {
            Ok(()) => {}
            Err(RunRefused::AlreadyRun { run_id, .. }) => {
                return Err(run_error(
                    "already_run",
                    format!("request {} has already been run (run {run_id}); an approval runs once", r.id),
                ))
            }
        }
        let job = Job {
            run_id: run_id.clone(),
            argv: prepared.argv.clone(),
            spec: spec.clone(),
            env,
            files,
            hidden: runner.hidden.clone(),
            max_output_bytes: self.cfg.run.max_output_bytes,
        };
        tracing::info!(run.id = %run_id, request.id = %r.id, tool = %r.tool, profile = spec.profile.as_str(), "run starting");
        let started = match runner.executor.start(job).await {
            Ok(s) => s,
            Err(ExecError(why)) => {
                let why = String::from_utf8_lossy(&mask_credentials(why.as_bytes(), &secrets))
                    .into_owned();
                let why = self.redactor.redact_text(&why).0;
                rec.state = RunState::FailedToStart;
                rec.ended_ms = Some(now_ms());
                let ev = run_event("run_failed", &rec, json!({"error": why}));
                self.store.run_ended(rec.clone(), ev).await?;
                tracing::warn!(run.id = %run_id, error = %why, "run did not start");
                drop(permit);
                return Ok(RunResult {
                    run_id,
                    state: RunState::FailedToStart,
                    exit_code: None,
                    signal: None,
                    duration_ms: 0,
                    stdout: empty_output(),
                    stderr: empty_output(),
                    flags: vec![],
                    error: Some(why),
                });
            }
        };
        rec.pid = Some(i64::from(started.pid));
        runner.live().insert(run_id.clone(), started.kill.clone());
        if let Err(e) = self.store.run_pid(&run_id, i64::from(started.pid)).await {
            tracing::warn!(run.id = %run_id, error = %e, "could not record the run's pid");
        }
        // A kill asked for before the switch was registered.
        if let Ok(Some(stored)) = self.store.run(&run_id).await {
            if stored.kill_requested_by.is_some() {
                started.kill.kill();
            }
        }
        let finished = started.finished.await;
        runner.live().remove(&run_id);
        drop(permit);
        let f = match finished {
            Ok(f) => f,
            Err(_) => Finished {
                state: RunState::Killed,
                exit_code: None,
                signal: None,
                duration_ms: (now_ms() - now).max(0) as u64,
                stdout: vec![],
                stdout_size: 0,
                stdout_sha256: String::new(),
                stderr: vec![],
                stderr_size: 0,
                stderr_sha256: String::new(),
            },
        };
        for (name, profile) in &used {
            let mut both = f.stdout.clone();
            both.extend_from_slice(&f.stderr);
            runner.credentials.report(name, profile, f.exit_code, &both);
        }
        let stdout = self.shown_output(&f.stdout, f.stdout_size, &f.stdout_sha256, &secrets);
        let stderr = self.shown_output(&f.stderr, f.stderr_size, &f.stderr_sha256, &secrets);
        let mut flags: Vec<serde_json::Value> = Vec::new();
        for (stream, o) in [("stdout", &stdout), ("stderr", &stderr)] {
            for flag in self.scanner.scan_output(stream, &o.text) {
                let flag = crate::domain::flags::Flag {
                    kind: flag.kind,
                    detail: self.redactor.redact_text(&flag.detail).0,
                };
                if let Ok(v) = serde_json::to_value(&flag) {
                    flags.push(v);
                }
            }
        }
        let stored = self.store.run(&run_id).await.ok().flatten();
        rec.kill_requested_by = stored.and_then(|s| s.kill_requested_by);
        rec.state = f.state;
        rec.exit_code = f.exit_code;
        rec.signal = f.signal;
        rec.ended_ms = Some(now_ms());
        rec.stdout_sha256 = Some(f.stdout_sha256.clone());
        rec.stderr_sha256 = Some(f.stderr_sha256.clone());
        let kind = match f.state {
            RunState::Killed => "run_killed",
            RunState::TimedOut => "run_timed_out",
            _ => "run_exited",
        };
        let ev = run_event(
            kind,
            &rec,
            json!({
                "exit_code": f.exit_code, "signal": f.signal, "duration_ms": f.duration_ms,
                "stdout_sha256": f.stdout_sha256, "stdout_bytes": f.stdout_size,
                "stderr_sha256": f.stderr_sha256, "stderr_bytes": f.stderr_size,
                "killed_by": rec.kill_requested_by, "flags": flags,
            }),
        );
        self.store.run_ended(rec, ev).await?;
        tracing::info!(run.id = %run_id, state = f.state.as_str(), exit_code = ?f.exit_code, signal = ?f.signal, duration_ms = f.duration_ms, "run ended");
        Ok(RunResult {
            run_id,
            state: f.state,
            exit_code: f.exit_code,
            signal: f.signal,
            duration_ms: f.duration_ms,
            stdout,
            stderr,
            flags,
            error: None,
        })
    }

    /// Output as it leaves the process: credential values masked (also one
    /// cut in half by the cap), then the content guard's masker.
    fn shown_output(&self, kept: &[u8], size: u64, sha256: &str, secrets: &[Vec<u8>]) -> Output {
        let masked = mask_credentials(kept, secrets);
        let text = self
            .redactor
            .redact_text(&String::from_utf8_lossy(&masked))
            .0;
        Output::shown(text, kept.len(), size, sha256.to_string())
    }

    /// Kills a running run (the whole process group), wherever it runs:
    /// here at once, on another replica through the store's change feed.
    pub async fn kill_run(&self, run_id: &str, by: &str) -> Result<RunRecord, AppError> {
        let Some(rec) = self.store.run(run_id).await? else {
            return Err(AppError::NotFound(format!("run {run_id}")));
        };
        if rec.state != RunState::Running {
            return Err(run_error(
                "not_running",
                format!("run {run_id} is not running (it {})", rec.state.as_str()),
            ));
        }
        let ev = run_event("run_kill_requested", &rec, json!({"by": by}));
        if !self.store.request_kill(run_id, by.to_string(), ev).await? {
            return Err(run_error(
                "not_running",
                format!("run {run_id} is not running"),
            ));
        }
        self.kill_local(run_id);
        Ok(self.store.run(run_id).await?.unwrap_or(rec))
    }

    /// Kills a run if this process runs it (from [`Change::KillRun`]).
    pub(super) fn kill_local(&self, run_id: &str) {
        if let Some(runner) = self.runner.get() {
            if let Some(k) = runner.live().get(run_id).cloned() {
                tracing::warn!(run.id = %run_id, "killing run on request");
                k.kill();
            }
        }
    }

    /// After a lag or a resync of the change feed (a [`Change::KillRun`]
    /// may have been missed): kills every local run a kill was asked for.
    pub(super) async fn recheck_kills(&self) {
        let Some(runner) = self.runner.get() else {
            return;
        };
        let ids: Vec<String> = runner.live().keys().cloned().collect();
        for id in ids {
            if let Ok(Some(rec)) = self.store.run(&id).await {
                if rec.kill_requested_by.is_some() {
                    self.kill_local(&id);
                }
            }
        }
    }

    /// The process registry, newest first (`keyturn ps`, `/runs`).
    pub async fn runs(&self, running_only: bool, limit: u32) -> Result<Vec<RunRecord>, AppError> {
        Ok(self.store.runs(running_only, limit.min(1000)).await?)
    }

    pub async fn run_record(&self, run_id: &str) -> Result<Option<RunRecord>, AppError> {
        Ok(self.store.run(run_id).await?)
    }

    /// The run of a request, if it was run (for its card).
    pub async fn run_of_request(
        &self,
        id: crate::domain::RequestId,
    ) -> Result<Option<RunRecord>, AppError> {
        Ok(self.store.run_of_request(id).await?)
    }

    /// Runs left `running` by a Keyturn process on this host that is gone
    /// (a crash, a SIGKILL): what is left of each is killed, and each is
    /// recorded as `interrupted`. Called by `serve` at start.
    pub async fn recover_runs(&self) -> Result<usize, AppError> {
        let runner = self.runner()?;
        let mut n = 0;
        for mut rec in self.store.runs(true, 10_000).await? {
            if rec.host != runner.host
                || rec.server_pid == runner.server_pid
                || runner.executor.process_exists(rec.server_pid)
            {
                continue;
            }
            runner
                .executor
                .kill_leftover(&rec.id, rec.pid.unwrap_or(0), rec.started_ms);
            rec.state = RunState::Interrupted;
            rec.ended_ms = Some(now_ms());
            let ev = run_event(
                "run_interrupted",
                &rec,
                json!({"why": "keyturn stopped while it ran; what was left of it was killed at restart"}),
            );
            self.store.run_ended(rec.clone(), ev).await?;
            tracing::warn!(run.id = %rec.id, request.id = %rec.request_id, "run interrupted by a Keyturn restart; recorded as interrupted");
            n += 1;
        }
        Ok(n)
    }

    /// Credential status, names only (`keyturn credentials status`).
    pub fn credentials_status(&self) -> Result<Vec<super::ports::CredentialStatus>, AppError> {
        Ok(self.runner()?.credentials.status())
    }

    /// Puts a credential's set-aside profiles back, audited.
    pub async fn credentials_reset(&self, name: &str, by: &str) -> Result<(), AppError> {
        if !self.runner()?.credentials.reset(name) {
            return Err(AppError::NotFound(format!("credential `{name}`")));
        }
        self.store
            .append_audit(vec![AuditEvent {
                at_ms: now_ms(),
                kind: "credentials_reset".into(),
                actor: by.to_string(),
                request_id: None,
                detail: json!({"credential": name}),
            }])
            .await?;
        Ok(())
    }

    /// Re-reads every credential source (SIGHUP).
    pub async fn reload_credentials(&self) {
        if let Some(r) = self.runner.get() {
            r.credentials.reload().await;
        }
    }
}

fn empty_output() -> Output {
    Output::shown(String::new(), 0, 0, String::new())
}

fn run_event(kind: &str, rec: &RunRecord, mut detail: serde_json::Value) -> AuditEvent {
    if let serde_json::Value::Object(m) = &mut detail {
        m.insert("run_id".into(), json!(rec.id));
        m.insert("tool".into(), json!(rec.tool));
        m.insert("pid".into(), json!(rec.pid));
    }
    AuditEvent {
        at_ms: now_ms(),
        kind: kind.into(),
        actor: format!("agent:{}", rec.agent),
        request_id: Some(rec.request_id.to_string()),
        detail,
    }
}

/// Replaces every occurrence of each secret (at least 4 bytes) with
/// `[credential]`, and drops a tail that is the start of one (the output
/// cap may cut a secret in half).
pub fn mask_credentials(bytes: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let secrets: Vec<&[u8]> = secrets
        .iter()
        .map(|s| s.as_slice())
        .filter(|s| s.len() >= 4)
        .collect();
    if secrets.is_empty() {
        return bytes.to_vec();
    }
    let Ok(ac) = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .build(&secrets)
    else {
        return b"[withheld: the output could not be masked]".to_vec();
    };
    let mut out = Vec::with_capacity(bytes.len());
    ac.replace_all_with_bytes(bytes, &mut out, |_, _, dst| {
        dst.extend_from_slice(b"[credential]");
        true
    });
    // A tail that starts a secret (cut by the cap): masked too.
    let mut cut = 0;
    for s in &secrets {
        for k in (4.min(s.len())..s.len()).rev() {
            if out.ends_with(&s[..k]) {
                cut = cut.max(k);
                break;
            }
        }
    }
    if cut > 0 {
        out.truncate(out.len() - cut);
        out.extend_from_slice(b"[credential]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::mask_credentials;

    #[test]
    fn credentials_are_masked_whole_and_cut() {
        let s = vec![b"hunter2-secret".to_vec()];
        assert_eq!(
            mask_credentials(b"a hunter2-secret b", &s),
            b"a [credential] b".to_vec()
        );
        assert_eq!(
            mask_credentials(b"tail hunter2-se", &s),
            b"tail [credential]".to_vec()
        );
        assert_eq!(mask_credentials(b"plain", &s), b"plain".to_vec());
        // Too short to mask safely without masking everything.
        assert_eq!(mask_credentials(b"abc", &[b"ab".to_vec()]), b"abc".to_vec());
    }
}
