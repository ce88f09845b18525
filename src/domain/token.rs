//! Agents' bearer tokens, for connections over TCP: their text form
//! `kt_<id>_<secret>`, the stored hash of the secret, and the constant-time
//! comparison. Pure: the random bytes are drawn by the caller.
//!
//! The id is public (listed, logged, named by `token revoke`); the secret
//! is shown once when the token is issued and stored only as its SHA-256.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every token starts with this.
pub const PREFIX: &str = "kt_";

/// Random bytes in a token's id (hex in the token).
pub const ID_BYTES: usize = 12;

/// Random bytes in a token's secret (base64url, no padding, in the token).
pub const SECRET_BYTES: usize = 32;

/// A token split into its public id and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

impl std::fmt::Debug for Parsed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "Parsed {{ id: {:?}, secret: [redacted] }}", self.id)
    }
}

/// A new token from random bytes: `(id, full token text, secret hash)`.
pub fn issue(
    id_bytes: &[u8; ID_BYTES],
    secret_bytes: &[u8; SECRET_BYTES],
) -> (String, String, String) {
    let id = hex::encode(id_bytes);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes);
    let hash = hash_secret(&secret);
    (id.clone(), format!("{PREFIX}{id}_{secret}"), hash)
}

/// Reads `kt_<id>_<secret>`; `None` for anything else (the caller answers
/// every malformed token exactly as a wrong one).
pub fn parse(token: &str) -> Option<Parsed<'_>> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = secret.len() >= 43
        && secret.len() <= 256
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(Parsed { id, secret })
}

/// Whether `id` looks like a token id (for `token revoke ID`).
pub fn is_id(id: &str) -> bool {
    id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The stored form of a secret: SHA-256, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn secret_matches(secret: &str, stored: &str) -> bool {
    bool::from(hash_secret(secret).as_bytes().ct_eq(stored.as_bytes()))
}

/// Why a stored token does not admit a connection at `now_ms`, if it does not.
pub fn dead_reason(
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
    now_ms: i64,
) -> Option<&'static str> {
    if revoked_ms.is_some_and(|r| r <= now_ms) {
        return Some("revoked");
    }
    if expires_ms.is_some_and(|e| e <= now_ms) {
        return Some("expired");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_token_parses_back_and_matches_its_hash() {
        let (id, token, hash) = issue(&[7; ID_BYTES], &[9; SECRET_BYTES]);
        let p = parse(&token).expect("parses");
        assert_eq!(p.id, id);
        assert!(secret_matches(p.secret, &hash));
        assert!(!secret_matches("nope", &hash));
        assert!(!format!("{p:?}").contains(p.secret));
        // A secret holding `_` still splits at the id's end.
        let (_, token, hash) = issue(&[1; ID_BYTES], &[0xff; SECRET_BYTES]);
        let p = parse(&token).expect("parses");
        assert!(secret_matches(p.secret, &hash));
    }

    #[test]
    fn anything_else_is_no_token() {
        for bad in [
            "",
            "kt_",
            "kt_abc_def",
            "xx_0123456789abcdef01234567_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kt_0123456789abcdef0123456z_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kt_0123456789abcdef01234567_short",
            "kt_0123456789abcdef01234567_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA+",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn revoked_or_expired_at_their_instant() {
        assert_eq!(dead_reason(None, None, 10), None);
        assert_eq!(dead_reason(Some(11), None, 10), None);
        assert_eq!(dead_reason(Some(10), None, 10), Some("expired"));
        assert_eq!(dead_reason(Some(11), Some(10), 10), Some("revoked"));
    }
}
