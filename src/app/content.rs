//! The content guard's use-cases on [`Gateway`]: masking and scanning a
//! call before the policy sees it (a flagged call asks a human, per
//! `content.ask_on_flags`), the lethal-trifecta guard (decided by the store
//! in the transaction that stores the call; read here only for `check`),
//! `verify` of arguments against an approval, and audit retention.
//! The rules themselves are pure, in `domain::{redact, flags, trifecta, audit}`.

use super::ports::Pruned;
use super::{now_ms, AppError, Gateway, Submission};
use crate::domain::flags::{Flag, FlagKind};
use crate::domain::redact::{self, Finding};
use crate::domain::request::{RequestId, State};
use crate::domain::trifecta;
use serde::Serialize;

/// What `verify` answers: does an argument object match what was approved?
#[derive(Debug, Clone, Serialize)]
pub struct VerifyAnswer {
    pub request_id: String,
    /// The given arguments hash to the request's `args_hash`.
    pub matches: bool,
    /// The request is approved.
    pub approved: bool,
    pub state: State,
    /// Hash of the arguments given to `verify`.
    pub args_hash: String,
    /// Hash of the arguments the request was submitted (and approved) with.
    pub expected_hash: String,
}

/// The content guard's view of one call: what may be shown and stored, the
/// flags raised, and what they do to the policy.
pub(super) struct Content {
    pub(super) args: serde_json::Value,
    pub(super) justification: String,
    pub(super) flags: Vec<serde_json::Value>,
    pub(super) raise_risk: Option<String>,
    pub(super) force_deny: Option<(String, String)>,
    pub(super) force_ask: Option<(String, String)>,
}

/// At most this many `encoded_secret` flags per call; the rest are counted.
const MAX_ENCODED_FLAGS: usize = 20;

/// One `encoded_secret` flag per secret the masker found behind an encoding
/// (in the justification, then the arguments), so the approver is told even
/// where the span itself was masked. Details name the format and the
/// encoding, never the secret.
fn encoded_secret_flags(justification: &[Finding], args: &[Finding]) -> Vec<Flag> {
    let mut details: Vec<String> = Vec::new();
    let found = justification
        .iter()
        .map(|f| (f, "justification".to_owned()))
        .chain(args.iter().map(|f| (f, format!("args{}", f.path))))
        .filter(|(f, _)| f.kind == redact::ENCODED_SECRET);
    for (f, at) in found {
        let d = format!("{} in {at}", f.via.as_deref().unwrap_or("a secret"));
        if !details.contains(&d) {
            details.push(d);
        }
    }
    let more = details.len().saturating_sub(MAX_ENCODED_FLAGS);
    details.truncate(MAX_ENCODED_FLAGS);
    if more > 0 {
        details.push(format!("and {more} more"));
    }
    details
        .into_iter()
        .map(|detail| Flag {
            kind: FlagKind::EncodedSecret,
            detail,
        })
        .collect()
}

impl Gateway {
    /// Masks and scans one call; with `read_trifecta` (for `check`, which
    /// stores nothing) also reads the trifecta history. Fail closed: if
    /// masking or scanning fails, the arguments are withheld and the call is
    /// denied; if the history cannot be read, the call fails.
    pub(super) async fn content(
        &self,
        agent: &str,
        s: &Submission,
        read_trifecta: bool,
    ) -> Result<Content, AppError> {
        let guarded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let args = self.redactor.redact_value(&s.args);
            let (justification, jf) = self.redactor.redact_text(&s.justification);
            let mut flags = self.scanner.scan(&s.tool, &s.args, &s.justification);
            flags.extend(encoded_secret_flags(&jf, &args.findings));
            (args.value, justification, flags)
        }));
        let Ok((args, justification, flags)) = guarded else {
            tracing::error!(agent = %agent, tool = %s.tool, "content guard failed; denying the call");
            return Ok(Content {
                args: serde_json::json!({"withheld": "the content guard failed on these arguments"}),
                justification: "[withheld]".into(),
                flags: vec![],
                raise_risk: None,
                force_deny: Some((
                    "content_guard_failed".into(),
                    "the arguments could not be masked and scanned, so the call is denied".into(),
                )),
                force_ask: None,
            });
        };
        // Flag details quote paths and hosts: mask them like everything else.
        let flags: Vec<Flag> = flags
            .into_iter()
            .map(|f| Flag {
                kind: f.kind,
                detail: self.redactor.redact_text(&f.detail).0,
            })
            .collect();
        let c = &self.cfg.content;
        let mut kinds: Vec<&str> = flags.iter().map(|f| f.kind.as_str()).collect();
        kinds.dedup();
        let raise_risk = (c.raise_risk_on_flags && !flags.is_empty())
            .then(|| format!("content flags: {}", kinds.join(", ")));
        let force_deny = flags
            .iter()
            .find(|f| c.deny_on_flags.contains(&f.kind))
            .map(|f| {
                (
                    format!("flag_{}", f.kind.as_str()),
                    format!(
                        "{} flag (content.deny_on_flags denies it): {}",
                        f.kind.as_str(),
                        f.detail
                    ),
                )
            });
        // Any flag of a kind in `ask_on_flags` (default: every kind) sends
        // the call to a human, so a flag on a low-risk tool is seen.
        let ask_on = self.cfg.ask_on_flags(&s.tool);
        let mut force_ask = flags.iter().find(|f| ask_on.contains(f.kind)).map(|f| {
            let more = flags.len() - 1;
            (
                format!("flag_{}", f.kind.as_str()),
                format!(
                    "{} flag: {}{} (content.ask_on_flags sends flagged calls to a human)",
                    f.kind.as_str(),
                    f.detail,
                    if more > 0 {
                        format!(" (and {more} more flag(s))")
                    } else {
                        String::new()
                    }
                ),
            )
        });
        if force_ask.is_none() && read_trifecta {
            force_ask = self
                .trifecta(agent, s)
                .await?
                .map(|r| ("trifecta".into(), r));
        }
        Ok(Content {
            args,
            justification,
            flags: flags
                .iter()
                .filter_map(|f| serde_json::to_value(f).ok())
                .collect(),
            raise_risk,
            force_deny,
            force_ask,
        })
    }

    /// The trifecta reason for this call from the stored history (for
    /// `check`; `submit` has the store decide in the insert's transaction).
    async fn trifecta(&self, agent: &str, s: &Submission) -> Result<Option<String>, AppError> {
        let tags = self.cfg.tool_tags(&s.tool);
        if tags.is_empty() {
            return Ok(None);
        }
        let since = now_ms() - self.cfg.content.trifecta_window.0.as_millis() as i64;
        let history = self
            .store
            .trifecta_history(agent, s.user_id.as_deref(), since)
            .await?;
        let who = trifecta::who(agent, s.user_id.as_deref(), &self.trifecta_window_label());
        Ok(trifecta::check(&who, &history, &s.tool, tags))
    }

    /// `content.trifecta_window` as people write it (`24h`, `90m`, `45s`).
    pub(super) fn trifecta_window_label(&self) -> String {
        let secs = self.cfg.content.trifecta_window.0.as_secs();
        match secs {
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    /// Whether `args` are exactly the arguments request `id` was submitted
    /// with (compared by the SHA-256 of their canonical JSON), and whether it
    /// is approved. Nothing about `args` is stored or logged.
    pub async fn verify_args(
        &self,
        id: RequestId,
        agent: Option<&str>,
        args: &serde_json::Value,
    ) -> Result<VerifyAnswer, AppError> {
        let r = self.status_for(id, agent).await?;
        let given = redact::args_hash(args);
        Ok(VerifyAnswer {
            request_id: r.id.to_string(),
            matches: given == r.args_hash,
            approved: r.state == State::Approved,
            state: r.state,
            args_hash: given,
            expected_hash: r.args_hash,
        })
    }

    /// Prunes audit entries older than `days` days (retention), leaving a
    /// checkpoint entry so the rest of the chain still verifies.
    pub async fn prune_audit(&self, days: u32) -> Result<Option<Pruned>, AppError> {
        let now = now_ms();
        let cutoff = now - i64::from(days) * 86_400_000;
        let pruned = self.store.prune_audit(cutoff, now).await?;
        if let Some(p) = &pruned {
            tracing::info!(
                entries = p.entries,
                through_seq = p.through_seq,
                retention_days = days,
                "pruned the audit log"
            );
        }
        Ok(pruned)
    }
}
