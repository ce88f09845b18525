//! The two REST calls the card outbox makes (post and edit a message), done
//! with our own HTTP client so that every failure is classified and Discord's
//! rate limits are followed before a call, not learnt from 429s: the
//! `X-RateLimit-Bucket`/`Remaining`/`Reset-After` headers per bucket, and
//! the global limit of [`DISCORD_GLOBAL_PER_SEC`] calls a second (of which
//! cards take [`GLOBAL_PER_SEC`]). serenity's rate
//! limiter cannot run against a local API base, and with it off serenity
//! drops `retry_after`; this is the logic the tests reach.

use super::card::{CardFile, RenderedCard};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Discord's global limit: calls per second per bot (interactions aside).
pub const DISCORD_GLOBAL_PER_SEC: usize = 50;
/// The share of it card calls take, leaving the rest to serenity's own calls
/// (start-up, command registration, DMs), which this limiter does not see.
pub const GLOBAL_PER_SEC: usize = DISCORD_GLOBAL_PER_SEC * 4 / 5;
/// The window of the global limit, with a margin for clock granularity.
const GLOBAL_WINDOW: Duration = Duration::from_millis(1020);
/// Buckets remembered at most (one per route and channel in practice).
const MAX_BUCKETS: usize = 1024;

/// Why a call failed, by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestError {
    /// 429: wait this long, then try again.
    #[error("rate limited; retry after {0:?}")]
    RateLimited(Duration),
    /// Network error or 5xx: try again later.
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// The message is gone (deleted by someone).
    #[error("unknown message")]
    UnknownMessage,
    /// Any other 4xx: retrying the same call will fail the same way.
    #[error("refused with HTTP {0}: {1}")]
    Refused(u16, String),
}

/// A small Discord REST client for card messages.
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    /// `…/api/v10`
    base: String,
    auth: String,
    limits: Arc<Mutex<Limits>>,
}

/// What Discord said about one rate-limit bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    remaining: u32,
    reset_at: Instant,
}

/// The rate-limit state: buckets learnt from headers, and the global window.
#[derive(Debug, Default)]
struct Limits {
    /// Route key (method, route, channel) → bucket id from `X-RateLimit-Bucket`.
    routes: HashMap<String, String>,
    buckets: HashMap<String, Bucket>,
    /// When the last calls finished (at most [`GLOBAL_PER_SEC`]).
    recent: VecDeque<Instant>,
    /// Calls sent and not yet answered.
    in_flight: usize,
    /// A global 429 stops every call until then.
    global_until: Option<Instant>,
    /// Calls a second each route's bucket allows, learnt from the first
    /// answer of a window (`X-RateLimit-Limit` over its reset-after).
    rates: HashMap<String, f64>,
}

/// The major parameter of a route key (`POST /channels/<id>/messages`).
fn major(route: &str) -> &str {
    route.split('/').nth(2).unwrap_or("")
}

/// The rate-limit headers of one response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateHeaders {
    pub bucket: Option<String>,
    pub remaining: Option<u32>,
    pub reset_after: Option<f64>,
    pub global: bool,
    /// `X-RateLimit-Limit`: calls per window.
    pub limit: Option<u32>,
}

impl RateHeaders {
    fn from(h: &reqwest::header::HeaderMap) -> RateHeaders {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        RateHeaders {
            bucket: get("x-ratelimit-bucket").filter(|b| !b.is_empty() && b.len() <= 128),
            remaining: get("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            reset_after: get("x-ratelimit-reset-after")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite()),
            global: get("x-ratelimit-global").is_some_and(|v| v == "true")
                || get("x-ratelimit-scope").is_some_and(|v| v == "global"),
            limit: get("x-ratelimit-limit").and_then(|v| v.parse().ok()),
        }
    }
}

impl Limits {
    /// How long a call on `route` must wait now; zero means it may go.
    fn wait(&self, route: &str, now: Instant) -> Duration {
        let mut wait = Duration::ZERO;
        if let Some(until) = self.global_until {
            wait = wait.max(until.saturating_duration_since(now));
        }
        if let Some(b) = self.routes.get(route).and_then(|id| self.buckets.get(id)) {
            if b.remaining == 0 {
                wait = wait.max(b.reset_at.saturating_duration_since(now));
            }
        }
        // Count calls in flight as if they finished now: the window is
        // measured from answers, which come after Discord counted the call.
        let used = self.recent.len() + self.in_flight;
        if used >= GLOBAL_PER_SEC {
            let oldest_needed = used + 1 - GLOBAL_PER_SEC;
            match self.recent.get(oldest_needed - 1) {
                Some(t) => wait = wait.max((*t + GLOBAL_WINDOW).saturating_duration_since(now)),
                // Every slot is in flight: wait for an answer.
                None => wait = wait.max(Duration::from_millis(10)),
            }
        }
        wait
    }

    /// Takes a slot for a call on `route` (after [`Limits::wait`] said zero).
    fn take(&mut self, route: &str) {
        self.in_flight += 1;
        if let Some(b) = self
            .routes
            .get(route)
            .and_then(|id| self.buckets.get_mut(id))
        {
            b.remaining = b.remaining.saturating_sub(1);
        }
    }

    /// Records the answer to a call on `route` at `now`.
    fn answered(&mut self, route: &str, now: Instant, h: &RateHeaders, retry: Option<Duration>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.recent.push_back(now);
        while self.recent.len() > GLOBAL_PER_SEC {
            self.recent.pop_front();
        }
        if let (true, Some(r)) = (h.global, retry) {
            self.global_until = Some(now + r);
            return;
        }
        // The first call of a window: its reset-after is the whole window.
        if let (Some(limit), Some(remaining), Some(after), None) =
            (h.limit, h.remaining, h.reset_after, retry)
        {
            if limit > 0 && remaining + 1 == limit && after > 0.0 {
                if self.rates.len() >= MAX_BUCKETS && !self.rates.contains_key(route) {
                    self.rates.clear();
                }
                self.rates
                    .insert(route.to_string(), f64::from(limit) / after.max(0.001));
            }
        }
        // A bucket is Discord's bucket id with the major parameter (the
        // channel). A 429 without a bucket id still holds this route back.
        let id = match (&h.bucket, retry) {
            (Some(b), _) => format!("{b} {}", major(route)),
            (None, Some(_)) => self
                .routes
                .get(route)
                .cloned()
                .unwrap_or_else(|| format!("route {route}")),
            (None, None) => return,
        };
        let id = &id;
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(id) {
            self.buckets.retain(|_, b| b.reset_at > now);
            if self.buckets.len() >= MAX_BUCKETS {
                self.buckets.clear();
                self.routes.clear();
            }
        }
        self.routes.insert(route.to_string(), id.clone());
        let reset_after = retry.or_else(|| {
            h.reset_after
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)))
        });
        let remaining = if retry.is_some() {
            Some(0)
        } else {
            h.remaining
        };
        if let (Some(remaining), Some(after)) = (remaining, reset_after) {
            self.buckets.insert(
                id.clone(),
                Bucket {
                    remaining,
                    reset_at: now + after,
                },
            );
        }
    }

    /// A call that got no answer (network error) frees its slot.
    fn unanswered(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

impl Rest {
    /// `api_base` unset means the real Discord.
    pub fn new(token: &str, api_base: Option<&str>) -> Rest {
        let origin = api_base
            .unwrap_or("https://discord.com")
            .trim_end_matches('/');
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent("DiscordBot (https://github.com/keyturn/keyturn, 0.1) keyturn")
            .build()
            .unwrap_or_default();
        Rest {
            client,
            base: format!("{origin}/api/v10"),
            auth: format!("Bot {}", token.trim_start_matches("Bot ")),
            limits: Arc::default(),
        }
    }

    /// Waits until the rate limits allow a call on `route`, then takes a slot.
    async fn acquire(&self, route: &str) {
        loop {
            let wait = {
                let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
                let w = l.wait(route, Instant::now());
                if w.is_zero() {
                    l.take(route);
                    return;
                }
                w
            };
            tracing::debug!(route, wait = ?wait, "pacing Discord calls");
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends a call on `route` within the rate limits and classifies the answer.
    async fn send(&self, route: &str, req: reqwest::RequestBuilder) -> Result<Value, RestError> {
        self.acquire(route).await;
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.limits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unanswered();
                return Err(RestError::Temporary(e.to_string()));
            }
        };
        let status = resp.status().as_u16();
        let rate = RateHeaders::from(resp.headers());
        let header_retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let result = classify(status, header_retry, &body, &text);
        let retry = match &result {
            Err(RestError::RateLimited(d)) => Some(*d),
            _ => None,
        };
        let rate = RateHeaders {
            global: rate.global || (retry.is_some() && body["global"].as_bool() == Some(true)),
            ..rate
        };
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answered(route, Instant::now(), &rate, retry);
        result
    }

    /// The messages a second Discord lets the bot post in `channel`, once
    /// learnt from its rate-limit headers (and never above the share of
    /// the global limit cards take).
    pub fn posts_per_sec(&self, channel: u64) -> Option<f64> {
        let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.rates
            .get(&format!("POST /channels/{channel}/messages"))
            .map(|r| r.min(GLOBAL_PER_SEC as f64))
    }

    /// Posts a card; returns the new message id.
    pub async fn post_message(&self, channel: u64, card: &RenderedCard) -> Result<u64, RestError> {
        let url = format!("{}/channels/{channel}/messages", self.base);
        let req = self.client.post(url).header("Authorization", &self.auth);
        let req = match &card.file {
            None => req
                .header("Content-Type", "application/json")
                .body(card.payload.to_string()),
            Some(CardFile { filename, data }) => {
                let part = reqwest::multipart::Part::bytes(data.clone())
                    .file_name(filename.clone())
                    .mime_str("application/json")
                    .map_err(|e| RestError::Refused(0, e.to_string()))?;
                let form = reqwest::multipart::Form::new()
                    .text("payload_json", card.payload.to_string())
                    .part("files[0]", part);
                req.multipart(form)
            }
        };
        let body = self
            .send(&format!("POST /channels/{channel}/messages"), req)
            .await?;
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| body["id"].as_u64())
            .ok_or_else(|| RestError::Temporary("the reply had no message id".into()))
    }

    /// Opens (or finds) the DM channel with `user`; returns its id.
    pub async fn open_dm(&self, user: u64) -> Result<u64, RestError> {
        let url = format!("{}/users/@me/channels", self.base);
        let req = self
            .client
            .post(url)
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .body(serde_json::json!({"recipient_id": user.to_string()}).to_string());
        let body = self.send("POST /users/@me/channels", req).await?;
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| body["id"].as_u64())
            .ok_or_else(|| RestError::Temporary("the reply had no channel id".into()))
    }

    /// Edits a card in place (attachments already there are kept).
    pub async fn edit_message(
        &self,
        channel: u64,
        message: u64,
        payload: &Value,
    ) -> Result<(), RestError> {
        let url = format!("{}/channels/{channel}/messages/{message}", self.base);
        let req = self
            .client
            .patch(url)
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .body(payload.to_string());
        self.send(&format!("PATCH /channels/{channel}/messages"), req)
            .await
            .map(|_| ())
    }
}

/// Maps a response to a result; pure, so the retry rules are unit tested.
pub fn classify(
    status: u16,
    header_retry: Option<f64>,
    body: &Value,
    text: &str,
) -> Result<Value, RestError> {
    match status {
        200..=299 => Ok(body.clone()),
        429 => {
            // The body's value is more precise (fractional seconds) than the header.
            let secs = body["retry_after"]
                .as_f64()
                .or(header_retry)
                .unwrap_or(1.0)
                .clamp(0.0, 3600.0);
            Err(RestError::RateLimited(Duration::from_secs_f64(secs)))
        }
        404 if body["code"].as_i64() == Some(10008) => Err(RestError::UnknownMessage),
        500..=599 => Err(RestError::Temporary(format!("HTTP {status}"))),
        _ => Err(RestError::Refused(
            status,
            text.chars().take(300).collect::<String>(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(bucket: &str, remaining: u32, reset_after: f64) -> RateHeaders {
        RateHeaders {
            bucket: Some(bucket.into()),
            remaining: Some(remaining),
            reset_after: Some(reset_after),
            global: false,
            limit: None,
        }
    }

    #[test]
    fn the_post_rate_is_learnt_from_the_first_call_of_a_window() {
        let mut l = Limits::default();
        let t0 = Instant::now();
        let r = "POST /channels/20/messages";
        let h = |remaining, after| RateHeaders {
            limit: Some(5),
            ..headers("b", remaining, after)
        };
        l.take(r);
        l.answered(r, t0, &h(3, 4.0), None);
        assert_eq!(l.rates.get(r), None, "not the window's first call");
        l.take(r);
        l.answered(r, t0, &h(4, 5.0), None);
        assert_eq!(l.rates.get(r), Some(&1.0), "5 per 5 s");
    }

    #[test]
    fn an_exhausted_bucket_waits_for_its_reset() {
        let mut l = Limits::default();
        let t0 = Instant::now();
        let r = "POST /channels/1/messages";
        assert_eq!(l.wait(r, t0), Duration::ZERO);
        l.take(r);
        l.answered(r, t0, &headers("b", 1, 2.0), None);
        assert_eq!(l.wait(r, t0), Duration::ZERO);
        l.take(r);
        l.answered(r, t0, &headers("b", 0, 2.0), None);
        assert_eq!(l.wait(r, t0), Duration::from_secs(2));
        assert_eq!(l.wait(r, t0 + Duration::from_secs(2)), Duration::ZERO);
        // Another route is not held up by this bucket.
        assert_eq!(l.wait("PATCH /channels/1/messages", t0), Duration::ZERO);
    }

    #[test]
    fn buckets_are_per_channel_and_a_bare_429_still_holds_back() {
        let mut l = Limits::default();
        let t0 = Instant::now();
        let (a, b) = ("POST /channels/1/messages", "POST /channels/2/messages");
        l.take(a);
        l.answered(a, t0, &headers("m", 0, 2.0), None);
        l.take(b);
        l.answered(b, t0, &headers("m", 4, 2.0), None);
        assert_eq!(
            l.wait(a, t0),
            Duration::from_secs(2),
            "same bucket, other channel"
        );
        assert_eq!(l.wait(b, t0), Duration::ZERO);
        let c = "PATCH /channels/3/messages";
        l.take(c);
        l.answered(c, t0, &RateHeaders::default(), Some(Duration::from_secs(1)));
        assert_eq!(l.wait(c, t0), Duration::from_secs(1));
    }

    #[test]
    fn the_global_limit_spaces_calls() {
        let mut l = Limits::default();
        let t0 = Instant::now();
        for i in 0..GLOBAL_PER_SEC {
            let r = format!("POST /channels/{i}/messages");
            assert_eq!(l.wait(&r, t0), Duration::ZERO, "call {i}");
            l.take(&r);
            l.answered(&r, t0, &RateHeaders::default(), None);
        }
        assert_eq!(l.wait("x", t0), GLOBAL_WINDOW);
        assert_eq!(l.wait("x", t0 + GLOBAL_WINDOW), Duration::ZERO);
    }

    #[test]
    fn a_global_429_stops_every_route() {
        let mut l = Limits::default();
        let t0 = Instant::now();
        l.take("a");
        let h = RateHeaders {
            global: true,
            ..RateHeaders::default()
        };
        l.answered("a", t0, &h, Some(Duration::from_secs(3)));
        assert_eq!(l.wait("b", t0), Duration::from_secs(3));
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            classify(429, Some(1.0), &json!({"retry_after": 0.25}), ""),
            Err(RestError::RateLimited(Duration::from_millis(250)))
        );
        assert_eq!(
            classify(429, Some(2.0), &Value::Null, ""),
            Err(RestError::RateLimited(Duration::from_secs(2)))
        );
        assert!(matches!(
            classify(502, None, &Value::Null, ""),
            Err(RestError::Temporary(_))
        ));
        assert_eq!(
            classify(404, None, &json!({"code": 10008}), ""),
            Err(RestError::UnknownMessage)
        );
        assert!(matches!(
            classify(403, None, &json!({"code": 50013}), "x"),
            Err(RestError::Refused(403, _))
        ));
        assert_eq!(
            classify(200, None, &json!({"id": "5"}), ""),
            Ok(json!({"id": "5"}))
        );
    }
}
