//! The two REST calls the card outbox makes (post and edit a message), done
//! with our own HTTP client so that every failure is classified and a 429's
//! `retry_after` is honoured. serenity's rate limiter cannot run against a
//! local API base, and with it off serenity drops `retry_after`; this is the
//! retry logic the tests reach.

use super::card::{CardFile, RenderedCard};
use serde_json::Value;
use std::time::Duration;

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
        }
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
        let body = send(req).await?;
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| body["id"].as_u64())
            .ok_or_else(|| RestError::Temporary("the reply had no message id".into()))
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
        send(req).await.map(|_| ())
    }
}

async fn send(req: reqwest::RequestBuilder) -> Result<Value, RestError> {
    let resp = req
        .send()
        .await
        .map_err(|e| RestError::Temporary(e.to_string()))?;
    let status = resp.status().as_u16();
    let header_retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok());
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    classify(status, header_retry, &body, &text)
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
