//! Pairing codes: how an unknown user becomes someone Keyturn acts for.
//!
//! Codes are drawn outside (the caller passes random bytes), shown once,
//! stored only as a SHA-256 hash, and compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// No look-alikes: no 0/O, 1/I/L, 2/Z, 5/S, 8/B.
pub const ALPHABET: &[u8] = b"ACDEFGHJKMNPQRTUVWXY34679";

/// Characters in a code (25^10 ≈ 9.5e13 codes).
pub const CODE_LEN: usize = 10;

/// Turns random bytes into a code. Rejection sampling keeps it unbiased; the
/// caller supplies enough bytes (4 × `CODE_LEN` is plenty).
pub fn code_from_random(bytes: &[u8]) -> Option<String> {
    let n = ALPHABET.len() as u8;
    let limit = u8::MAX - (u8::MAX % n);
    let code: String = bytes
        .iter()
        .filter(|&&b| b < limit)
        .take(CODE_LEN)
        .map(|&b| ALPHABET[(b % n) as usize] as char)
        .collect();
    (code.len() == CODE_LEN).then_some(code)
}

/// Normalises what a person typed: upper case, no spaces or dashes.
pub fn normalize(input: &str) -> String {
    input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_uppercase)
        .collect()
}

/// The stored form of a code.
pub fn hash_code(code: &str) -> String {
    hex::encode(Sha256::digest(normalize(code).as_bytes()))
}

/// Constant-time comparison of a typed code against a stored hash.
pub fn matches(input: &str, stored_hash: &str) -> bool {
    let h = hash_code(input);
    h.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// Shows a code in two groups for reading aloud: `ACDEF-GHJKM`.
pub fn display(code: &str) -> String {
    let (a, b) = code.split_at(code.len() / 2);
    format!("{a}-{b}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_only_the_alphabet() {
        let bytes: Vec<u8> = (0..=255u8).cycle().skip(7).take(64).collect();
        let code = code_from_random(&bytes).unwrap();
        assert_eq!(code.len(), CODE_LEN);
        assert!(code.bytes().all(|b| ALPHABET.contains(&b)));
        for bad in b"01OILZ25SB8" {
            assert!(!ALPHABET.contains(bad), "{}", *bad as char);
        }
    }

    #[test]
    fn too_few_usable_bytes_give_none() {
        assert_eq!(code_from_random(&[255; 40]), None);
        assert_eq!(code_from_random(&[1; 3]), None);
    }

    #[test]
    fn typed_codes_match_leniently() {
        let code = "ACDEFGHJKM";
        let stored = hash_code(code);
        assert!(matches("acdef-ghjkm", &stored));
        assert!(matches(" ACDEF GHJKM ", &stored));
        assert!(!matches("ACDEFGHJKN", &stored));
        assert_eq!(display(code), "ACDEF-GHJKM");
    }
}
