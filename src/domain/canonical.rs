//! The canonical JSON form and hash that identify a call's arguments, and the
//! strict reader every piece of agent-supplied JSON goes through. It is pure:
//! no I/O, clock, randomness or async runtime; it imports nothing from the
//! rest of the crate.
//!
//! What the approver sees, what is hashed and what runs must be the same
//! value, so the reader refuses what two JSON parsers could read differently:
//! - **Duplicate keys** at any depth (one parser keeps the first, another the
//!   last). The error names the key and where it is.
//! - **Numbers that would not survive**. serde_json is built with
//!   `arbitrary_precision`, so a number keeps its digits:
//!   - an integer (no fraction, no exponent) of any size is kept as its exact
//!     decimal digits, up to [`MAX_INTEGER_DIGITS`] digits (Python's own
//!     limit for reading an integer); `-0` is refused (it is `0` to some
//!     readers and the float `-0.0` to others);
//!   - any other number is an IEEE-754 double, written in the shortest form
//!     that reads back to the same double, as serde_json prints an `f64`
//!     (`1.0`, `100.0` for `1e2`, `1e+16`, `1.5e-7`). It must denote exactly
//!     the value that was written: `1e400` (beyond a double), `1e-400`
//!     (below the smallest double) and `0.10000000000000000001` (more digits
//!     than a double keeps) are refused, never rounded.
//!
//!   So `1` and `1.0` are different values (they hash differently), `1e2`
//!   and `100.0` are the same value.
//! - The object key `$serde_json::private::Number`, which serde_json itself
//!   would read back as a number, not an object.

use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

/// Longest integer accepted, in digits (CPython's default limit for
/// converting between `int` and text, so the Python client can read it).
pub const MAX_INTEGER_DIGITS: usize = 4300;

/// The key serde_json uses internally to carry a number's digits.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Longest piece of untrusted text (a key, a number) quoted in an error.
const QUOTE_MAX: usize = 64;

// ---- canonical form --------------------------------------------------------

/// Canonical JSON: object keys sorted by byte order at every depth, no
/// whitespace, numbers in their canonical form (see the module docs; `1` and
/// `1.0` differ), strings escaped as serde_json does. Array order is kept.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// Lowercase hex SHA-256 of [`canonical_json`]: identifies a call's arguments
/// whatever their key order or formatting.
pub fn args_hash(v: &Value) -> String {
    hex::encode(Sha256::digest(canonical_json(v).as_bytes()))
}

/// A number's canonical text: exact digits for an integer, the shortest
/// round-trip form of the double for anything else. Total: a number the
/// strict reader would refuse still gets a deterministic text (its own).
pub fn canonical_number(n: &Number) -> String {
    let text = n.to_string();
    if is_integer_literal(&text) && text != "-0" {
        return text;
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => shortest_f64(f),
        _ => text,
    }
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&canonical_number(n)),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, val)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
    }
}

/// Same escaping as serde_json's compact writer.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The double as serde_json prints an `f64` (`1.0`, `1e+16`, `1.5e-7`).
fn shortest_f64(f: f64) -> String {
    match Number::from_f64(f) {
        Some(n) => n.to_string(),
        // Only non-finite doubles have no JSON form; callers check first.
        None => "null".into(),
    }
}

/// `0` or `-?[1-9][0-9]*`: the JSON grammar for a number without fraction
/// or exponent (serde_json has already checked the rest of the grammar).
fn is_integer_literal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

// ---- numbers ---------------------------------------------------------------

/// Why a number is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberProblem {
    #[error("`-0` is ambiguous (the integer 0 or the float -0.0); send `0` or `-0.0`")]
    NegativeZero,
    #[error("an integer of {digits} digits is too long (at most {max})", max = MAX_INTEGER_DIGITS)]
    TooManyDigits { digits: usize },
    #[error("`{literal}` is beyond the range of a 64-bit float")]
    OutOfRange { literal: String },
    #[error("`{literal}` cannot be kept exactly as a 64-bit float (it would become `{nearest}`); send fewer digits or a string")]
    Inexact { literal: String, nearest: String },
}

/// Checks one number literal as written in JSON and returns it in its
/// canonical form (see the module docs).
pub fn strict_number(literal: &str) -> Result<Number, NumberProblem> {
    if is_integer_literal(literal) {
        if literal == "-0" {
            return Err(NumberProblem::NegativeZero);
        }
        let digits = literal.trim_start_matches('-').len();
        if digits > MAX_INTEGER_DIGITS {
            return Err(NumberProblem::TooManyDigits { digits });
        }
        // Already exact digits; `Number`'s parser keeps them as they are.
        return literal
            .parse::<Number>()
            .map_err(|_| NumberProblem::OutOfRange {
                literal: quote(literal),
            });
    }
    let f: f64 = literal.parse().map_err(|_| NumberProblem::OutOfRange {
        literal: quote(literal),
    })?;
    if !f.is_finite() {
        return Err(NumberProblem::OutOfRange {
            literal: quote(literal),
        });
    }
    let nearest = shortest_f64(f);
    // Most floats arrive already in their shortest form.
    if nearest != literal && Decimal::of(literal) != Decimal::of(&nearest) {
        return Err(NumberProblem::Inexact {
            literal: quote(literal),
            nearest,
        });
    }
    Number::from_f64(f).ok_or(NumberProblem::OutOfRange {
        literal: quote(literal),
    })
}

/// A decimal literal reduced to sign, significant digits (no leading or
/// trailing zeros; empty for zero) and power of ten, so two spellings of the
/// same value compare equal (`1e2` = `100.0`). Zero keeps its sign.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    /// `s` must be a JSON number (the parser has checked it).
    fn of(s: &str) -> Decimal {
        let negative = s.starts_with('-');
        let s = s.trim_start_matches('-');
        let (mantissa, exp) = s.split_once(['e', 'E']).unwrap_or((s, ""));
        let (exp_negative, exp_digits) = match exp.as_bytes().first() {
            Some(b'-') => (true, &exp[1..]),
            Some(b'+') => (false, &exp[1..]),
            _ => (false, exp),
        };
        // A huge exponent saturates: such a number is beyond a double's range
        // (refused before this is asked) unless it is zero.
        let magnitude = exp_digits
            .bytes()
            .try_fold(0i64, |acc, b| {
                acc.checked_mul(10)?.checked_add(i64::from(b - b'0'))
            })
            .unwrap_or(i64::MAX / 2);
        let exp = if exp_negative { -magnitude } else { magnitude };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all = format!("{int}{frac}");
        let no_trailing = all.trim_end_matches('0');
        let digits = no_trailing.trim_start_matches('0').to_string();
        if digits.is_empty() {
            return Decimal {
                negative,
                digits,
                exponent: 0,
            };
        }
        let exponent = exp
            .saturating_sub(frac.len() as i64)
            .saturating_add((all.len() - no_trailing.len()) as i64);
        Decimal {
            negative,
            digits,
            exponent,
        }
    }
}

fn quote(s: &str) -> String {
    let mut q: String = s.chars().take(QUOTE_MAX).collect();
    if q.len() < s.len() {
        q.push('…');
    }
    q
}

// ---- the strict reader -----------------------------------------------------

/// Why a JSON text was refused by [`parse_strict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// Valid JSON that Keyturn will not read (see the module docs).
    #[error("{problem} at {}", if at.is_empty() { "the top level" } else { at.as_str() })]
    Refused {
        /// JSON pointer (RFC 6901) of the object or number concerned; `""`
        /// for the top-level value itself.
        at: String,
        problem: Problem,
    },
}

/// What [`StrictError::Refused`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("duplicate key `{0}`")]
    DuplicateKey(String),
    #[error("the key `{NUMBER_TOKEN}` is reserved")]
    ReservedKey,
    #[error("{0}")]
    Number(NumberProblem),
}

impl StrictError {
    /// The pointer of the refused object or number (`None` for a syntax error).
    pub fn at(&self) -> Option<&str> {
        match self {
            StrictError::Syntax(_) => None,
            StrictError::Refused { at, .. } => Some(at),
        }
    }
}

/// Reads one JSON text as a [`Value`], refusing duplicate keys and numbers
/// that would not survive exactly (see the module docs).
pub fn parse_strict(text: &str) -> Result<Value, StrictError> {
    read(&mut serde_json::Deserializer::from_str(text))
}

/// [`parse_strict`] for bytes (which must be UTF-8).
pub fn parse_strict_slice(bytes: &[u8]) -> Result<Value, StrictError> {
    read(&mut serde_json::Deserializer::from_slice(bytes))
}

fn read<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
) -> Result<Value, StrictError> {
    let mut ctx = Ctx::default();
    let v = Strict { ctx: &mut ctx }.deserialize(&mut *de);
    match (v, ctx.problem) {
        (Ok(v), _) => {
            de.end().map_err(|e| StrictError::Syntax(e.to_string()))?;
            Ok(v)
        }
        (Err(_), Some((problem, mut path))) => {
            path.reverse();
            let mut at = String::new();
            for seg in &path {
                at.push('/');
                for c in seg.chars().take(QUOTE_MAX) {
                    match c {
                        '~' => at.push_str("~0"),
                        '/' => at.push_str("~1"),
                        c => at.push(c),
                    }
                }
            }
            Err(StrictError::Refused { at, problem })
        }
        (Err(e), None) => Err(StrictError::Syntax(e.to_string())),
    }
}

/// Where a refusal is recorded: the problem, and the path to it, innermost
/// segment first (filled in only while unwinding, so reading costs nothing
/// extra when all is well).
#[derive(Default)]
struct Ctx {
    problem: Option<(Problem, Vec<String>)>,
}

impl Ctx {
    fn refuse<E: de::Error>(&mut self, problem: Problem) -> E {
        let msg = problem.to_string();
        self.problem = Some((problem, Vec::new()));
        E::custom(msg)
    }

    fn unwind(&mut self, seg: impl FnOnce() -> String) {
        if let Some((_, path)) = &mut self.problem {
            path.push(seg());
        }
    }
}

/// serde_json's own `Value` visitor, plus the refusals.
struct Strict<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json with arbitrary_precision hands over digits, not doubles;
        // this is here for completeness.
        match Number::from_f64(v) {
            Some(n) => Ok(Value::Number(n)),
            None => Err(self.ctx.refuse(Problem::Number(NumberProblem::OutOfRange {
                literal: v.to_string(),
            }))),
        }
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(Strict {
                ctx: &mut *self.ctx,
            }) {
                Ok(Some(v)) => items.push(v),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    let i = items.len();
                    self.ctx.unwind(|| i.to_string());
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        loop {
            let key = match map.next_key_seed(KeySeed)? {
                None => return Ok(Value::Object(out)),
                Some(Key::Number) if out.is_empty() => {
                    // serde_json's carrier for a number's digits.
                    let literal: String = map.next_value()?;
                    return strict_number(&literal)
                        .map(Value::Number)
                        .map_err(|p| self.ctx.refuse(Problem::Number(p)));
                }
                Some(Key::Number) => return Err(self.ctx.refuse(Problem::ReservedKey)),
                Some(Key::Real(k)) if k == NUMBER_TOKEN => {
                    return Err(self.ctx.refuse(Problem::ReservedKey))
                }
                Some(Key::Real(k)) => k,
            };
            let value = match map.next_value_seed(Strict {
                ctx: &mut *self.ctx,
            }) {
                Ok(v) => v,
                Err(e) => {
                    self.ctx.unwind(|| key.clone());
                    return Err(e);
                }
            };
            match out.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    return Err(self.ctx.refuse(Problem::DuplicateKey(quote(slot.key()))))
                }
            }
        }
    }
}

/// An object key, or serde_json's marker that a number's digits follow.
enum Key {
    Real(String),
    Number,
}

/// Tells a real key from serde_json's number marker without looking at its
/// text: a real key is read by serde_json's key reader, which honours
/// `deserialize_newtype_struct`; the marker's reader answers every request
/// with the marker string. (Pinned by the tests below.)
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_newtype_struct("KeyturnKey", KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        <String as serde::Deserialize>::deserialize(d).map(Key::Real)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        if v == NUMBER_TOKEN {
            Ok(Key::Number)
        } else {
            Err(E::custom("unexpected object key"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(text: &str) -> (String, Problem) {
        match parse_strict(text) {
            Err(StrictError::Refused { at, problem }) => (at, problem),
            other => panic!("{text}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let a = parse_strict(r#"{ "b": 1, "a": {"z": [1, 2], "y": "é\n\"q\"\u0001"} }"#).unwrap();
        let b = parse_strict(r#"{"a":{"y":"é\n\"q\"\u0001","z":[1,2]},"b":1}"#).unwrap();
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"y":"é\n\"q\"\u0001","z":[1,2]},"b":1}"#
        );
        assert_eq!(args_hash(&a), args_hash(&b));
        assert_eq!(args_hash(&a).len(), 64);
        assert!(args_hash(&a)
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // Same escaping as serde_json for every string.
        let s = json!("tab\t nul\u{0} bs\u{8} ff\u{c} uni\u{7f}\u{2028}");
        assert_eq!(canonical_json(&s), serde_json::to_string(&s).unwrap());
        // Byte order of keys, not locale order.
        assert_eq!(
            canonical_json(&json!({"b": 0, "B": 0, "a": 0, "é": 0})),
            r#"{"B":0,"a":0,"b":0,"é":0}"#
        );
        assert_eq!(
            args_hash(&json!({})),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn args_hash_changes_with_any_value() {
        let base = json!({"n": 1, "list": [1, [2, 3]], "s": "x"});
        let variants = [
            json!({"n": 1.0, "list": [1, [2, 3]], "s": "x"}),
            json!({"n": "1", "list": [1, [2, 3]], "s": "x"}),
            json!({"n": 2, "list": [1, [2, 3]], "s": "x"}),
            json!({"n": 1, "list": [1, [3, 2]], "s": "x"}),
            json!({"n": 1, "list": [[2, 3], 1], "s": "x"}),
            json!({"n": 1, "list": [1, [2, 3]], "s": "x "}),
            json!({"n": 1, "list": [1, [2, 3]], "s": "x", "t": null}),
            json!({"n": 1, "list": [1, [2, 3]], "S": "x"}),
        ];
        let h = args_hash(&base);
        for v in &variants {
            assert_ne!(h, args_hash(v), "{v}");
        }
    }

    #[test]
    fn big_integers_keep_every_digit() {
        for lit in [
            "123456789012345678901",
            "-123456789012345678901",
            "18446744073709551616",
            "-9223372036854775809",
            "340282366920938463463374607431768211457",
        ] {
            let v = parse_strict(&format!("{{\"n\":{lit}}}")).unwrap();
            assert_eq!(canonical_json(&v), format!("{{\"n\":{lit}}}"));
            assert_eq!(v.to_string(), format!("{{\"n\":{lit}}}"));
            assert!(serde_json::to_string_pretty(&v).unwrap().contains(lit));
        }
        // One digit apart: different hashes.
        let a = parse_strict(r#"{"n":123456789012345678901}"#).unwrap();
        let b = parse_strict(r#"{"n":123456789012345678900}"#).unwrap();
        assert_ne!(args_hash(&a), args_hash(&b));
        let long = "9".repeat(MAX_INTEGER_DIGITS);
        assert!(parse_strict(&long).is_ok());
        let (_, p) = refused(&format!("[{long}9]"));
        assert_eq!(
            p,
            Problem::Number(NumberProblem::TooManyDigits {
                digits: MAX_INTEGER_DIGITS + 1
            })
        );
    }

    #[test]
    fn floats_take_the_shortest_round_trip_form() {
        for (lit, canon) in [
            ("1.0", "1.0"),
            ("1e2", "100.0"),
            ("1E2", "100.0"),
            ("100.0", "100.0"),
            ("1.50", "1.5"),
            ("0.1", "0.1"),
            ("-0.0", "-0.0"),
            ("0e0", "0.0"),
            ("0.0e-999999999999999999999", "0.0"),
            ("1e16", "1e+16"),
            ("1.5e-7", "1.5e-7"),
            ("0.00001", "0.00001"),
            ("123456.789", "123456.789"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("12345678901234567e3", "1.2345678901234567e+19"),
        ] {
            let v = parse_strict(lit).unwrap_or_else(|e| panic!("{lit}: {e}"));
            assert_eq!(canonical_json(&v), canon, "{lit}");
            assert_eq!(v.to_string(), canon, "{lit}");
        }
        assert_ne!(
            args_hash(&parse_strict("1").unwrap()),
            args_hash(&parse_strict("1.0").unwrap())
        );
    }

    #[test]
    fn numbers_that_would_not_survive_are_refused() {
        assert_eq!(
            refused(r#"{"a":[-0]}"#),
            ("/a/0".into(), Problem::Number(NumberProblem::NegativeZero))
        );
        for lit in ["1e400", "-1e400", "1.8e308"] {
            assert!(
                matches!(
                    refused(lit).1,
                    Problem::Number(NumberProblem::OutOfRange { .. })
                ),
                "{lit}"
            );
        }
        for (lit, nearest) in [
            ("1e-400", "0.0"),
            ("0.10000000000000000001", "0.1"),
            ("3.14159265358979323846", "3.141592653589793"),
            ("12345678901234567890.0", "1.2345678901234567e+19"),
            ("9007199254740993.0", "9007199254740992.0"),
        ] {
            match refused(lit).1 {
                Problem::Number(NumberProblem::Inexact { nearest: n, .. }) => {
                    assert_eq!(n, nearest, "{lit}")
                }
                other => panic!("{lit}: {other:?}"),
            }
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            refused(r#"{"a":1,"a":2}"#),
            ("".into(), Problem::DuplicateKey("a".into()))
        );
        assert_eq!(
            refused(r#"{"x":{"y":[0,{"k":1,"j":2,"k":1}]}}"#),
            ("/x/y/1".into(), Problem::DuplicateKey("k".into()))
        );
        // Spelled differently, the same key.
        assert_eq!(
            refused(r#"{"p":{"\u0061":1,"a":2}}"#),
            ("/p".into(), Problem::DuplicateKey("a".into()))
        );
        let e = parse_strict(r#"{"a/~b":{"q":1,"q":2}}"#).unwrap_err();
        assert_eq!(e.to_string(), "duplicate key `q` at /a~1~0b");
        // Distinct keys are fine, and order is kept.
        let v = parse_strict(r#"{"b":1,"a":{"a":1},"A":2}"#).unwrap();
        assert_eq!(v.to_string(), r#"{"b":1,"a":{"a":1},"A":2}"#);
    }

    #[test]
    fn serde_jsons_number_marker_is_not_a_key() {
        // Read as a real object key (and refused), never as a number.
        for text in [
            r#"{"$serde_json::private::Number":"1"}"#,
            r#"{"x":{"$serde_json::private::Number":"12"}}"#,
            r#"{"a":1,"$serde_json::private::Number":"12"}"#,
        ] {
            assert_eq!(refused(text).1, Problem::ReservedKey, "{text}");
        }
        // Real numbers still go through the marker.
        assert_eq!(parse_strict("[1.5,7e1]").unwrap(), json!([1.5, 70.0]));
    }

    #[test]
    fn syntax_errors_are_told_apart() {
        for text in ["", "{", "{\"a\":1,}", "[1] x", "{\"a\":NaN}", "01"] {
            assert!(
                matches!(parse_strict(text), Err(StrictError::Syntax(_))),
                "{text}"
            );
        }
        assert!(parse_strict_slice(b"\xff").is_err());
        assert_eq!(
            parse_strict_slice(br#"{"a":[]}"#).unwrap(),
            json!({"a": []})
        );
    }

    #[test]
    fn canonical_number_is_total() {
        // Numbers built in code, or read back from storage, canonicalize too.
        for (n, canon) in [
            (Number::from(7u64), "7"),
            (Number::from(-7i64), "-7"),
            (Number::from_f64(1e16).unwrap(), "1e+16"),
            ("1E2".parse::<Number>().unwrap(), "100.0"),
            ("-0".parse::<Number>().unwrap(), "-0.0"),
        ] {
            assert_eq!(canonical_number(&n), canon);
        }
    }
}
