//! Rate limits per bucket and global, as Discord answers them (429 and headers).

use super::*;

impl Inner {
    /// Applies the rate limits to a bot call: the headers to add, or the 429.
    pub(super) fn rate_limit(
        &self,
        st: &mut FakeState,
        req: &Req,
    ) -> Result<Vec<(String, String)>, Reply> {
        let Some(rl) = &self.cfg.rate_limits else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        // Global: a rolling second, never advertised.
        while st
            .global_recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            st.global_recent.pop_front();
        }
        if st.global_recent.len() >= rl.global_per_sec {
            st.rate_limited += 1;
            let retry = st.global_recent.front().map_or(Duration::ZERO, |t| {
                (*t + Duration::from_secs(1)).duration_since(now)
            });
            let secs = retry.as_secs_f64();
            return Err(Reply {
                status: 429,
                body: Some(
                    json!({"message": "You are being rate limited.", "retry_after": secs, "global": true}),
                ),
                headers: vec![
                    ("retry-after".into(), format!("{}", secs.ceil() as u64)),
                    ("x-ratelimit-global".into(), "true".into()),
                    ("x-ratelimit-scope".into(), "global".into()),
                ],
            });
        }
        st.global_recent.push_back(now);
        // Bucket: the route with ids after the major parameter (segment 1) wildcarded.
        let template: Vec<&str> = req
            .segs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if i >= 2 && x.parse::<u64>().is_ok() {
                    "*"
                } else if i == 1 && x.parse::<u64>().is_ok() {
                    "{major}"
                } else {
                    x.as_str()
                }
            })
            .collect();
        let template = format!("{} /{}", req.method, template.join("/"));
        let bucket_id = format!("{:016x}", fnv(&template));
        let major = req.segs.get(1).cloned().unwrap_or_default();
        let key = format!("{bucket_id}:{major}");
        let entry = st.buckets.entry(key).or_insert((now, 0));
        if now >= entry.0 {
            *entry = (now + rl.bucket_window, 0);
        }
        let reset_after = entry.0.duration_since(now).as_secs_f64();
        let mut headers = vec![
            ("x-ratelimit-limit".to_string(), rl.bucket_limit.to_string()),
            ("x-ratelimit-bucket".to_string(), bucket_id),
            (
                "x-ratelimit-reset-after".to_string(),
                format!("{reset_after:.3}"),
            ),
        ];
        if entry.1 >= rl.bucket_limit {
            st.rate_limited += 1;
            headers.push(("x-ratelimit-remaining".into(), "0".into()));
            headers.push((
                "retry-after".into(),
                format!("{}", reset_after.ceil() as u64),
            ));
            headers.push(("x-ratelimit-scope".into(), "user".into()));
            return Err(Reply {
                status: 429,
                body: Some(
                    json!({"message": "You are being rate limited.", "retry_after": reset_after, "global": false}),
                ),
                headers,
            });
        }
        entry.1 += 1;
        headers.push((
            "x-ratelimit-remaining".to_string(),
            (rl.bucket_limit - entry.1).to_string(),
        ));
        Ok(headers)
    }
}

/// FNV-1a, for stable fake bucket ids.
pub(super) fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
