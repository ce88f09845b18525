//! Injected failures and the route patterns they (and call filters) match.

use super::*;

pub(super) fn failure_reply(rule: FailRule) -> Reply {
    let mut headers = Vec::new();
    if rule.status == 429 {
        let retry = rule.body["retry_after"].as_f64().unwrap_or(1.0);
        headers.push((
            "retry-after".to_string(),
            format!("{}", retry.ceil() as u64),
        ));
        headers.push(("x-ratelimit-limit".to_string(), "5".to_string()));
        headers.push(("x-ratelimit-remaining".to_string(), "0".to_string()));
        headers.push(("x-ratelimit-reset-after".to_string(), format!("{retry:.3}")));
        headers.push(("x-ratelimit-bucket".to_string(), "fake-bucket".to_string()));
        let global = rule.body["global"].as_bool().unwrap_or(false);
        headers.push((
            "x-ratelimit-scope".to_string(),
            if global { "global" } else { "user" }.to_string(),
        ));
        if global {
            headers.push(("x-ratelimit-global".to_string(), "true".to_string()));
        }
    }
    Reply {
        status: rule.status,
        body: Some(rule.body),
        headers,
    }
}

pub(super) fn pattern_matches(pattern: &str, method: &str, path: &str) -> bool {
    let pattern = pattern.trim();
    let (pm, pp) = match pattern.split_once(' ') {
        Some((m, p)) => (m.trim(), p.trim()),
        None if pattern.starts_with('/') => ("*", pattern),
        None => (pattern, "/**"),
    };
    if pm != "*" && !pm.eq_ignore_ascii_case(method) {
        return false;
    }
    let pp = pp.strip_prefix("/api/v10").unwrap_or(pp);
    let pat: Vec<&str> = pp.split('/').filter(|s| !s.is_empty()).collect();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, p) in pat.iter().enumerate() {
        if *p == "**" {
            return true;
        }
        let Some(s) = segs.get(i) else { return false };
        let wildcard = *p == "*" || (p.starts_with('{') && p.ends_with('}'));
        if !wildcard && p != s {
            return false;
        }
    }
    pat.len() == segs.len()
}
