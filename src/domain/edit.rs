//! Edit, then approve: the pure rules for an approver's edit of a request's
//! arguments. The approver edits the arguments *as the card showed them*,
//! secrets masked; here the edit is read, its masks are checked against the
//! ones shown (each still there, at the same place, in the same order), the
//! original secrets are put back, and the change is described for the card.
//!
//! Pure: no I/O, no clock, no tokio. The full (unmasked) arguments come in
//! as a parameter; nothing here logs or keeps them.

use super::canonical::{parse_strict, StrictError};
use regex::Regex;
use serde_json::Value;
use std::sync::OnceLock;

/// Discord's limit on a text input's value (characters): the masked JSON
/// shown in the edit form must fit, and so must what comes back.
pub const MAX_EDIT_TEXT: usize = 4000;
/// At most this many changed places are listed in a diff; the rest are counted.
pub const MAX_DIFF_LINES: usize = 12;
/// Each value quoted in a diff is cut to this many characters.
pub const DIFF_VALUE_CHARS: usize = 60;

/// An approver's edit as the store applies it with their approval (see
/// [`crate::domain::decision::vote_edited`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ArgsChange {
    /// The `args_hash` the request had when the edit was checked: the
    /// store refuses the edit if it has changed since.
    pub expected_hash: String,
    /// The edited arguments, masked (what is stored and shown).
    pub args: Value,
    /// SHA-256 of the canonical JSON of the full edited arguments.
    pub args_hash: String,
    /// A run-tool's plan recomputed from the edited arguments.
    pub run: Option<super::run::RunPlan>,
}

/// Why an edit was refused. The text is safe to show the approver: it names
/// places (JSON pointers of the masked arguments) and masks, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("the edit is not valid JSON ({0}); nothing was changed")]
    NotJson(String),
    #[error("the edit must be a JSON object (like the arguments shown); nothing was changed")]
    NotObject,
    #[error(
        "the edit is {0} characters; at most {MAX_EDIT_TEXT} fit in the form; nothing was changed"
    )]
    TooLong(usize),
    /// A mask shown in the form is missing at its place, or changed, or a
    /// mask turned up where none was shown.
    #[error("{0}; a masked value cannot be changed, moved, copied or removed in an edit (approve or deny the request as is instead); nothing was changed")]
    Mask(String),
    /// The masked value cannot be put back (the secret is not known here,
    /// or the text around it is ambiguous).
    #[error("{0}; nothing was changed")]
    Restore(String),
}

fn mask_regex() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(super::redact::MASK_PATTERN).expect("mask pattern compiles"))
}

/// The masks in `s`, in order.
pub fn masks_in(s: &str) -> Vec<&str> {
    mask_regex().find_iter(s).map(|m| m.as_str()).collect()
}

/// The edit form's text: the masked arguments as pretty JSON, or `None`
/// when they do not fit in a Discord text input.
pub fn form_text(masked_args: &Value) -> Option<String> {
    let text = serde_json::to_string_pretty(masked_args).ok()?;
    (text.chars().count() <= MAX_EDIT_TEXT).then_some(text)
}

/// Reads the form's text: strict JSON (no duplicate keys, exact numbers),
/// an object, within the form's limit.
pub fn parse_edit(text: &str) -> Result<Value, EditError> {
    let n = text.chars().count();
    if n > MAX_EDIT_TEXT {
        return Err(EditError::TooLong(n));
    }
    let v = parse_strict(text).map_err(|e: StrictError| EditError::NotJson(e.to_string()))?;
    if !v.is_object() {
        return Err(EditError::NotObject);
    }
    Ok(v)
}

/// One string of the masked arguments that holds masks, with its place.
struct Masked<'a> {
    path: String,
    /// The string as shown (masked).
    shown: &'a str,
    /// The value at that place in the full arguments.
    full: Option<&'a Value>,
}

fn child(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// Every string holding a mask in `shown`, paired with the value at the
/// same place in `full` (`None` where `full` has nothing there).
fn masked_strings<'a>(
    shown: &'a Value,
    full: Option<&'a Value>,
    path: String,
    out: &mut Vec<Masked<'a>>,
) -> Result<(), EditError> {
    match shown {
        Value::String(s) if mask_regex().is_match(s) => {
            out.push(Masked {
                path,
                shown: s,
                full,
            });
        }
        Value::Object(map) => {
            for (k, v) in map {
                if mask_regex().is_match(k) {
                    return Err(EditError::Restore(format!(
                        "a key at {} holds a masked value, so this request cannot be edited",
                        display_path(&path)
                    )));
                }
                let f = full.and_then(|f| f.get(k));
                masked_strings(v, f, child(&path, k), out)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let f = full.and_then(|f| f.get(i));
                masked_strings(v, f, child(&path, &i.to_string()), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn display_path(p: &str) -> String {
    if p.is_empty() {
        "the top level".into()
    } else {
        format!("`{p}`")
    }
}

/// Whether the masked arguments hold any mask.
pub fn has_masks(masked: &Value) -> bool {
    let mut out = Vec::new();
    masked_strings(masked, None, String::new(), &mut out).map_or(true, |()| !out.is_empty())
}

/// Splits the full string `full` along the masks of `shown`: the secret
/// each mask stands for, in order. `None` when `full` does not fit `shown`
/// or the split is ambiguous (two different splits fit).
fn secrets_of(shown: &str, full: &str) -> Option<Vec<String>> {
    let mut pattern_lazy = String::from("(?s)^");
    let mut pattern_greedy = String::from("(?s)^");
    let mut last = 0;
    for m in mask_regex().find_iter(shown) {
        let lit = regex::escape(&shown[last..m.start()]);
        pattern_lazy.push_str(&lit);
        pattern_greedy.push_str(&lit);
        // `[kind:abcd…wxyz]` keeps the secret's first and last 4 characters.
        let inner = &m.as_str()[1..m.as_str().len() - 1];
        let preview = inner.split_once(':').map(|(_, p)| p).unwrap_or("");
        let (head, tail) = match preview.split_once('…') {
            Some((h, t)) if !h.is_empty() => (regex::escape(h), regex::escape(t)),
            _ => (String::new(), String::new()),
        };
        pattern_lazy.push_str(&format!("({head}.*?{tail})"));
        pattern_greedy.push_str(&format!("({head}.*{tail})"));
        last = m.end();
    }
    let lit = regex::escape(&shown[last..]);
    pattern_lazy.push_str(&lit);
    pattern_lazy.push('$');
    pattern_greedy.push_str(&lit);
    pattern_greedy.push('$');
    let split = |p: &str| -> Option<Vec<String>> {
        let re = Regex::new(p).ok()?;
        let caps = re.captures(full)?;
        Some(
            caps.iter()
                .skip(1)
                .map(|c| c.map(|m| m.as_str().to_owned()).unwrap_or_default())
                .collect(),
        )
    };
    let lazy = split(&pattern_lazy)?;
    let greedy = split(&pattern_greedy)?;
    (lazy == greedy).then_some(lazy)
}

/// What a masked place restores to.
enum Restore {
    /// The whole value was hidden (a secret field): the original value.
    Whole(Value),
    /// Masks inside a longer string: the secrets, in order.
    Within(Vec<String>),
    /// The string as shown, unchanged: the original string.
    Unchanged(String),
}

/// Checks an approver's edit against the arguments as shown and puts the
/// original secrets back: `shown` is the masked arguments the form held,
/// `full` the arguments as submitted (unmasked), `edited` the parsed edit.
///
/// Every string of `shown` holding masks must be at the same place in
/// `edited`, holding the same masks in the same order (the text around them
/// may change); no mask may appear anywhere else. Each mask gets its
/// original secret back (a mask standing for a whole value gets the whole
/// original value, whatever its type). Returns the full edited arguments.
pub fn restore(shown: &Value, full: &Value, edited: &Value) -> Result<Value, EditError> {
    let mut places = Vec::new();
    masked_strings(shown, Some(full), String::new(), &mut places)?;
    let mut plan: Vec<(String, Restore)> = Vec::with_capacity(places.len());
    for p in &places {
        let missing = || {
            EditError::Restore(format!(
                "the masked value at {} cannot be put back (the original is not known here)",
                display_path(&p.path)
            ))
        };
        let full = p.full.ok_or_else(missing)?;
        let masks = masks_in(p.shown);
        let whole = masks.len() == 1 && masks[0] == p.shown;
        let how = if whole {
            // A secret field hides the whole value (trimmed, or not a
            // string at all): it comes back whole.
            Restore::Whole(full.clone())
        } else {
            match full {
                Value::String(f) => match secrets_of(p.shown, f) {
                    Some(secrets) => Restore::Within(secrets),
                    None => Restore::Unchanged(f.clone()),
                },
                _ => return Err(missing()),
            }
        };
        plan.push((p.path.clone(), how));
    }
    // Every mask of the edit must be one of the places shown.
    let mut found = Vec::new();
    masked_strings(edited, None, String::new(), &mut found)
        .map_err(|_| EditError::Mask("a key of the edit holds a mask".into()))?;
    for f in &found {
        if !places.iter().any(|p| p.path == f.path) {
            return Err(EditError::Mask(format!(
                "{} holds a mask that was not shown there",
                display_path(&f.path)
            )));
        }
    }
    let mut out = edited.clone();
    for (p, (path, how)) in places.iter().zip(plan) {
        let Some(slot) = out.pointer_mut(&path) else {
            return Err(EditError::Mask(format!(
                "the masked value at {} was removed",
                display_path(&path)
            )));
        };
        let Value::String(now) = slot else {
            return Err(EditError::Mask(format!(
                "the masked value at {} was replaced",
                display_path(&path)
            )));
        };
        if masks_in(now) != masks_in(p.shown) {
            return Err(EditError::Mask(format!(
                "the masks at {} were changed, moved or removed",
                display_path(&path)
            )));
        }
        *slot = match how {
            Restore::Whole(v) => {
                if now.as_str() != p.shown {
                    return Err(EditError::Mask(format!(
                        "the masked value at {} must be left exactly as shown",
                        display_path(&path)
                    )));
                }
                v
            }
            Restore::Unchanged(orig) => {
                if now.as_str() != p.shown {
                    return Err(EditError::Restore(format!(
                        "the text around the masked values at {} cannot be edited (where each \
                         secret ends is ambiguous); leave that string as shown",
                        display_path(&path)
                    )));
                }
                Value::String(orig)
            }
            Restore::Within(secrets) => {
                let mut s = String::with_capacity(now.len());
                let mut last = 0;
                for (m, secret) in mask_regex().find_iter(now).zip(&secrets) {
                    s.push_str(&now[last..m.start()]);
                    s.push_str(secret);
                    last = m.end();
                }
                s.push_str(&now[last..]);
                Value::String(s)
            }
        };
    }
    Ok(out)
}

/// The changes from `old` to `new` (both masked), one line per changed
/// place: `~ /path: old → new`, `+ /path: new`, `- /path: old`. At most
/// [`MAX_DIFF_LINES`] lines, then `… and N more`.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    walk_diff(old, new, String::new(), &mut lines);
    let more = lines.len().saturating_sub(MAX_DIFF_LINES);
    lines.truncate(MAX_DIFF_LINES);
    if more > 0 {
        lines.push(format!("… and {more} more change(s)"));
    }
    lines
}

fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= DIFF_VALUE_CHARS {
        s
    } else {
        let cut: String = s.chars().take(DIFF_VALUE_CHARS).collect();
        format!("{cut}…")
    }
}

fn walk_diff(old: &Value, new: &Value, path: String, out: &mut Vec<String>) {
    let at = if path.is_empty() { "/" } else { &path };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => walk_diff(va, vb, child(&path, k), out),
                    None => out.push(format!("- {}: {}", child(&path, k), quote(va))),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(format!("+ {}: {}", child(&path, k), quote(vb)));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                walk_diff(va, vb, child(&path, &i.to_string()), out);
            }
        }
        (a, b) if a != b => out.push(format!("~ {at}: {} → {}", quote(a), quote(b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY_MASK: &str = "[secret_field:…]";
    const TOKEN_MASK: &str = "[github_token:ghp_…ABCD]";

    fn shown() -> Value {
        json!({
            "path": "/tmp/a",
            "password": KEY_MASK,
            "cmd": format!("curl -H 'Authorization: token {TOKEN_MASK}' https://x"),
            "n": 3,
        })
    }

    fn full() -> Value {
        json!({
            "path": "/tmp/a",
            "password": "hunter2",
            "cmd": "curl -H 'Authorization: token ghp_0123456789abcdefABCD' https://x",
            "n": 3,
        })
    }

    #[test]
    fn an_edit_that_keeps_the_masks_gets_the_secrets_back() {
        let mut edited = shown();
        edited["path"] = json!("/tmp/b");
        edited["cmd"] = json!(format!(
            "curl -sS -H 'Authorization: token {TOKEN_MASK}' https://y"
        ));
        edited["extra"] = json!(true);
        let out = restore(&shown(), &full(), &edited).unwrap();
        assert_eq!(
            out,
            json!({
                "path": "/tmp/b",
                "password": "hunter2",
                "cmd": "curl -sS -H 'Authorization: token ghp_0123456789abcdefABCD' https://y",
                "n": 3,
                "extra": true,
            })
        );
        // Unchanged: the original comes back exactly.
        assert_eq!(restore(&shown(), &full(), &shown()).unwrap(), full());
    }

    #[test]
    fn a_whole_value_secret_of_any_type_comes_back() {
        let shown = json!({"pin": KEY_MASK});
        let full = json!({"pin": 1234});
        assert_eq!(restore(&shown, &full, &shown).unwrap(), full);
        // Trimmed when masked: restored with its spaces.
        let full = json!({"pin": " pw "});
        assert_eq!(restore(&shown, &full, &shown).unwrap(), full);
    }

    #[test]
    fn several_masks_in_one_string_restore_in_order() {
        let shown = json!({"c": "a [k:…] b [k:…] c"});
        let full = json!({"c": "a s1 b s2 c"});
        let edited = json!({"c": "A [k:…] B [k:…] C"});
        assert_eq!(
            restore(&shown, &full, &edited).unwrap(),
            json!({"c": "A s1 B s2 C"})
        );
    }

    #[test]
    fn a_changed_moved_copied_or_removed_mask_is_refused() {
        let cases = [
            // Removed.
            json!({"path": "/tmp/a", "cmd": shown()["cmd"], "n": 3}),
            // Replaced by text (an attempt to reveal or overwrite).
            json!({"path": "/tmp/a", "password": "other", "cmd": shown()["cmd"], "n": 3}),
            // Changed mask text.
            json!({"path": "/tmp/a", "password": "[secret_field:x…]", "cmd": shown()["cmd"], "n": 3}),
            // Moved: the mask is now under another key.
            json!({"path": KEY_MASK, "password": KEY_MASK, "cmd": shown()["cmd"], "n": 3}),
            // Masks of the command dropped.
            json!({"path": "/tmp/a", "password": KEY_MASK, "cmd": "curl https://x", "n": 3}),
            // Copied into the command twice.
            json!({"path": "/tmp/a", "password": KEY_MASK,
                   "cmd": format!("{TOKEN_MASK} {TOKEN_MASK}"), "n": 3}),
            // Text added around a whole-value mask.
            json!({"path": "/tmp/a", "password": format!("x{KEY_MASK}"), "cmd": shown()["cmd"], "n": 3}),
        ];
        for (i, e) in cases.iter().enumerate() {
            let err = restore(&shown(), &full(), e).unwrap_err();
            assert!(matches!(err, EditError::Mask(_)), "case {i}: {err:?}");
            let text = err.to_string();
            assert!(
                !text.contains("hunter2") && !text.contains("0123456789"),
                "{text}"
            );
        }
    }

    #[test]
    fn without_the_original_a_masked_request_cannot_be_restored() {
        let err = restore(&shown(), &json!({}), &shown()).unwrap_err();
        assert!(matches!(err, EditError::Restore(_)), "{err:?}");
    }

    #[test]
    fn the_form_and_its_parse_have_limits() {
        assert!(form_text(&shown()).unwrap().contains(KEY_MASK));
        let big = json!({"a": "x".repeat(MAX_EDIT_TEXT)});
        assert_eq!(form_text(&big), None);
        assert!(matches!(parse_edit("{"), Err(EditError::NotJson(_))));
        assert!(matches!(parse_edit("[1]"), Err(EditError::NotObject)));
        assert!(matches!(
            parse_edit(r#"{"a":1,"a":2}"#),
            Err(EditError::NotJson(_))
        ));
        let at = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_EDIT_TEXT - 8));
        assert_eq!(at.chars().count(), MAX_EDIT_TEXT);
        assert!(parse_edit(&at).is_ok());
        let past = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_EDIT_TEXT - 7));
        assert!(matches!(parse_edit(&past), Err(EditError::TooLong(_))));
    }

    #[test]
    fn a_diff_lists_each_change_masked_and_bounded() {
        let mut edited = shown();
        edited["path"] = json!("/tmp/b");
        edited["extra"] = json!(1);
        edited.as_object_mut().unwrap().remove("n");
        let d = diff(&shown(), &edited);
        assert_eq!(
            d,
            vec![
                "~ /path: \"/tmp/a\" → \"/tmp/b\"".to_string(),
                "- /n: 3".to_string(),
                "+ /extra: 1".to_string(),
            ]
        );
        let many: serde_json::Map<String, Value> = (0..30)
            .map(|i| (format!("k{i}"), json!("y".repeat(200))))
            .collect();
        let d = diff(&json!({}), &Value::Object(many));
        assert_eq!(d.len(), MAX_DIFF_LINES + 1);
        assert!(d.last().unwrap().contains("18 more"));
        assert!(d[0].chars().count() < DIFF_VALUE_CHARS + 20);
        assert!(has_masks(&shown()));
        assert!(!has_masks(&json!({"a": "b"})));
    }
}
