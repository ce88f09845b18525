//! Submitting a call: validation, content scan, the policy verdict, and the
//! guarded insert that queues it or records the policy's decision.

use super::ports::Inserted;
use super::*;

impl Gateway {
    pub(super) fn validate(&self, s: &Submission) -> Result<(), AppError> {
        policy::validate_tool_name(&s.tool).map_err(bad)?;
        if !s.args.is_object() {
            return Err(bad("`args` must be a JSON object"));
        }
        let size = s.args.to_string().len();
        if size > self.cfg.server.max_args_bytes {
            return Err(bad(format!(
                "`args` is {size} bytes; the limit is {} (server.max_args_bytes)",
                self.cfg.server.max_args_bytes
            )));
        }
        if s.justification.len() > self.cfg.server.max_justification_bytes {
            return Err(bad(format!(
                "`justification` is {} bytes; the limit is {}",
                s.justification.len(),
                self.cfg.server.max_justification_bytes
            )));
        }
        for (field, v, kind) in [
            ("user_id", &s.user_id, "user"),
            ("channel_id", &s.channel_id, "channel"),
        ] {
            if let Some(v) = v {
                if v.len() > MAX_ID_LEN || Scope::new(kind, v).is_err() {
                    return Err(bad(format!(
                        "`{field}` must be 1-{MAX_ID_LEN} characters of letters, digits, `_-.@`"
                    )));
                }
            }
        }
        for (field, v) in [
            ("task_id", &s.task_id),
            ("idempotency_key", &s.idempotency_key),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > MAX_KEY_LEN || v.chars().any(char::is_control) {
                    return Err(bad(format!(
                        "`{field}` must be 1-{MAX_KEY_LEN} bytes without control characters"
                    )));
                }
            }
        }
        if !(s.cost.is_finite() && s.cost >= 0.0) {
            return Err(bad("`cost` must be a finite number >= 0"));
        }
        if let Some(c) = s.confidence {
            policy::validate_confidence(c).map_err(bad)?;
        }
        if s.timeout_secs == Some(0) {
            return Err(bad("`timeout_secs` must be at least 1"));
        }
        // Names and ids are logged, stored and shown as they are (they key
        // lookups, so they cannot be masked): one that holds a secret is
        // refused, and the error names the format, never the value.
        for (field, v, strict) in [
            ("tool", Some(&s.tool), true),
            ("user_id", s.user_id.as_ref(), true),
            ("channel_id", s.channel_id.as_ref(), true),
            ("task_id", s.task_id.as_ref(), false),
            ("idempotency_key", s.idempotency_key.as_ref(), false),
        ] {
            if let Some(kind) = v.and_then(|v| self.secret_in_name(v, strict)) {
                return Err(bad(format!(
                    "`{field}` looks like it holds a secret ({kind}); names and ids are logged \
                     and shown as they are, so put secrets in `args`, where they are masked"
                )));
            }
        }
        Ok(())
    }

    /// The kind of secret in a name or id, if any. Random-looking ids
    /// (`high_entropy`) are refused only where `strict`: task ids and
    /// idempotency keys are often random by design.
    pub(super) fn secret_in_name(&self, v: &str, strict: bool) -> Option<String> {
        let (_, findings) = self.redactor.redact_text(v);
        findings
            .into_iter()
            .find(|f| strict || f.kind != "high_entropy")
            .map(|f| f.kind)
    }

    /// A display name (operator or pairing user) as stored and shown: secrets
    /// masked first, then cut to 100 characters, so a cut never leaves half
    /// a secret unrecognised.
    pub(super) fn display_name(&self, name: &str) -> String {
        self.redactor
            .redact_text(name)
            .0
            .chars()
            .take(100)
            .collect()
    }

    pub(super) fn evaluate(
        &self,
        agent: &str,
        s: &Submission,
        content: &Content,
        now: i64,
        dry_run: bool,
    ) -> (Verdict, Risk, AllowlistAnswer) {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        if view.unavailable.is_some() {
            // Fail closed: a view that could not be refreshed may still
            // allow what was revoked.
            let detail = "the policy could not be loaded from the store, so every call is \
                          denied until it is (see the server log)"
                .to_string();
            let verdict = Verdict::Deny {
                rule: POLICY_UNAVAILABLE.into(),
                detail: detail.clone(),
            };
            let allowlist = AllowlistAnswer {
                allowed: false,
                rule: POLICY_UNAVAILABLE,
                deciding_scope: None,
                matched: None,
                entries: vec![],
                detail,
            };
            return (verdict, Risk::High, allowlist);
        }
        let no_roles = Vec::new();
        let roles = s
            .user_id
            .as_ref()
            .and_then(|u| view.users.get(u))
            .unwrap_or(&no_roles);
        let call = Call {
            agent,
            user: s.user_id.as_deref(),
            roles,
            channel: s.channel_id.as_deref(),
            tool: &s.tool,
            task: s.task_id.as_deref(),
            cost: s.cost,
        };
        let agent_cfg = self.cfg.agent(agent);
        let risk = view.risks.get(&s.tool).copied().unwrap_or(Risk::High);
        let facts = Facts {
            agent_known: agent_cfg.is_some(),
            user_paired: s
                .user_id
                .as_ref()
                .is_some_and(|u| view.users.contains_key(u)),
            unattended: s.unattended || agent_cfg.is_some_and(|a| a.unattended),
            risk,
            raise_risk: content.raise_risk.clone(),
            force_deny: content.force_deny.clone(),
            force_ask: content.force_ask.clone(),
            paused: policy::pause_for(&view.pauses, agent).cloned(),
            confidence: s.confidence,
            min_confidence: agent_cfg
                .and_then(|a| a.min_confidence)
                .or(self.cfg.policy.min_confidence),
        };
        let allowlist = policy::resolve_allowlist(&view.grants, &call);
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let args_hash = redact::args_hash(&s.args);
        let verdict = policy::evaluate_with_timed(
            &self.settings,
            &view.grants,
            &view.timed,
            Some(&args_hash),
            &call,
            &facts,
            &mut limits,
            now,
            dry_run,
        );
        (verdict, risk, allowlist)
    }

    /// What the policy would do with `s`, without queueing or using a token.
    pub async fn check(&self, agent: &str, s: &Submission) -> Result<CheckAnswer, AppError> {
        self.validate(s)?;
        self.prepare_run(s)?;
        let content = self.content(agent, s, true).await?;
        let (verdict, risk, allowlist) = self.evaluate(agent, s, &content, now_ms(), true);
        Ok(CheckAnswer {
            verdict,
            risk,
            allowlist,
            flags: content.flags,
        })
    }

    /// Submits a call. Returns the request, already terminal when the policy
    /// decided it, or pending (persisted, with its deadline scheduled).
    pub async fn submit(&self, agent: &str, s: Submission) -> Result<ApprovalRequest, AppError> {
        self.validate(&s)?;
        // A tool Keyturn runs is checked against its slots here too, and
        // its request carries the argv the approver is shown.
        let plan = self.prepare_run(&s)?.map(|p| p.plan);
        self.submit_planned(agent, s, plan).await
    }

    /// [`Gateway::submit`] once validated, with a run-tool's plan.
    pub(super) async fn submit_planned(
        &self,
        agent: &str,
        s: Submission,
        plan: Option<crate::domain::run::RunPlan>,
    ) -> Result<ApprovalRequest, AppError> {
        if let Some(key) = &s.idempotency_key {
            // A fast answer for a retry, before the policy spends anything.
            // The writer checks again in the insert's transaction (races).
            if let Some(held) = self.store.find_by_idempotency_key(agent, key).await? {
                let args_hash = redact::args_hash(&s.args);
                let fp = crate::domain::request::submission_fingerprint(
                    agent,
                    &s.tool,
                    &args_hash,
                    s.user_id.as_deref(),
                    s.channel_id.as_deref(),
                    s.task_id.as_deref(),
                );
                if held.fingerprint.as_deref() == Some(fp.as_str()) {
                    return Ok(held.request);
                }
                self.store
                    .append_audit(vec![events::idempotency_conflict(
                        now_ms(),
                        &held.request,
                        &s.tool,
                        &args_hash,
                    )])
                    .await?;
                return Err(conflict(&held.request));
            }
        }
        let mut content = self.content(agent, &s, false).await?;
        // Anomaly rules see the call before the policy: their actions
        // (`raise_risk`, `pause`) apply to this very call.
        let anomaly = self.anomaly_on_call(agent, &s).await;
        if content.force_ask.is_none() {
            content.force_ask = anomaly.force_ask;
        }
        if content.force_deny.is_none() {
            content.force_deny = anomaly.force_deny;
        }
        let now = now_ms();
        let confidence = s.confidence;
        let (verdict, tool_risk, _) = self.evaluate(agent, &s, &content, now, false);
        let Content {
            args,
            justification,
            flags,
            ..
        } = content;
        let mut req = ApprovalRequest {
            // Time-ordered (UUIDv7): new rows land at the right edge of the
            // id indexes, so a group commit touches a few pages instead of one
            // random page per request (measured: the WAL writes dominated).
            id: RequestId(Uuid::now_v7()),
            agent: agent.to_string(),
            args_hash: redact::args_hash(&s.args),
            args,
            tool: s.tool,
            user_id: s.user_id,
            channel_id: s.channel_id,
            justification,
            task_id: s.task_id,
            idempotency_key: s.idempotency_key,
            risk: match &verdict {
                Verdict::Allow { risk, .. } | Verdict::Ask { risk, .. } => *risk,
                Verdict::Deny { .. } => tool_risk,
            },
            approvals_required: 1,
            admin_only: false,
            rule: verdict.rule().to_string(),
            rule_detail: String::new(),
            flags,
            created_ms: now,
            deadline_ms: now,
            state: State::Pending,
            decided_by: None,
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: s.requester_uid,
            run: plan,
            edit: None,
        };
        let tags = self.cfg.tool_tags(&req.tool);
        match &verdict {
            Verdict::Allow { detail, log, .. } => {
                req.rule_detail = detail.clone();
                req.state = State::Approved;
                if *log {
                    tracing::info!(request.id = %req.id, agent = %req.agent, tool = %req.tool, rule = %req.rule, "allowed and logged");
                }
            }
            Verdict::Deny { detail, .. } => {
                req.rule_detail = detail.clone();
                req.state = State::Denied;
            }
            Verdict::Ask {
                risk,
                admin_only,
                approvals,
                detail,
                ..
            } => {
                let default = self.cfg.timeout_for(*risk);
                let wanted = s.timeout_secs.map(Duration::from_secs).unwrap_or(default);
                let wait = wanted.min(self.cfg.risk.max_timeout.0);
                req.deadline_ms = now + wait.as_millis() as i64;
                req.admin_only = *admin_only;
                req.approvals_required = *approvals;
                req.rule_detail = detail.clone();
            }
        }
        if req.state.is_terminal() {
            req.decided_by = Some(DecidedBy::Policy);
            req.decided_who = Some("policy".into());
            req.decided_reason = Some(req.rule_detail.clone());
            req.decided_ms = Some(now);
        }
        let mut audit = if req.state.is_terminal() {
            vec![events::decided_by_policy(&req)]
        } else {
            vec![events::submitted(&req), events::policy(&req)]
        };
        if let Some(c) = confidence {
            // Recorded with the submission (the first entry either way).
            events::add_confidence(&mut audit[0], c);
        }
        // A tagged call is guarded by the store, in the transaction that
        // stores it: an allowed call that completes the trifecta waits for
        // a human instead, so it needs a pending slot (the store takes it,
        // or denies the call).
        let max_pending = self.cfg.agent(agent).map(|a| a.max_pending).unwrap_or(0);
        let guard = (!tags.is_empty() && req.state != State::Denied).then(|| {
            let unattended = s.unattended || self.cfg.agent(agent).is_some_and(|a| a.unattended);
            let mut deny = None;
            if req.state == State::Approved && unattended {
                deny = Some((
                    "unattended".to_string(),
                    "nobody is watching this agent, so it is denied at once".to_string(),
                ));
            }
            let wanted = s
                .timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.timeout_for(req.risk));
            let wait = wanted.min(self.cfg.risk.max_timeout.0);
            trifecta::Guard {
                tags: tags.to_vec(),
                since_ms: now - self.cfg.content.trifecta_window.0.as_millis() as i64,
                window: self.trifecta_window_label(),
                escalation: trifecta::Escalation {
                    risk: req.risk,
                    deadline_ms: now + wait.as_millis() as i64,
                    approvals_required: if req.risk == Risk::Critical {
                        self.settings.approvals_critical.max(1)
                    } else {
                        self.settings.approvals_high.max(1)
                    },
                    admin_only: req.risk == Risk::Critical,
                    deny,
                },
            }
        });
        let stored = self
            .store
            .insert_guarded(req, audit, guard, max_pending)
            .await?;
        let req = match stored {
            Inserted::Existing(r) => return Ok(r),
            Inserted::Conflict(r) => return Err(conflict(&r)),
            Inserted::TooManyPending { max } => {
                return Err(AppError::TooManyPending {
                    agent: agent.to_string(),
                    max,
                })
            }
            Inserted::New(r) => r,
        };
        self.hold_args(&req, &s.args);
        if req.state.is_terminal() {
            metrics::global().decided(&req);
        }
        if req.state == State::Denied {
            self.anomaly_on_denial(&req).await;
        }
        if req.state == State::Pending {
            if let Some(p) = self.pause_of(agent) {
                // Paused between this call's verdict and its insert: the
                // pause's sweep may have missed it, so it is cancelled here.
                return self.cancel_paused(req.id, &p).await;
            }
            // The store published `Queued`: the scheduler and the outbox follow it.
            tracing::info!(request.id = %req.id, agent = %req.agent, tool = %req.tool, risk = %req.risk, "queued for approval");
        }
        Ok(req)
    }
}

fn conflict(held: &ApprovalRequest) -> AppError {
    tracing::warn!(request.id = %held.id, agent = %held.agent, "idempotency key reused for a different call; refused");
    AppError::IdempotencyConflict {
        request_id: held.id.to_string(),
        tool: held.tool.clone(),
    }
}
