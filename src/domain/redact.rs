//! Secret masking for tool-call arguments and free text (the canonical JSON
//! form and hash are in `canonical`, re-exported here). This module owns the
//! tables of secret-looking keys and secret formats, the high-entropy
//! heuristic and the mask text. It is pure: no I/O, clock, randomness or
//! async runtime, and it imports nothing from the rest of the crate.
//!
//! Choices made here, on purpose:
//! - Values under secret-looking keys are hidden entirely (`[secret_field:…]`),
//!   because a free-form password would leak half of itself through a
//!   first-4/last-4 preview. Only when the whole value is one recognised token
//!   (e.g. `ghp_…`) is it masked as that format, preview included, exactly as
//!   it would be in free text. `null` and `""` carry nothing and are kept.
//!   For the same reason URL passwords, `Basic` credentials and generic
//!   `password=…` values are always hidden entirely; format tokens keep the
//!   preview that [`mask`] gives them.
//! - Masks are never masked again: text that already reads as a mask is
//!   skipped, so redacting redacted output changes nothing and finds nothing.
//! - Object keys are never treated as secrets by name, but secret *formats*
//!   inside a key are masked like any string, so a finding's path never
//!   carries the raw secret. Should two masked keys collide, `#2`, `#3`… is
//!   appended so no member is lost.
//! - High entropy ignores pure hex (git SHAs, digests, hex ids, UUIDs), runs
//!   that split into short words (`kube-prometheus-stack-7f9c8d`), camelCase
//!   identifiers, path segments, subresource-integrity hashes, and public
//!   keys and certificates (PEM, `ssh-ed25519 AAAA…`). Base64 that
//!   is shorter than 32 characters (a short word or phrase) is never a
//!   candidate; longer base64 is flagged even when it decodes to text,
//!   because a base64'd credential looks exactly like that.
//! - `redact_text` findings carry the empty path `""` (the text itself).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::OnceLock;

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use regex::Regex;
use unicode_normalization::UnicodeNormalization as _;

use super::secret_rules::{keyed_value_ok, Group, Provider, COMMAND_LINE, PROVIDERS};

/// Kind reported for values hidden because of their key.
const SECRET_FIELD: &str = "secret_field";
/// Kind reported by the entropy heuristic.
const HIGH_ENTROPY: &str = "high_entropy";
/// Ellipsis used in mask text; it is in no rule's alphabet, so a mask never
/// matches a rule again.
const ELLIPSIS: char = '…';
/// Secrets shorter than this are hidden entirely; longer ones keep a preview.
const PREVIEW_MIN_CHARS: usize = 16;
/// Characters of preview kept at each end.
const PREVIEW_CHARS: usize = 4;
/// Shortest run the entropy heuristic looks at.
const ENTROPY_MIN_LEN: usize = 32;
/// Fraction of the highest entropy possible for a run (given its length and
/// alphabet) above which it counts as random. Calibrated so that < 1 % of
/// random base62 tokens of 32 chars fall below (see tests).
const ENTROPY_RATIO: f64 = 0.78;
/// Share of a mixed-case run covered by word-like pieces above which it is a
/// camelCase identifier rather than a token.
const WORD_COVERAGE_MAX: f64 = 0.7;

/// Normalised key names (lowercase, only letters and digits) whose value is
/// always a secret.
const SECRET_KEYS_EXACT: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "passphrase",
    "token",
    "accesstoken",
    "refreshtoken",
    "idtoken",
    "authtoken",
    "bearertoken",
    "sessiontoken",
    "secret",
    "clientsecret",
    "secretkey",
    "secretaccesskey",
    "apikey",
    "xapikey",
    "apitoken",
    "authorization",
    "proxyauthorization",
    "auth",
    "cookie",
    "cookies",
    "setcookie",
    "privatekey",
    "credentials",
    "credential",
    "creds",
    "session",
    "sessionid",
    "sessionkey",
    "jwt",
    "otp",
    "connectionstring",
    "encryptionkey",
    "signingkey",
    "masterkey",
];

/// Normalised endings that make a key secret (`db_password`, `X-Auth-Token`,
/// `OPENAI_API_KEY`).
const SECRET_KEY_SUFFIXES: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "secretkey",
    "credentials",
    "cookie",
    "authorization",
    "sessionid",
];

/// Normalised keys that end like a secret but hold pagination cursors.
const NOT_SECRET_KEYS: &[&str] = &[
    "nexttoken",
    "pagetoken",
    "nextpagetoken",
    "continuationtoken",
    "paginationtoken",
];

/// Fields that, in a `{"name": "Authorization", "value": "…"}` pair, name
/// the secret held by a sibling.
const PAIR_NAME_FIELDS: &[&str] = &["name", "key", "header", "field"];
/// Sibling fields holding the value in such a pair.
const PAIR_VALUE_FIELDS: &[&str] = &["value", "val"];

/// Whether a rule's match keeps a first/last-4 preview in its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preview {
    Keep,
    Hide,
}

/// One built-in secret format: kind, regex, capture group holding the secret,
/// an optional extra check on the captured text, and the preview policy.
struct RuleSpec {
    kind: &'static str,
    /// Lowercase literals one of which occurs in every match (the prefilter).
    keywords: &'static [&'static str],
    pattern: &'static str,
    group: usize,
    check: Option<fn(&str) -> bool>,
    preview: Preview,
}

const fn spec(
    kind: &'static str,
    keywords: &'static [&'static str],
    pattern: &'static str,
    group: usize,
) -> RuleSpec {
    RuleSpec {
        kind,
        keywords,
        pattern,
        group,
        check: None,
        preview: Preview::Keep,
    }
}

/// Built-in formats, most specific first: on overlap the earlier rule wins.
/// User rules go after these and before the generic ones (see `Redactor::new`).
const SPECIFIC_RULES: &[RuleSpec] = &[
    // PEM blocks, complete…
    spec(
        "private_key",
        &["private key"],
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        0,
    ),
    // …or cut off before their END line.
    spec(
        "private_key",
        &["private key"],
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\\]|[A-Za-z0-9+/=:,.])*",
        0,
    ),
    spec(
        "aws_access_key",
        &["akia", "asia", "abia", "acca", "a3t"],
        r"\b((?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16})(?:[^A-Za-z0-9]|$)",
        1,
    ),
    spec(
        "aws_secret_key",
        &["secret"],
        r#"(?i)(?:aws_?secret_?(?:access_?)?key|secret_?access_?key|aws_?secret)["']?[ \t]*(?:=|:|:=|=>)[ \t]*["']?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
        1,
    ),
    spec(
        "github_token",
        &["ghp_", "gho_", "ghu_", "ghs_", "ghr_"],
        r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255})(?:[^A-Za-z0-9_]|$)",
        1,
    ),
    spec(
        "github_token",
        &["github_pat_"],
        r"\b(github_pat_[A-Za-z0-9_]{22,255})(?:[^A-Za-z0-9_]|$)",
        1,
    ),
    spec(
        "gitlab_token",
        &["glpat-", "glptt-", "gldt-", "glrt-", "glsoat-", "glcbt-"],
        r"\b(gl(?:pat|ptt|dt|rt|soat|cbt)-[A-Za-z0-9_\-]{20,}(?:\.[A-Za-z0-9_\-]+)*)",
        1,
    ),
    spec(
        "slack_token",
        &["xox"],
        r"\b(xox[abposr]-[A-Za-z0-9\-]{10,})",
        1,
    ),
    spec(
        "slack_token",
        &["xapp-"],
        r"\b(xapp-[0-9]-[A-Za-z0-9\-]{10,})",
        1,
    ),
    spec(
        "slack_webhook",
        &["hooks.slack.com"],
        r"(?i)hooks\.slack\.com/(?:services|workflows|triggers)/([A-Za-z0-9/_+\-]{8,})",
        1,
    ),
    spec(
        "stripe_key",
        &["_live_", "_test_", "_prod_", "whsec_"],
        r"\b((?:sk|rk)_(?:live|test|prod)_[A-Za-z0-9]{10,}|whsec_[A-Za-z0-9]{20,})",
        1,
    ),
    spec(
        "anthropic_key",
        &["sk-ant-"],
        r"\b(sk-ant-[A-Za-z0-9_\-]{20,})",
        1,
    ),
    RuleSpec {
        check: Some(looks_like_openai_body),
        ..spec(
            "openai_key",
            &["sk-"],
            r"\b(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,})",
            1,
        )
    },
    spec(
        "google_api_key",
        &["aiza"],
        r"\b(AIza[0-9A-Za-z_\-]{35})(?:[^0-9A-Za-z_\-]|$)",
        1,
    ),
    spec(
        "jwt",
        &["eyj"],
        r"\b(eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*)",
        1,
    ),
    spec(
        "npm_token",
        &["npm_"],
        r"\b(npm_[A-Za-z0-9]{36})(?:[^A-Za-z0-9]|$)",
        1,
    ),
    spec(
        "sendgrid_key",
        &["sg."],
        r"\b(SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43})(?:[^A-Za-z0-9_\-]|$)",
        1,
    ),
    spec(
        "huggingface_token",
        &["hf_"],
        r"\b(hf_[A-Za-z0-9]{34,})(?:[^A-Za-z0-9]|$)",
        1,
    ),
    RuleSpec {
        preview: Preview::Hide,
        ..spec(
            "url_password",
            &["://"],
            r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s:/?#@\[\]]*:([^\s/?#@]+)@",
            1,
        )
    },
];

/// Generic rules, tried after the specific and user rules.
const GENERIC_RULES: &[RuleSpec] = &[
    RuleSpec {
        check: Some(looks_like_bearer_token),
        ..spec(
            "bearer_token",
            &["bearer", "token"],
            r"(?i)\b(?:bearer|token)[ \t]+([A-Za-z0-9\-._~+/]{8,}=*)",
            1,
        )
    },
    RuleSpec {
        check: Some(is_basic_credentials),
        preview: Preview::Hide,
        ..spec(
            "basic_auth",
            &["basic"],
            r"(?i)\bbasic[ \t]+([A-Za-z0-9+/]{4,}={0,2})",
            1,
        )
    },
    RuleSpec {
        check: Some(looks_like_assigned_value),
        preview: Preview::Hide,
        ..spec(
            "generic_secret",
            &["pass", "secret", "token", "credential", "key"],
            r#"(?i)[a-z0-9_.\-]*?(?:password|passwd|passphrase|secret|token|credentials?|(?:api|private|secret|access|auth|signing|encryption|master)[_\-]?key)["']?[ \t]*(?:=|:|:=|=>)[ \t]*["']?([^\s"'&;,<>\[\]{}():][^\s"'&;,<>\[\]{}()]{2,})"#,
            1,
        )
    },
    RuleSpec {
        check: Some(looks_like_flag_value),
        preview: Preview::Hide,
        ..spec(
            "generic_secret",
            &["pass", "token", "secret", "key"],
            r#"(?i)(?:^|\s)--?(?:password|passwd|pass|token|secret|api-key|apikey|auth-token|access-token|client-secret)[ \t]+["']?([^\s"'&;,<>\[\]{}()]{3,})"#,
            1,
        )
    },
    RuleSpec {
        check: Some(looks_like_user_password),
        preview: Preview::Hide,
        ..spec(
            "generic_secret",
            &["-u"],
            r#"(?:^|\s)(?:-u|--user)(?:[ \t]+|=)["']?[^\s:"']+:([^\s"'@]{3,})"#,
            1,
        )
    },
];

/// A mask produced by [`mask`]: used to skip already-masked text.
pub(crate) const MASK_PATTERN: &str = r"\[[A-Za-z0-9_.\-]+:(?:(?s:.{4})…(?s:.{4})|…)\]";
/// Public material that looks random but is shown on purpose (public keys,
/// certificates): exempt from the entropy heuristic, not from the rules.
const PUBLIC_MATERIAL_PATTERN: &str = r"-----BEGIN (?:[A-Z0-9]+ )*(?:PUBLIC KEY|CERTIFICATE|CERTIFICATE REQUEST|X509 CRL|PGP PUBLIC KEY BLOCK|PGP SIGNATURE)-----(?:[\s\S]*?-----END [A-Z0-9 ]+-----|[\s\S]*)|\b(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp[0-9]+|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) AAAA[A-Za-z0-9+/]+=*";
/// Candidate runs for the entropy heuristic.
const ENTROPY_RUN_PATTERN: &str = r"[A-Za-z0-9+/=_\-]{32,}";
/// Word-like pieces used to recognise camelCase identifiers.
const WORD_PATTERN: &str = r"[A-Z]?[a-z]{2,}";

/// A user-supplied redaction rule from the configuration. If the pattern has
/// a capture group, group 1 is the secret; otherwise the whole match is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ExtraRule {
    /// Kind reported in findings and shown in the mask.
    pub name: String,
    /// Regular expression (Rust `regex` syntax).
    pub pattern: String,
}

/// Why a [`Redactor`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    /// A user rule's pattern does not compile.
    #[error("redaction rule `{name}`: invalid pattern: {source}")]
    BadPattern {
        /// The rule's name.
        name: String,
        /// The regex compiler's complaint.
        #[source]
        source: regex::Error,
    },
}

/// One secret that was masked: its kind and where it was, as a JSON pointer
/// (`/headers/Authorization`). Paths are built from masked keys, so they never
/// carry the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Rule kind, e.g. `aws_access_key`, `secret_field`, `high_entropy`,
    /// or [`ENCODED_SECRET`].
    pub kind: String,
    /// JSON pointer to the value; `""` for the root or for free text.
    pub path: String,
    /// For an encoded secret: what it decodes to and how it was encoded
    /// (`github_token as base64`). Never the secret itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// Kind of a finding whose secret hid behind an encoding (hex, percent,
/// base64, HTML entities, fullwidth or mathematical letters, spaced-out
/// letters).
pub const ENCODED_SECRET: &str = "encoded_secret";

/// A masked deep copy of a JSON value and what was masked in it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Redacted {
    /// The value with every secret replaced by its mask.
    pub value: serde_json::Value,
    /// Masked secrets, in document order.
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Reported in findings.
    kind: String,
    /// Shown in the mask: `kind` reduced to mask-safe characters.
    label: String,
    regex: Regex,
    group: Group,
    check: Option<fn(&str) -> bool>,
    preview: Preview,
    /// Lowercase literals one of which occurs in every match; empty: the
    /// rule always runs (user rules).
    keywords: Vec<String>,
}

impl Rule {
    /// The secret's span in one match, if the match has one.
    fn secret<'h>(&self, caps: &regex::Captures<'h>) -> Option<regex::Match<'h>> {
        match self.group {
            Group::Nth(g) => caps.get(g),
            Group::FirstSet => caps.iter().skip(1).flatten().next(),
        }
    }
}

/// Compiled rules shared by every `Redactor`: built once, then cloned
/// (a `Regex` clone is a cheap reference count).
#[derive(Debug)]
struct Builtins {
    specific: Vec<Rule>,
    generic: Vec<Rule>,
    mask: Regex,
    public_material: Regex,
    entropy_run: Regex,
    word: Regex,
    /// Runs that may hide an encoded secret, by encoding.
    encoded: Vec<(Encoding, Regex)>,
}

fn compile_spec(s: &RuleSpec) -> Rule {
    Rule {
        kind: s.kind.to_owned(),
        label: s.kind.to_owned(),
        regex: Regex::new(s.pattern).expect("built-in redaction rule must compile"),
        group: Group::Nth(s.group),
        check: s.check,
        preview: s.preview,
        keywords: s.keywords.iter().map(|k| (*k).to_owned()).collect(),
    }
}

fn compile_provider(p: &Provider) -> Rule {
    let (src, group) = p.pattern();
    Rule {
        kind: p.kind.to_owned(),
        label: p.kind.to_owned(),
        regex: Regex::new(&src).expect("built-in provider rule must compile"),
        group,
        check: p.is_keyed().then_some(keyed_value as fn(&str) -> bool),
        preview: if p.hide { Preview::Hide } else { Preview::Keep },
        keywords: p.keywords.iter().map(|k| (*k).to_owned()).collect(),
    }
}

/// A value found under a provider's key: not a placeholder, and shaped like
/// a credential.
fn keyed_value(s: &str) -> bool {
    keyed_value_ok(s) && looks_like_assigned_value(s)
}

fn builtins() -> &'static Builtins {
    static BUILTINS: OnceLock<Builtins> = OnceLock::new();
    BUILTINS.get_or_init(|| Builtins {
        specific: SPECIFIC_RULES
            .iter()
            .map(compile_spec)
            .chain(PROVIDERS.iter().chain(COMMAND_LINE).map(compile_provider))
            .collect(),
        generic: GENERIC_RULES.iter().map(compile_spec).collect(),
        mask: Regex::new(MASK_PATTERN).expect("mask pattern must compile"),
        public_material: Regex::new(PUBLIC_MATERIAL_PATTERN)
            .expect("public material pattern must compile"),
        entropy_run: Regex::new(ENTROPY_RUN_PATTERN).expect("entropy pattern must compile"),
        word: Regex::new(WORD_PATTERN).expect("word pattern must compile"),
        encoded: ENCODED_RUNS
            .iter()
            .map(|(e, p)| (*e, Regex::new(p).expect("encoded-run pattern must compile")))
            .collect(),
    })
}

/// Picks, for one string, the rules worth running: those with a keyword in
/// it (one Aho-Corasick pass) and those without keywords.
#[derive(Debug)]
struct Prefilter {
    /// All keywords, ASCII case-insensitive; `None` if there are none.
    ac: Option<AhoCorasick>,
    /// Keyword index → rules that list it.
    rules_of: Vec<Vec<usize>>,
    /// Rules that always run.
    always: Vec<usize>,
    rule_count: usize,
}

impl Prefilter {
    fn new(rules: &[Rule]) -> Self {
        let mut keywords: Vec<String> = Vec::new();
        let mut rules_of: Vec<Vec<usize>> = Vec::new();
        let mut always = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            if r.keywords.is_empty() {
                always.push(i);
            }
            for k in &r.keywords {
                match keywords.iter().position(|x| x == k) {
                    Some(at) => rules_of[at].push(i),
                    None => {
                        keywords.push(k.clone());
                        rules_of.push(vec![i]);
                    }
                }
            }
        }
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&keywords)
            .ok();
        Prefilter {
            ac,
            rules_of,
            always,
            rule_count: rules.len(),
        }
    }

    /// `out[i]`: rule `i` may match `s`.
    fn candidates(&self, s: &str) -> Vec<bool> {
        let mut out = vec![false; self.rule_count];
        for &i in &self.always {
            out[i] = true;
        }
        match &self.ac {
            Some(ac) => {
                let mut seen = vec![false; self.rules_of.len()];
                for m in ac.find_overlapping_iter(s) {
                    let k = m.pattern().as_usize();
                    if !seen[k] {
                        seen[k] = true;
                        for &i in &self.rules_of[k] {
                            out[i] = true;
                        }
                    }
                }
            }
            // Without an automaton every rule runs: slower, never laxer.
            None => out.iter_mut().for_each(|c| *c = true),
        }
        out
    }
}

/// Masks secrets in JSON values and text. Cheap to clone; build once from
/// configuration.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Specific, then user, then generic rules: earlier wins on overlap.
    rules: Vec<Rule>,
    /// Which rules to run on a given string.
    prefilter: Arc<Prefilter>,
    /// Extra exact secret keys from configuration, normalised.
    extra_keys: HashSet<String>,
}

impl Default for Redactor {
    /// Built-in keys and rules only.
    fn default() -> Self {
        static DEFAULT: OnceLock<Redactor> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                let b = builtins();
                let rules: Vec<Rule> = b.specific.iter().chain(&b.generic).cloned().collect();
                Redactor {
                    prefilter: Arc::new(Prefilter::new(&rules)),
                    rules,
                    extra_keys: HashSet::new(),
                }
            })
            .clone()
    }
}

impl Redactor {
    /// Builds a redactor with extra secret key names (matched exactly after
    /// normalisation: case, `-`, `_` and `.` are ignored) and extra regex
    /// rules (tried after the built-in formats, before the generic ones).
    pub fn new(
        extra_secret_keys: &[String],
        extra_rules: &[ExtraRule],
    ) -> Result<Self, RedactError> {
        let b = builtins();
        let mut rules = b.specific.clone();
        for r in extra_rules {
            let regex = Regex::new(&r.pattern).map_err(|source| RedactError::BadPattern {
                name: r.name.clone(),
                source,
            })?;
            let group = Group::Nth(usize::from(regex.captures_len() > 1));
            rules.push(Rule {
                kind: r.name.clone(),
                label: mask_label(&r.name),
                regex,
                group,
                check: None,
                preview: Preview::Keep,
                keywords: Vec::new(),
            });
        }
        rules.extend(b.generic.iter().cloned());
        let extra_keys = extra_secret_keys
            .iter()
            .map(|k| normalize_key(k))
            .filter(|k| !k.is_empty())
            .collect();
        Ok(Redactor {
            prefilter: Arc::new(Prefilter::new(&rules)),
            rules,
            extra_keys,
        })
    }

    /// Returns a masked deep copy of `v` and the findings, in document order.
    pub fn redact_value(&self, v: &serde_json::Value) -> Redacted {
        let mut findings = Vec::new();
        let value = self.walk(v, "", false, &mut findings);
        Redacted { value, findings }
    }

    /// Masks secret formats in free text (a justification, a log line).
    /// Findings carry the empty path.
    pub fn redact_text(&self, s: &str) -> (String, Vec<Finding>) {
        let mut findings = Vec::new();
        let out = self.redact_str(s, "", &mut findings);
        (out, findings)
    }

    /// Whether a key's value must be hidden whatever it looks like.
    fn is_secret_key(&self, key: &str) -> bool {
        let k = normalize_key(key);
        if k.is_empty() || NOT_SECRET_KEYS.contains(&k.as_str()) {
            return false;
        }
        SECRET_KEYS_EXACT.contains(&k.as_str())
            || self.extra_keys.contains(&k)
            || SECRET_KEY_SUFFIXES.iter().any(|s| k.ends_with(s))
    }

    fn walk(
        &self,
        v: &serde_json::Value,
        path: &str,
        secret: bool,
        findings: &mut Vec<Finding>,
    ) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let pair_secret = self.is_secret_pair(map);
                let mut out = serde_json::Map::with_capacity(map.len());
                for (k, child) in map {
                    // Secret formats inside a key are masked, but a key is not
                    // reported twice if it also turns up in the path below.
                    let mut key_findings = Vec::new();
                    let masked_key = self.redact_str(k, path, &mut key_findings);
                    let key = unique_key(&out, masked_key);
                    let child_path = pointer_child(path, &key);
                    for f in key_findings {
                        findings.push(Finding {
                            kind: f.kind,
                            path: child_path.clone(),
                            via: f.via,
                        });
                    }
                    let child_secret = secret
                        || self.is_secret_key(k)
                        || (pair_secret && PAIR_VALUE_FIELDS.contains(&normalize_key(k).as_str()));
                    let masked = self.walk(child, &child_path, child_secret, findings);
                    out.insert(key, masked);
                }
                Value::Object(out)
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut next_is_secret = false;
                for (i, item) in items.iter().enumerate() {
                    let child_path = pointer_child(path, &i.to_string());
                    out.push(self.walk(item, &child_path, secret || next_is_secret, findings));
                    // argv style: ["--password", "hunter2"].
                    next_is_secret = matches!(item, Value::String(s) if self.is_secret_flag(s));
                }
                Value::Array(out)
            }
            Value::String(s) if secret => Value::String(self.mask_field(s, path, findings)),
            Value::String(s) => Value::String(self.redact_str(s, path, findings)),
            Value::Number(_) | Value::Bool(_) if secret => {
                findings.push(finding(SECRET_FIELD, path));
                Value::String(hidden_mask(SECRET_FIELD))
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => v.clone(),
        }
    }

    /// `{"name": "Authorization", "value": "…"}`: the name sibling says the
    /// value sibling is a secret.
    fn is_secret_pair(&self, map: &serde_json::Map<String, serde_json::Value>) -> bool {
        map.iter().any(|(k, v)| {
            PAIR_NAME_FIELDS.contains(&normalize_key(k).as_str())
                && matches!(v, serde_json::Value::String(s) if self.is_secret_key(s))
        })
    }

    /// A command-line flag such as `--password` or `--api-key` (the `=value`
    /// form is caught by the text rules).
    fn is_secret_flag(&self, s: &str) -> bool {
        s.starts_with('-') && !s.contains('=') && self.is_secret_key(s.trim_start_matches('-'))
    }

    /// Hides a string that sits under a secret key.
    fn mask_field(&self, s: &str, path: &str, findings: &mut Vec<Finding>) -> String {
        if s.is_empty() || self.is_whole_mask(s) {
            return s.to_owned();
        }
        let trimmed = s.trim();
        let candidates = self.prefilter.candidates(trimmed);
        for (_, rule) in self
            .rules
            .iter()
            .enumerate()
            .filter(|(i, r)| candidates[*i] && r.preview == Preview::Keep)
        {
            let whole = rule.regex.captures_iter(trimmed).any(|c| {
                rule.secret(&c).is_some_and(|m| {
                    m.start() == 0
                        && m.end() == trimmed.len()
                        && rule.check.is_none_or(|f| f(m.as_str()))
                })
            });
            if whole {
                findings.push(finding(&rule.kind, path));
                return mask(trimmed, &rule.label);
            }
        }
        findings.push(finding(SECRET_FIELD, path));
        hidden_mask(SECRET_FIELD)
    }

    fn is_whole_mask(&self, s: &str) -> bool {
        builtins()
            .mask
            .find(s)
            .is_some_and(|m| m.start() == 0 && m.end() == s.len())
    }

    /// Masks every secret format in `s`, recording findings at `path`.
    fn redact_str(&self, s: &str, path: &str, findings: &mut Vec<Finding>) -> String {
        let b = builtins();
        // Existing masks are protected so that redaction is idempotent.
        let protected = Spans::from_ranges(b.mask.find_iter(s).map(|m| m.range()));
        let mut spans = Spans::default();
        let mut taken: Vec<Taken> = Vec::new();
        let candidates = self.prefilter.candidates(s);
        for (i, rule) in self.rules.iter().enumerate() {
            // Only rules with a keyword in `s` run, and `is_match` needs no
            // capture slots: most strings match no rule.
            if !candidates[i] || !rule.regex.is_match(s) {
                continue;
            }
            for caps in rule.regex.captures_iter(s) {
                let Some(m) = rule.secret(&caps) else {
                    continue;
                };
                if m.is_empty() || rule.check.is_some_and(|f| !f(m.as_str())) {
                    continue;
                }
                let r = m.range();
                if !protected.overlaps(&r) && !spans.overlaps(&r) {
                    spans.insert(r.clone());
                    taken.push(Taken {
                        range: r,
                        kind: &rule.kind,
                        label: &rule.label,
                        preview: rule.preview,
                        via: None,
                    });
                }
            }
        }
        // Secrets behind an encoding: masked whole where nothing else was
        // masked there, always reported.
        let mut reported_only = Vec::new();
        for (r, via) in self.encoded_hits(s) {
            if protected.overlaps(&r) {
                continue;
            }
            if spans.overlaps(&r) {
                reported_only.push(via);
                continue;
            }
            spans.insert(r.clone());
            taken.push(Taken {
                range: r,
                kind: ENCODED_SECRET,
                label: ENCODED_SECRET,
                preview: Preview::Hide,
                via: Some(via),
            });
        }
        let public = Spans::from_ranges(b.public_material.find_iter(s).map(|m| m.range()));
        for run in b.entropy_run.find_iter(s) {
            for piece in entropy_pieces(run.as_str()) {
                let r = run.start() + piece.start..run.start() + piece.end;
                if !public.overlaps(&r)
                    && !protected.overlaps(&r)
                    && !spans.overlaps(&r)
                    && is_high_entropy(&s[r.clone()], &b.word)
                {
                    spans.insert(r.clone());
                    taken.push(Taken {
                        range: r,
                        kind: HIGH_ENTROPY,
                        label: HIGH_ENTROPY,
                        preview: Preview::Keep,
                        via: None,
                    });
                }
            }
        }
        for via in reported_only {
            findings.push(Finding {
                kind: ENCODED_SECRET.to_owned(),
                path: path.to_owned(),
                via: Some(via),
            });
        }
        if taken.is_empty() {
            return s.to_owned();
        }
        taken.sort_by_key(|t| t.range.start);
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for t in taken {
            out.push_str(&s[at..t.range.start]);
            match t.preview {
                Preview::Keep => out.push_str(&mask(&s[t.range.clone()], t.label)),
                Preview::Hide => out.push_str(&hidden_mask(t.label)),
            }
            findings.push(Finding {
                kind: t.kind.to_owned(),
                path: path.to_owned(),
                via: t.via,
            });
            at = t.range.end;
        }
        out.push_str(&s[at..]);
        out
    }

    /// Encoded runs of `s` that decode to text one of the rules recognises,
    /// with a note of what and how (`github_token as base64`). Bounded: runs
    /// longer than `ENCODED_MAX_RUN` bytes are not decoded, and at most
    /// `ENCODED_BUDGET` bytes are decoded per string.
    fn encoded_hits(&self, s: &str) -> Vec<(Range<usize>, String)> {
        let b = builtins();
        let mut out: Vec<(Range<usize>, String)> = Vec::new();
        let mut budget = ENCODED_BUDGET;
        for (encoding, re) in &b.encoded {
            if !encoding.may_occur(s) {
                continue;
            }
            for m in re.find_iter(s) {
                let mut range = m.range();
                if *encoding == Encoding::SpacedLetters {
                    // The pattern includes one boundary character each side.
                    let token = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                    if let Some(c) = s[range.clone()].chars().next().filter(|c| !token(*c)) {
                        range.start += c.len_utf8();
                    }
                    if let Some(c) = s[range.clone()].chars().next_back().filter(|c| !token(*c)) {
                        range.end -= c.len_utf8();
                    }
                }
                let run = &s[range.clone()];
                if run.len() > ENCODED_MAX_RUN || out.iter().any(|(r, _)| r == &range) {
                    continue;
                }
                let Some(left) = budget.checked_sub(run.len()) else {
                    break;
                };
                budget = left;
                let Some(decoded) = encoding.decode(run) else {
                    continue;
                };
                if let Some(kind) = self.secret_kind(&decoded) {
                    out.push((range, format!("{kind} as {}", encoding.name())));
                }
            }
        }
        out
    }

    /// The kind of the first secret format found in `text` (rules only; the
    /// entropy heuristic means nothing on decoded text).
    fn secret_kind(&self, text: &str) -> Option<&str> {
        let candidates = self.prefilter.candidates(text);
        self.rules
            .iter()
            .enumerate()
            .filter(|(i, _)| candidates[*i])
            .find(|(_, rule)| {
                rule.regex.captures_iter(text).any(|c| {
                    rule.secret(&c)
                        .is_some_and(|m| !m.is_empty() && rule.check.is_none_or(|f| f(m.as_str())))
                })
            })
            .map(|(_, rule)| rule.kind.as_str())
    }
}

/// One span chosen for masking.
struct Taken<'a> {
    range: Range<usize>,
    kind: &'a str,
    label: &'a str,
    preview: Preview,
    via: Option<String>,
}

// ---- encoded secrets -------------------------------------------------------

/// Longest run decoded in search of a secret.
const ENCODED_MAX_RUN: usize = 4096;
/// Bytes decoded per string at most.
const ENCODED_BUDGET: usize = 256 * 1024;
/// Shortest decoded text looked at.
const DECODED_MIN_CHARS: usize = 8;

/// How a secret may be hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Hex,
    Percent,
    Base64,
    HtmlEntities,
    /// Fullwidth, mathematical, circled letters: folded by NFKC.
    WideLetters,
    /// `g h p _ A b C …`
    SpacedLetters,
}

/// Candidate runs, by encoding.
const ENCODED_RUNS: &[(Encoding, &str)] = &[
    (Encoding::Hex, r"(?:\\x[0-9A-Fa-f]{2}){8,}|[0-9A-Fa-f]{16,}"),
    (
        Encoding::Percent,
        r"[A-Za-z0-9._~+\-]*(?:%[0-9A-Fa-f]{2}[A-Za-z0-9._~+\-]*)+",
    ),
    (Encoding::Base64, r"[A-Za-z0-9+/_\-]{16,}={0,2}"),
    (
        Encoding::HtmlEntities,
        r"(?:[A-Za-z0-9_\-./+=:]*(?:&#[0-9]{1,7};|&#[xX][0-9A-Fa-f]{1,6};|&[A-Za-z]{2,8};)){2,}[A-Za-z0-9_\-./+=:]*",
    ),
    (
        Encoding::WideLetters,
        r"[\x21-\x7E\u{FF01}-\u{FF5E}\u{1D400}-\u{1D7FF}\u{2460}-\u{24FF}\u{1F130}-\u{1F189}]{8,}",
    ),
    (
        Encoding::SpacedLetters,
        r"(?:^|[^A-Za-z0-9_\-])(?:[A-Za-z0-9_\-][ \t]){11,}[A-Za-z0-9_\-](?:[^A-Za-z0-9_\-]|$)",
    ),
];

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Hex => "hex",
            Encoding::Percent => "percent-encoding",
            Encoding::Base64 => "base64",
            Encoding::HtmlEntities => "HTML entities",
            Encoding::WideLetters => "fullwidth or styled letters",
            Encoding::SpacedLetters => "spaced-out letters",
        }
    }

    /// A cheap test that spares the regex on most strings.
    fn may_occur(self, s: &str) -> bool {
        match self {
            Encoding::Percent => s.contains('%'),
            Encoding::HtmlEntities => s.contains("&#") || s.contains(';'),
            Encoding::WideLetters => !s.is_ascii(),
            Encoding::SpacedLetters => s.contains(' ') || s.contains('\t'),
            Encoding::Hex | Encoding::Base64 => s.len() >= 16,
        }
    }

    /// The decoded text, if the run decodes to mostly printable text.
    fn decode(self, run: &str) -> Option<String> {
        use base64::Engine as _;
        let text = match self {
            Encoding::Hex => {
                let digits: String = if run.starts_with("\\x") {
                    run.split("\\x").collect()
                } else {
                    run.to_owned()
                };
                if digits.len() % 2 != 0 {
                    return None;
                }
                String::from_utf8(hex::decode(digits).ok()?).ok()?
            }
            Encoding::Percent => {
                if run.len() < 12 {
                    return None;
                }
                percent_encoding::percent_decode_str(run)
                    .decode_utf8()
                    .ok()?
                    .into_owned()
            }
            Encoding::Base64 => {
                let body = run.trim_end_matches('=');
                let bytes = if body.contains(['-', '_']) {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body)
                } else {
                    base64::engine::general_purpose::STANDARD_NO_PAD.decode(body)
                };
                String::from_utf8(bytes.ok()?).ok()?
            }
            Encoding::HtmlEntities => decode_html_entities(run)?,
            Encoding::WideLetters => {
                if run.is_ascii() {
                    return None;
                }
                run.nfkc().collect()
            }
            Encoding::SpacedLetters => run.chars().filter(|c| !c.is_whitespace()).collect(),
        };
        let n = text.chars().count();
        let printable = text
            .chars()
            .filter(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'))
            .count();
        (n >= DECODED_MIN_CHARS && printable * 20 >= n * 19).then_some(text)
    }
}

/// Numeric entities and the named ones that spell token characters.
fn decode_html_entities(run: &str) -> Option<String> {
    const NAMED: &[(&str, char)] = &[
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("lowbar", '_'),
        ("UnderBar", '_'),
        ("colon", ':'),
        ("period", '.'),
        ("sol", '/'),
        ("hyphen", '-'),
        ("dash", '-'),
        ("equals", '='),
        ("plus", '+'),
        ("num", '#'),
        ("excl", '!'),
        ("percnt", '%'),
        ("commat", '@'),
        ("nbsp", ' '),
        ("tilde", '~'),
    ];
    let mut out = String::with_capacity(run.len());
    let mut rest = run;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let end = tail.find(';')?;
        let name = &tail[..end];
        let c = if let Some(hex) = name
            .strip_prefix(['#'])
            .and_then(|n| n.strip_prefix(['x', 'X']))
        {
            char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
        } else if let Some(dec) = name.strip_prefix('#') {
            char::from_u32(dec.parse().ok()?)?
        } else {
            NAMED.iter().find(|(n, _)| *n == name)?.1
        };
        out.push(c);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The mask for a secret: `[kind:abcd…wxyz]`, keeping the first and last four
/// characters only when the secret has at least 16, else `[kind:…]`. Kind
/// characters outside `[A-Za-z0-9_.-]` become `_` so that the mask is always
/// recognised as one (idempotency).
pub fn mask(secret: &str, kind: &str) -> String {
    let label = mask_label(kind);
    let n = secret.chars().count();
    if n < PREVIEW_MIN_CHARS {
        return hidden_mask(&label);
    }
    let head: String = secret.chars().take(PREVIEW_CHARS).collect();
    let tail: String = secret.chars().skip(n - PREVIEW_CHARS).collect();
    format!("[{label}:{head}{ELLIPSIS}{tail}]")
}

fn hidden_mask(label: &str) -> String {
    format!("[{label}:{ELLIPSIS}]")
}

fn mask_label(kind: &str) -> String {
    let label: String = kind
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if label.is_empty() {
        "secret".to_owned()
    } else {
        label
    }
}

fn finding(kind: &str, path: &str) -> Finding {
    Finding {
        kind: kind.to_owned(),
        path: path.to_owned(),
        via: None,
    }
}

/// Disjoint, non-empty byte ranges, so that an overlap check costs
/// O(log n) and a string with many matches stays linear-ish.
#[derive(Default)]
struct Spans {
    /// start → end
    by_start: BTreeMap<usize, usize>,
}

impl Spans {
    /// `ranges` must be disjoint (as `find_iter` yields them).
    fn from_ranges(ranges: impl Iterator<Item = Range<usize>>) -> Self {
        Spans {
            by_start: ranges.map(|r| (r.start, r.end)).collect(),
        }
    }

    /// Only the last span starting before `r.end` can overlap `r`, because
    /// the spans are disjoint.
    fn overlaps(&self, r: &Range<usize>) -> bool {
        self.by_start
            .range(..r.end)
            .next_back()
            .is_some_and(|(_, &end)| end > r.start)
    }

    fn insert(&mut self, r: Range<usize>) {
        self.by_start.insert(r.start, r.end);
    }
}

/// Lowercase letters and digits only: `X-API-Key` → `xapikey`.
fn normalize_key(k: &str) -> String {
    k.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Keeps every member when two keys mask to the same text.
fn unique_key(map: &serde_json::Map<String, serde_json::Value>, key: String) -> String {
    if !map.contains_key(&key) {
        return key;
    }
    (2..)
        .map(|i| format!("{key}#{i}"))
        .find(|k| !map.contains_key(k))
        .unwrap_or(key)
}

/// Appends one reference token to a JSON pointer (RFC 6901 escaping).
pub(crate) fn pointer_child(parent: &str, token: &str) -> String {
    let mut p = String::with_capacity(parent.len() + token.len() + 1);
    p.push_str(parent);
    p.push('/');
    for c in token.chars() {
        match c {
            '~' => p.push_str("~0"),
            '/' => p.push_str("~1"),
            c => p.push(c),
        }
    }
    p
}

// ---- checks on captured text -------------------------------------------

/// `sk-` keys carry mixed case and digits; `sk-learn-pipeline-…` does not.
fn looks_like_openai_body(s: &str) -> bool {
    let body = s.trim_start_matches("sk-");
    body.chars().any(|c| c.is_ascii_digit())
        && body.chars().any(|c| c.is_ascii_uppercase())
        && body.chars().any(|c| c.is_ascii_lowercase())
}

/// "Bearer of bad news" and "Bearer Authentication" are prose, not tokens.
fn looks_like_bearer_token(s: &str) -> bool {
    let has_digit = s.chars().any(|c| c.is_ascii_digit());
    let has_symbol = s.chars().any(|c| "-._~+/=".contains(c));
    let upper = s.chars().filter(char::is_ascii_uppercase).count();
    let lower = s.chars().filter(char::is_ascii_lowercase).count();
    has_digit || has_symbol || (s.len() >= 16 && upper >= 2 && lower >= 2)
}

/// `Basic` credentials are base64 of `user:password`.
fn is_basic_credentials(s: &str) -> bool {
    decode_base64(s).is_some_and(|bytes| bytes.contains(&b':'))
}

/// Values that are placeholders or references, not secrets.
fn looks_like_assigned_value(s: &str) -> bool {
    const PLACEHOLDERS: &[&str] = &[
        "true",
        "false",
        "null",
        "none",
        "nil",
        "undefined",
        "required",
        "optional",
        "string",
        "str",
        "bool",
        "boolean",
        "int",
        "integer",
        "number",
        "redacted",
        "hidden",
        "masked",
        "secret",
        "password",
        "token",
        "xxx",
        "xxxx",
        "your-token",
        "your_token",
        "your-password",
        "your_password",
    ];
    let lower = s.to_ascii_lowercase();
    let reference = ['$', '%', '<', '{', '*'].iter().any(|c| s.starts_with(*c))
        || lower.starts_with("process.env")
        || lower.starts_with("os.environ")
        || lower.starts_with("env.");
    let filler = s.chars().all(|c| matches!(c, '*' | 'x' | 'X' | '.' | '•'));
    // `secret = ks.derive_secret(…)`, `token: self.api_token`: a dotted
    // snake_case path is code naming a value, not the value.
    let code_path = s.contains('.')
        && s.contains('_')
        && s.split('.').all(|seg| {
            seg.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    !(reference || filler || code_path || PLACEHOLDERS.contains(&lower.as_str()))
}

/// `-u user:password`, but not `-u 1000:1000` (uid:gid).
fn looks_like_user_password(s: &str) -> bool {
    looks_like_assigned_value(s) && !s.chars().all(|c| c.is_ascii_digit())
}

/// After a `--token` flag in prose ("pass the --token flag"), a plain
/// lowercase word is an explanation, not a value.
fn looks_like_flag_value(s: &str) -> bool {
    looks_like_assigned_value(s) && !s.chars().all(|c| c.is_ascii_lowercase())
}

/// Strict standard base64 (padding optional); `None` if `s` is not base64.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let body = s.trim_end_matches('=');
    if body.len() % 4 == 1 || s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        let bits = chunk.len() * 6;
        acc <<= 24 - bits;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..1 + bits / 8]);
    }
    Some(out)
}

// ---- entropy heuristic ---------------------------------------------------

/// Splits a candidate run into the pieces judged separately: at interior `=`
/// (`key=value` in query strings), and at `/` when the run looks like a path
/// (some segment is a lowercase word), so a path's words are not averaged
/// into one "token" but a random segment inside a URL is still caught.
fn entropy_pieces(run: &str) -> Vec<Range<usize>> {
    let path_like = run.contains('/') && run.split('/').any(is_word_segment);
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = run.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        let interior_eq = c == b'=' && bytes.get(i + 1).is_some_and(|&n| n != b'=');
        if (path_like && c == b'/') || interior_eq {
            if i - start >= ENTROPY_MIN_LEN {
                out.push(start..i);
            }
            start = i + 1;
        }
    }
    if run.len() - start >= ENTROPY_MIN_LEN {
        out.push(start..run.len());
    }
    out
}

fn is_word_segment(seg: &str) -> bool {
    seg.len() >= 4
        && seg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
        && seg.chars().filter(char::is_ascii_lowercase).count() >= 3
}

/// Whether a piece of at least 32 characters looks like a random token.
fn is_high_entropy(tok: &str, word: &Regex) -> bool {
    if tok.len() < ENTROPY_MIN_LEN {
        return false;
    }
    // Hex (with or without dashes) is a digest, commit or UUID: shown on purpose.
    if tok.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return false;
    }
    // Subresource-integrity hashes from lock files.
    if ["sha1-", "sha256-", "sha384-", "sha512-"]
        .iter()
        .any(|p| tok.starts_with(p))
    {
        return false;
    }
    // kebab/snake identifiers made of short words.
    let parts: Vec<&str> = tok
        .split(['-', '_', '.', '+', '/', '='])
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() >= 3 && parts.iter().all(|p| p.len() <= 12) {
        return false;
    }
    let digits = tok.chars().filter(char::is_ascii_digit).count();
    let upper = tok.chars().filter(char::is_ascii_uppercase).count();
    let lower = tok.chars().filter(char::is_ascii_lowercase).count();
    if digits == 0 || upper + lower == 0 {
        return false;
    }
    if upper > 0 && lower > 0 {
        let covered: usize = word.find_iter(tok).map(|m| m.len()).sum();
        if covered as f64 / tok.len() as f64 > WORD_COVERAGE_MAX {
            return false;
        }
    }
    let mut alphabet = 10;
    if upper > 0 {
        alphabet += 26;
    }
    if lower > 0 {
        alphabet += 26;
    }
    if tok.chars().any(|c| !c.is_ascii_alphanumeric()) {
        alphabet += 2;
    }
    let max = (tok.len().min(alphabet) as f64).log2();
    shannon_entropy(tok) >= ENTROPY_RATIO * max
}

/// Shannon entropy in bits per character.
fn shannon_entropy(s: &str) -> f64 {
    let mut counts = [0usize; 256];
    for b in s.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

// ---- canonical form --------------------------------------------------------

/// The canonical form and hash live in [`super::canonical`]; re-exported so
/// callers keep their paths.
pub use super::canonical::{args_hash, canonical_json};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sha2::{Digest, Sha256};
    use std::collections::BTreeMap;

    #[test]
    fn every_builtin_rule_compiles() {
        for s in SPECIFIC_RULES.iter().chain(GENERIC_RULES) {
            let re = Regex::new(s.pattern);
            assert!(
                re.is_ok(),
                "rule {} does not compile: {:?}",
                s.kind,
                re.err()
            );
            let re = re.unwrap();
            assert!(
                s.group < re.captures_len(),
                "rule {} has no group {}",
                s.kind,
                s.group
            );
        }
        for p in [
            MASK_PATTERN,
            PUBLIC_MATERIAL_PATTERN,
            ENTROPY_RUN_PATTERN,
            WORD_PATTERN,
        ] {
            assert!(Regex::new(p).is_ok(), "{p}");
        }
        let b = builtins();
        assert_eq!(
            b.specific.len() + b.generic.len(),
            SPECIFIC_RULES.len() + PROVIDERS.len() + COMMAND_LINE.len() + GENERIC_RULES.len()
        );
    }

    /// (kind, text, secret that must disappear)
    const POSITIVES: &[(&str, &str, &str)] = &[
        ("private_key", "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bqXk2\n-----END RSA PRIVATE KEY-----\nend", "MIIEpAIBAAKCAQEA7bqXk2"),
        ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"),
        ("aws_access_key", "id AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
        ("aws_access_key", "ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
        ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("github_token", "token=ghp_R2d2C3poLuke1Leia2Han3Solo4Chewie5Ab", "ghp_R2d2C3poLuke1Leia2Han3Solo4Chewie5Ab"),
        ("github_token", "github_pat_11ABCDEFG0123456789abc_defGHIJKLmnopqrSTUVwxyz0123456789ABCDEFghijklmnopQRSTUVwxy", "github_pat_11ABCDEFG0123456789abc"),
        ("gitlab_token", "PRIVATE-TOKEN: glpat-Zx9Yw8Vu7Ts6Rq5Po4Nm", "glpat-Zx9Yw8Vu7Ts6Rq5Po4Nm"),
        ("slack_token", "xoxb-1234567890-9876543210987-AbCdEfGhIjKlMnOpQrStUvWx", "9876543210987-AbCdEfGhIjKlMnOpQrStUvWx"),
        ("slack_token", "xapp-1-A0123ABCDEF-1234567890123-0123456789abcdef", "1234567890123-0123456789abcdef"),
        ("slack_webhook", "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"),
        ("stripe_key", "Stripe.api_key = 'sk_test_4eC39HqLyjWDarjtT1zdp7dc'", "4eC39HqLyjWDarjtT1zdp7dc"),
        ("stripe_key", "rk_live_51Habc9Xyz8Wvu7Tsr6Qpo5Nml4", "51Habc9Xyz8Wvu7Tsr6Qpo5Nml4"),
        ("anthropic_key", "ANTHROPIC_API_KEY=sk-ant-api03-Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0-AA", "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0"),
        ("openai_key", "use sk-proj-Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv in prod", "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv"),
        ("openai_key", "sk-1234567890abcdefXy9ZT3BlbkFJ", "1234567890abcdefXy9ZT3BlbkFJ"),
        ("google_api_key", "https://maps.googleapis.com/x?key=AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe&y=1", "SyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"),
        ("jwt", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c", "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
        ("npm_token", "//registry.npmjs.org/:_authToken=npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
        ("sendgrid_key", "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", "TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc-1s5cr"),
        ("huggingface_token", "HF hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"),
        ("url_password", "postgres://admin:s3cr3t-P4ss@db.internal:5432/app", "s3cr3t-P4ss"),
        ("bearer_token", "curl -H 'Authorization: Bearer abc123def456ghi789' x", "abc123def456ghi789"),
        ("basic_auth", "Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("generic_secret", "DB_PASSWORD=hunter2hunter2", "hunter2hunter2"),
        ("generic_secret", "{\"password\": \"Tr0ub4dor&3\"}", "Tr0ub4dor&3"),
        ("generic_secret", "mysql -u root --password s3kr1tpass db", "s3kr1tpass"),
        ("generic_secret", "curl -u deploy:letmein123 https://ci.local/api", "letmein123"),
        ("high_entropy", "blob Xk9pQ2mZ7vR4tL8wN3bY6cH1jF5gD0sA2eK7uM9q end", "Xk9pQ2mZ7vR4tL8wN3bY6cH1jF5gD0sA2eK7uM9q"),
    ];

    /// (kind nearly hit, text that must stay as it is)
    const NEAR_MISSES: &[(&str, &str)] = &[
        ("private_key", "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"),
        ("private_key", "ssh-keygen writes your private key to ~/.ssh/id_ed25519"),
        ("aws_access_key", "AKIAEXAMPLE is too short"),
        ("aws_secret_key", "aws_secret_access_key is read from ~/.aws/credentials"),
        ("github_token", "ghp_short and gho_ are prefixes"),
        ("gitlab_token", "glpat-short"),
        ("slack_token", "xoxb-123 is truncated"),
        ("slack_webhook", "see https://api.slack.com/messaging/webhooks"),
        ("stripe_key", "pk_live_51HabcXyzWvuTsrQpoNml4 is publishable; sk_live_ alone"),
        ("anthropic_key", "sk-ant- keys start like that"),
        ("openai_key", "the sk- prefix; a skeleton; sk-learn-pipeline-for-text-classification"),
        ("google_api_key", "AIzaShort"),
        ("jwt", "eyJ is the start of a JSON object in base64"),
        ("npm_token", "npm_config_cache=/tmp/npm npm_lifecycle_event"),
        ("sendgrid_key", "SG.example.com"),
        ("huggingface_token", "from huggingface_hub import hf_hub_download"),
        ("url_password", "https://example.com:8080/a/b?page=2 and https://user@example.com/x"),
        ("bearer_token", "Bearer authentication: the bearer of bad news"),
        ("basic_auth", "a basic understanding of Rust; Basic Authentication"),
        ("generic_secret", "password: required; token = ${GITHUB_TOKEN}; max_tokens=1024; password=********"),
        ("generic_secret", "pass the --token flag; the token count is high"),
        ("high_entropy", "123e4567-e89b-12d3-a456-426614174000"),
        ("high_entropy", "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904"),
        ("high_entropy", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("high_entropy", "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
        ("high_entropy", "https://example.com/a/b?page=2"),
        ("high_entropy", "The quick brown fox jumps over the lazy dog while the approver reads the request carefully."),
        ("high_entropy", "aGVsbG8gd29ybGQ="),
        ("high_entropy", "getUserById2FactorAuthenticationHandlerV2"),
        ("high_entropy", "kube-prometheus-stack-grafana-7f9c8d6b5-x2k4p"),
        ("high_entropy", "sha512-9G3dx0Cr6+XC5Rqd6zx5uu1EoWF1gfiExxzV4AnlJ3f7hhmO+CEFA0TKMnMtZ6zGJKa6Q7H6k1n3WB8XwU2jbA=="),
    ];

    #[test]
    fn every_rule_has_a_positive_and_a_near_miss() {
        for s in SPECIFIC_RULES
            .iter()
            .chain(GENERIC_RULES)
            .map(|s| s.kind)
            .chain([HIGH_ENTROPY])
        {
            assert!(POSITIVES.iter().any(|p| p.0 == s), "no positive for {s}");
            assert!(NEAR_MISSES.iter().any(|p| p.0 == s), "no near miss for {s}");
        }
    }

    #[test]
    fn positives_are_masked_with_their_kind() {
        let r = Redactor::default();
        for (kind, text, secret) in POSITIVES {
            let (out, findings) = r.redact_text(text);
            assert!(!out.contains(secret), "{kind}: `{secret}` still in `{out}`");
            assert!(
                findings.iter().any(|f| f.kind == *kind),
                "{kind}: findings {findings:?} for `{text}`"
            );
            assert!(findings.iter().all(|f| f.path.is_empty()));
        }
    }

    #[test]
    fn near_misses_are_untouched() {
        let r = Redactor::default();
        for (kind, text) in NEAR_MISSES {
            let (out, findings) = r.redact_text(text);
            assert_eq!(&out, text, "near miss for {kind} changed");
            assert!(findings.is_empty(), "near miss for {kind}: {findings:?}");
        }
    }

    #[test]
    fn mask_format() {
        assert_eq!(
            mask("sk-1234567890abcdefXy9Z", "openai_key"),
            "[openai_key:sk-1…Xy9Z]"
        );
        assert_eq!(mask("0123456789abcdef", "k"), "[k:0123…cdef]");
        assert_eq!(mask("0123456789abcde", "k"), "[k:…]");
        assert_eq!(mask("", "k"), "[k:…]");
        assert_eq!(mask("ééééééééééééééééé", "k"), "[k:éééé…éééé]");
        assert_eq!(mask("0123456789abcdef", "my rule!"), "[my_rule_:0123…cdef]");
    }

    #[test]
    fn url_password_keeps_user_and_host() {
        let (out, _) = Redactor::default().redact_text("redis://app:hunter2@cache:6379/0");
        assert_eq!(out, "redis://app:[url_password:…]@cache:6379/0");
    }

    #[test]
    fn redaction_is_idempotent() {
        let r = Redactor::default();
        for (kind, text, _) in POSITIVES {
            let (once, _) = r.redact_text(text);
            let (twice, findings) = r.redact_text(&once);
            assert_eq!(once, twice, "{kind}");
            assert!(
                findings.is_empty(),
                "{kind} re-flagged: {findings:?} in `{once}`"
            );
        }
        let v = json!({
            "password": "hunter2",
            "token": "ghp_R2d2C3poLuke1Leia2Han3Solo4Chewie5Ab",
            "pin": {"api_key": 1234},
            "cmd": "export OPENAI_API_KEY=sk-proj-Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv",
            "AKIAIOSFODNN7EXAMPLE": "key in a key",
        });
        let once = r.redact_value(&v);
        assert!(!once.findings.is_empty());
        let twice = r.redact_value(&once.value);
        assert_eq!(once.value, twice.value);
        assert!(twice.findings.is_empty(), "{:?}", twice.findings);
    }

    #[test]
    fn secret_keys_at_any_depth_and_case() {
        let v = json!({
            "headers": {"Authorization": "Bearer abc", "X-Api-Key": "k", "Accept": "application/json"},
            "items": [{"name": "a", "ACCESS_TOKEN": "t1"}, {"nested": [{"Set-Cookie": "sid=1"}]}],
            "db": {"Password": {"primary": "p1", "replicas": ["p2", 3, true, null]}},
            "env": {"DB_PASSWORD": "x", "GITHUB_TOKEN": "y", "client-secret": "z", "NextToken": "page2"},
            "max_tokens": 1024,
            "author": "Ada",
            "session": {"id": 42},
            "pwd": "",
        });
        let out = Redactor::default().redact_value(&v);
        let got = &out.value;
        let hidden = json!("[secret_field:…]");
        assert_eq!(got["headers"]["Authorization"], hidden);
        assert_eq!(got["headers"]["X-Api-Key"], hidden);
        assert_eq!(got["headers"]["Accept"], "application/json");
        assert_eq!(got["items"][0]["ACCESS_TOKEN"], hidden);
        assert_eq!(got["items"][0]["name"], "a");
        assert_eq!(got["items"][1]["nested"][0]["Set-Cookie"], hidden);
        assert_eq!(got["db"]["Password"]["primary"], hidden);
        assert_eq!(
            got["db"]["Password"]["replicas"],
            json!([hidden, hidden, hidden, null])
        );
        assert_eq!(got["env"]["DB_PASSWORD"], hidden);
        assert_eq!(got["env"]["GITHUB_TOKEN"], hidden);
        assert_eq!(got["env"]["client-secret"], hidden);
        assert_eq!(got["env"]["NextToken"], "page2");
        assert_eq!(got["max_tokens"], 1024);
        assert_eq!(got["author"], "Ada");
        assert_eq!(got["session"]["id"], hidden);
        assert_eq!(got["pwd"], "");
        let paths: Vec<&str> = out.findings.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/headers/Authorization",
                "/headers/X-Api-Key",
                "/items/0/ACCESS_TOKEN",
                "/items/1/nested/0/Set-Cookie",
                "/db/Password/primary",
                "/db/Password/replicas/0",
                "/db/Password/replicas/1",
                "/db/Password/replicas/2",
                "/env/DB_PASSWORD",
                "/env/GITHUB_TOKEN",
                "/env/client-secret",
                "/session/id",
            ]
        );
        assert!(out.findings.iter().all(|f| f.kind == SECRET_FIELD));
    }

    #[test]
    fn recognised_token_under_secret_key_keeps_its_kind() {
        let v = json!({"token": "ghp_R2d2C3poLuke1Leia2Han3Solo4Chewie5Ab"});
        let out = Redactor::default().redact_value(&v);
        assert_eq!(out.value["token"], "[github_token:ghp_…e5Ab]");
        assert_eq!(
            out.findings,
            [Finding {
                kind: "github_token".into(),
                path: "/token".into(),
                via: None,
            }]
        );
    }

    #[test]
    fn name_value_pairs_and_argv_flags() {
        let v = json!({
            "headers": [{"name": "Authorization", "value": "xyz"}, {"name": "Accept", "value": "text/html"}],
            "argv": ["mysql", "--password", "hunter2", "--user", "root"],
        });
        let out = Redactor::default().redact_value(&v);
        assert_eq!(out.value["headers"][0]["value"], "[secret_field:…]");
        assert_eq!(out.value["headers"][0]["name"], "Authorization");
        assert_eq!(out.value["headers"][1]["value"], "text/html");
        assert_eq!(
            out.value["argv"],
            json!(["mysql", "--password", "[secret_field:…]", "--user", "root"])
        );
    }

    #[test]
    fn formats_inside_values_and_keys() {
        let v = json!({
            "url": "https://ci:tok3n-value@git.example.com/repo.git",
            "note": "use AKIAIOSFODNN7EXAMPLE then",
            "AKIAIOSFODNN7EXAMPLE": {"region": "eu-west-1"},
            "list": ["ok", "xoxb-1234567890-9876543210987-AbCdEfGhIjKlMnOpQrStUvWx"],
        });
        let out = Redactor::default().redact_value(&v);
        assert_eq!(
            out.value["url"],
            "https://ci:[url_password:…]@git.example.com/repo.git"
        );
        assert_eq!(out.value["note"], "use [aws_access_key:AKIA…MPLE] then");
        assert_eq!(
            out.value["[aws_access_key:AKIA…MPLE]"]["region"],
            "eu-west-1"
        );
        assert_eq!(out.value["list"][1], "[slack_token:xoxb…UvWx]");
        let got: Vec<(&str, &str)> = out
            .findings
            .iter()
            .map(|f| (f.kind.as_str(), f.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("url_password", "/url"),
                ("aws_access_key", "/note"),
                ("aws_access_key", "/[aws_access_key:AKIA…MPLE]"),
                ("slack_token", "/list/1"),
            ]
        );
        let text = serde_json::to_string(&out).unwrap_or_default();
        assert!(!text.contains("AKIAIOSFODNN7EXAMPLE"));
    }

    #[test]
    fn colliding_masked_keys_are_all_kept() {
        let v = json!({"password=aaaa1": 1, "password=bbbb2": 2});
        let out = Redactor::default().redact_value(&v);
        let map = out.value.as_object().cloned().unwrap_or_default();
        assert_eq!(map.len(), 2);
        assert!(map.contains_key("password=[generic_secret:…]"));
        assert!(map.contains_key("password=[generic_secret:…]#2"));
    }

    #[test]
    fn extra_keys_and_rules() {
        let r = Redactor::new(
            &["X-Tenant-Pin".to_owned()],
            &[
                ExtraRule {
                    name: "acme_token".into(),
                    pattern: r"\bacme_[a-z0-9]{12}\b".into(),
                },
                ExtraRule {
                    name: "acme secret".into(),
                    pattern: r"ACME\(([^)]+)\)".into(),
                },
            ],
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let out = r.redact_value(
            &json!({"x_tenant_pin": "9911", "m": "acme_0123456789ab ACME(verysecretvalue12)"}),
        );
        assert_eq!(out.value["x_tenant_pin"], "[secret_field:…]");
        assert_eq!(
            out.value["m"],
            "[acme_token:acme…89ab] ACME([acme_secret:very…ue12])"
        );
        let kinds: Vec<&str> = out.findings.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, ["secret_field", "acme_token", "acme secret"]);
        // User masks are recognised too.
        assert!(r.redact_value(&out.value).findings.is_empty());
    }

    #[test]
    fn bad_extra_rule_is_named() {
        let err = Redactor::new(
            &[],
            &[ExtraRule {
                name: "broken".into(),
                pattern: "(".into(),
            }],
        )
        .err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.starts_with("redaction rule `broken`: invalid pattern:"),
            "{msg}"
        );
    }

    #[test]
    fn many_matches_stay_fast() {
        let text = "password=abc123x ".repeat(50_000);
        let (out, findings) = Redactor::default().redact_text(&text);
        assert_eq!(findings.len(), 50_000);
        assert!(!out.contains("abc123x"));
    }

    #[test]
    fn spans_overlap() {
        let mut s = Spans::default();
        s.insert(10..20);
        s.insert(30..40);
        for (r, hit) in [
            (0..10, false),
            (0..11, true),
            (19..25, true),
            (20..30, false),
            (25..35, true),
            (40..50, false),
            (5..45, true),
        ] {
            assert_eq!(s.overlaps(&r), hit, "{r:?}");
        }
    }

    #[test]
    fn redactor_is_shareable() {
        fn assert_traits<T: Clone + std::fmt::Debug + Send + Sync>() {}
        assert_traits::<Redactor>();
    }

    /// Deterministic pseudo-random tokens (SHA-256 of a counter mapped to
    /// base62) to measure how often real random tokens are missed.
    fn pseudo_random_token(i: u32, len: usize) -> String {
        const B62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut out = String::new();
        let mut round = 0u32;
        while out.len() < len {
            let d = Sha256::digest(format!("{i}:{round}").as_bytes());
            out.extend(d.iter().map(|b| char::from(B62[usize::from(*b) % 62])));
            round += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn entropy_threshold_catches_random_tokens() {
        let word = &builtins().word;
        for len in [32usize, 40, 64] {
            let missed = (0..1000)
                .filter(|&i| !is_high_entropy(&pseudo_random_token(i, len), word))
                .count();
            eprintln!("random base62 len {len}: missed {missed}/1000");
            assert!(missed <= 20, "len {len}: {missed} missed");
        }
    }

    fn hex_of(i: u32, len: usize) -> String {
        let mut h = hex::encode(Sha256::digest(format!("corpus-{i}").as_bytes()));
        h.truncate(len);
        h
    }

    fn uuid_of(i: u32) -> String {
        let h = hex_of(i, 32);
        format!(
            "{}-{}-4{}-a{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        )
    }

    /// (family, text, secret) — fake values in publicly documented formats.
    const PLANTED: &[(&str, &str, &str)] = &[
        ("aws_access_key", "AKIAVQJXXVBOTHD0WTFL", "AKIAVQJXXVBOTHD0WTFL"),
        ("aws_access_key", "AKIAHBMUAPTT0ZN3X0PD", "AKIAHBMUAPTT0ZN3X0PD"),
        ("aws_access_key", "ASIAQXRYON8J1DYBV7ZX", "ASIAQXRYON8J1DYBV7ZX"),
        ("aws_access_key", "AKIAG02VDHLDSUN7AV8B", "AKIAG02VDHLDSUN7AV8B"),
        ("aws_access_key", "export AWS_ACCESS_KEY_ID=AKIAPPXX71C9JEQQA3QI", "AKIAPPXX71C9JEQQA3QI"),
        ("aws_secret_key", "aws_secret_access_key = lEOS47WgjKCu/0xxKhg5QjWV1mKaUyvBPs0jSO2J", "lEOS47WgjKCu/0xxKhg5QjWV1mKaUyvBPs0jSO2J"),
        ("aws_secret_key", "AWS_SECRET_ACCESS_KEY=\"kf08MMF1ulMMCw3XVy27dFanUrOSE62chn4xdeJg\"", "kf08MMF1ulMMCw3XVy27dFanUrOSE62chn4xdeJg"),
        ("aws_secret_key", "{\"SecretAccessKey\": \"1Kza5KxxGWfvmaQtKnP/VSGVBrYSuIb9OZiFZ3HL\"}", "1Kza5KxxGWfvmaQtKnP/VSGVBrYSuIb9OZiFZ3HL"),
        ("github_token", "ghp_skDI1EDL0Y6wu1JOSNta0PKhe37ak1aSJARa", "ghp_skDI1EDL0Y6wu1JOSNta0PKhe37ak1aSJARa"),
        ("github_token", "gho_7717tzNlIrTtfkbSh2Cde2wioVMEuUYMjPeF", "gho_7717tzNlIrTtfkbSh2Cde2wioVMEuUYMjPeF"),
        ("github_token", "ghu_XsRgZzCYTHY2IvGYF0eYF2ExFJgKLDL36awm", "ghu_XsRgZzCYTHY2IvGYF0eYF2ExFJgKLDL36awm"),
        ("github_token", "ghs_UDt8QvwTH6Iuj2OkDCJ23VmCwykTp4EilsS2", "ghs_UDt8QvwTH6Iuj2OkDCJ23VmCwykTp4EilsS2"),
        ("github_token", "ghr_aQnjUHc6LZQ9SMDcEVV8bOhUVXoqmaQzE4ft", "ghr_aQnjUHc6LZQ9SMDcEVV8bOhUVXoqmaQzE4ft"),
        ("github_token", "git clone https://x-access-token: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@github.com/org/repo.git", "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"),
        ("github_token", "Authorization: token ghp_CL8Sby90WIJSbUGWBOWWcuaA5zbWVb2FaCo7", "ghp_CL8Sby90WIJSbUGWBOWWcuaA5zbWVb2FaCo7"),
        ("gitlab_token", "PRIVATE-TOKEN: glpat-gOFfqRgz7IhYePP2lny2", "glpat-gOFfqRgz7IhYePP2lny2"),
        ("gitlab_token", "PRIVATE-TOKEN: glpat-pg17-dUM2jNKogorTAuR", "glpat-pg17-dUM2jNKogorTAuR"),
        ("gitlab_token", "PRIVATE-TOKEN: glpat-VpQ09oiVeZWJ9QyucS19", "glpat-VpQ09oiVeZWJ9QyucS19"),
        ("slack_token", "xoxb-32416880530-5250305178891-OuNsFqrLtCCuFVpoDCIb20W0", "xoxb-32416880530-5250305178891-OuNsFqrLtCCuFVpoDCIb20W0"),
        ("slack_token", "SLACK_TOKEN=xoxp-45224370763-57675543966-1871232428454-45d1f7c3a0579f09222a2bed27a584d2", "xoxp-45224370763-57675543966-1871232428454-45d1f7c3a0579f09222a2bed27a584d2"),
        ("slack_token", "xapp-1-ADWLJ5UQSOH-1480799201505-4f9fa423350b233931da53f50a0be52d057e0bd04ab3005440698c83998e1705", "xapp-1-ADWLJ5UQSOH-1480799201505-4f9fa423350b233931da53f50a0be52d057e0bd04ab3005440698c83998e1705"),
        ("slack_webhook", "curl -X POST https://hooks.slack.com/services/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 -d @msg.json", "TXXO68UOV/B65G0F2E6/ViflxutnrYecpJbsNaUXkFVi"),
        ("stripe_key", "sk_live_zOkvgsOM5LsE1zKLiSpYMZElLTCPPAwVv8", "sk_live_zOkvgsOM5LsE1zKLiSpYMZElLTCPPAwVv8"),
        ("stripe_key", "rk_live_HZO0vk3ZdjYYCfrpx8IH5vbljomsx29Wuj", "rk_live_HZO0vk3ZdjYYCfrpx8IH5vbljomsx29Wuj"),
        ("stripe_key", "sk_test_zU9YGP6SxWw4iUiE6LapkRgR", "sk_test_zU9YGP6SxWw4iUiE6LapkRgR"),
        ("stripe_key", "sk_live_aITgqLpaKoJceXBH42IkQFU960mNhJuAPX", "sk_live_aITgqLpaKoJceXBH42IkQFU960mNhJuAPX"),
        ("stripe_key", "STRIPE_WEBHOOK_SECRET=whsec_OEGvgUsWlY8A1myEVIR6LFYhOTduCDua", "whsec_OEGvgUsWlY8A1myEVIR6LFYhOTduCDua"),
        ("openai_key", "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", "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"),
        ("openai_key", "OPENAI_API_KEY=sk-proj-mTtfc6y-xI25MTL3xzfMg5lJYj-loHI3Yhc1OxT_8QY4_3BMDogiSTRIiP9LJm7R04ZhbGSdGWoZ6axl7KBGgMVGOYn7B3-5SApYXfE_1ds3vbgqMMvFuz4zf3ATNeY2Pseh093Fj9fOptqCWCsuZrJZaVLa", "sk-proj-mTtfc6y-xI25MTL3xzfMg5lJYj-loHI3Yhc1OxT_8QY4_3BMDogiSTRIiP9LJm7R04ZhbGSdGWoZ6axl7KBGgMVGOYn7B3-5SApYXfE_1ds3vbgqMMvFuz4zf3ATNeY2Pseh093Fj9fOptqCWCsuZrJZaVLa"),
        ("openai_key", "client = OpenAI(api_key=\"sk-svcacct-PeAU5moHH5F_grANC_aBcnwDDOOAZvw6d3eK3pxFkhJA5uFyeUhwksU8dSaNrFWv5SRclfFhhqCmzhp59yZk4d6_GlThw-ZqyC85Nn7Jf30xIOdZh-NRwhUT\")", "sk-svcacct-PeAU5moHH5F_grANC_aBcnwDDOOAZvw6d3eK3pxFkhJA5uFyeUhwksU8dSaNrFWv5SRclfFhhqCmzhp59yZk4d6_GlThw-ZqyC85Nn7Jf30xIOdZh-NRwhUT"),
        ("anthropic_key", "sk-ant-api03-v3L-Smo927U2aT1yVPMm5nYtffRcvy0Dxo5pCJFz2B30M8KVM-w8MDaD3vSS1Mmn7qOiqh1yudML66YbgqaD7XBPgUbqrAA", "sk-ant-api03-v3L-Smo927U2aT1yVPMm5nYtffRcvy0Dxo5pCJFz2B30M8KVM-w8MDaD3vSS1Mmn7qOiqh1yudML66YbgqaD7XBPgUbqrAA"),
        ("anthropic_key", "x-api-key: sk-ant-api03-2RbwXOq43IedbtWe27WH77hBlyqz_9PNldsWhXK64VtGHZA2PQLUD_W1nW4kGeJ_ky88BV8_luteLKWMFmkkBTDijysfSAA", "sk-ant-api03-2RbwXOq43IedbtWe27WH77hBlyqz_9PNldsWhXK64VtGHZA2PQLUD_W1nW4kGeJ_ky88BV8_luteLKWMFmkkBTDijysfSAA"),
        ("anthropic_key", "sk-ant-admin01-a5Jhl7LiECB7lavfWXTKTiVQ47qsxG72VnY6wGD4tylc_Y3oLOr0GlsP5S-KXv5Zzjhe3p1g1aKfux6fX1L3dd4u2dDGqAA", "sk-ant-admin01-a5Jhl7LiECB7lavfWXTKTiVQ47qsxG72VnY6wGD4tylc_Y3oLOr0GlsP5S-KXv5Zzjhe3p1g1aKfux6fX1L3dd4u2dDGqAA"),
        ("google_api_key", "https://maps.googleapis.com/maps/api/geocode/json?address=Paris&key=AIzat1NvVeIWmQmcVFzbjcoP95wL0rKA53zmg7s", "AIzat1NvVeIWmQmcVFzbjcoP95wL0rKA53zmg7s"),
        ("google_api_key", "https://maps.googleapis.com/maps/api/geocode/json?address=Paris&key=AIzarxirfu19Ac_kKd2Lq1D595WXjjOt6v3rzKE", "AIzarxirfu19Ac_kKd2Lq1D595WXjjOt6v3rzKE"),
        ("google_api_key", "https://maps.googleapis.com/maps/api/geocode/json?address=Paris&key=AIza4RNo88yLVvlwEpgnR74KLO10yZ2ChVIHNaQ", "AIza4RNo88yLVvlwEpgnR74KLO10yZ2ChVIHNaQ"),
        ("jwt", "eyJhbGciOiAiRVMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiMjE2NTg1Mzg2IiwgIm5hbWUiOiAiSmFuZSBSb2UiLCAiaWF0IjogMTUyMzgyMzA4M30.1OPehEzew0hlh8UGRcOViUrn7vkT6jhm-aClUHDkKeg", "1OPehEzew0hlh8UGRcOViUrn7vkT6jhm-aClUHDkKeg"),
        ("jwt", "eyJhbGciOiAiRVMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiNzgxNjAwMjg3IiwgIm5hbWUiOiAiSmFuZSBSb2UiLCAiaWF0IjogMTU2NDM0ODY3M30.QyNFsy6I9weHT5_CAnqchV0RLyLO_vZjFJ1RSM1IE6c", "QyNFsy6I9weHT5_CAnqchV0RLyLO_vZjFJ1RSM1IE6c"),
        ("jwt", "eyJhbGciOiAiUlMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiNTc2NjE4MTE2IiwgIm5hbWUiOiAiSmFuZSBSb2UiLCAiaWF0IjogMTU0NjQ1MTU3OX0.W1odMiEq1ak5G9W_NEnKEiStkhn25uW53SsbxqiaLaM", "W1odMiEq1ak5G9W_NEnKEiStkhn25uW53SsbxqiaLaM"),
        ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nK24pD8eg5NwFD2D0wQS82YTyr+n/dryG4cBIRlNmbh+/3UHdgBDJppkFFEZciCQP\n00U87juJUBEoAXHmGRZ2XsTS5MivpF9k9jz89iLWeajzV6xuRXLAsfmhVwlva/by\nCSEsWAGU0g47kCxhG4rS2A5e7sAuPFJiN7UZpjxV2KKrgnfHCzbt5G7+eSeiOJcT\n-----END RSA PRIVATE KEY-----", "00U87juJUBEoAXHmGRZ2XsTS5MivpF9k9jz89iLWeajzV6xuRXLAsfmhVwlva/by"),
        ("private_key", "-----BEGIN EC PRIVATE KEY-----\n/HHqodEvUF0f+UzpWcP1mLMwT3zWLA825gFKEOU0Ekm5h+Kt9sbg9bAjtbDV3J7Y\n59r5zFa1lykVg5kpYYrDYo57oJP6hq6ItLy8k/QY0vPToTry/L31PNgqWbch2QUx\nxjY+oXqUj+22nRe40JZ/bYZ+w65no5VB180ACFa0qn6dQj/QKhCHD4//UjgjfXud\n-----END EC PRIVATE KEY-----", "59r5zFa1lykVg5kpYYrDYo57oJP6hq6ItLy8k/QY0vPToTry/L31PNgqWbch2QUx"),
        ("private_key", "-----BEGIN PRIVATE KEY-----\nzTQXGqi+x8PikL2t/yiRbiMdYN2fFq6oCoS1UFyVlYONgEUsYx1ihEeGY14iiMyD\n5FN+kvkdgK7FI0b4iiLl3Ezomr0odA/v4+ffDNH0qdN7VExMzj83pcgPIrWZHt7O\nSGqx7KXM1InwJNRHaFa87XwMt1fDRDJnRdzQQWk8Hd/KFbfUwm5TQuZxLQZ35Bqe\n-----END PRIVATE KEY-----", "5FN+kvkdgK7FI0b4iiLl3Ezomr0odA/v4+ffDNH0qdN7VExMzj83pcgPIrWZHt7O"),
        ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nwvoSFxhfrEw0bVCTvmiaXcaAK9G0Wuiw6rWIj0LEiRlwYjqzertEmtWSgz3FSDw0\nwO0sOZgjON+ytr2FhhKtnELt5HlrMVh9GKeQtw3lgHUR+WUTPOsKhoiMJiDBMfcc\nQlrQBxftYSUENkHOZr2HSwcx+/oQwZirf/F4eN1NI6zuksypSMP9B2TzB+ihe/41\n-----END OPENSSH PRIVATE KEY-----", "wO0sOZgjON+ytr2FhhKtnELt5HlrMVh9GKeQtw3lgHUR+WUTPOsKhoiMJiDBMfcc"),
        ("private_key", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nleYv6eN6hO9Xc9gcB0cLdACG9I24JztksLN/CfEWAp72vSrE83heo7nE855LEAwm\n4c0hwskCM354g1vNQJ0tbpiWVL2vavMDBfCMfUoupSgLg91bUQ5u6ADVTN3lFuKk\nowLpFPPwmSVMmEExYuemQxHLdXxr6X4wH7QoY+lM4egoBy4oz6+njrxSQN5ONc8/\n-----END ENCRYPTED PRIVATE KEY-----", "4c0hwskCM354g1vNQJ0tbpiWVL2vavMDBfCMfUoupSgLg91bUQ5u6ADVTN3lFuKk"),
        ("private_key", "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n4DpdZDr3MMT9362mwmfaC2sNl8ZZh4Ul41Evtj5n9CgkIWnvvvfiC5qvbDUxdpZY\n-----END PGP PRIVATE KEY BLOCK-----", "4DpdZDr3MMT9362mwmfaC2sNl8ZZh4Ul41Evtj5n9CgkIWnvvvfiC5qvbDUxdpZY"),
        ("url_password", "postgres://svc_user:lYbB5IXxquus9jY@db.internal:5432/app", "lYbB5IXxquus9jY"),
        ("url_password", "mysql://svc_user:XqY*PYkSn!wkndOZSQ3@10.0.0.5:3306/shop", "XqY*PYkSn!wkndOZSQ3"),
        ("url_password", "redis://svc_user:Q8IjiFffhiUE9T@cache:6379/0", "Q8IjiFffhiUE9T"),
        ("url_password", "amqp://svc_user:BxufRyYFE1Dk@rabbit.local:5672/%2f", "BxufRyYFE1Dk"),
        ("url_password", "mongodb+srv://svc_user:kcebg4YPEKT90@cluster0.ab1cd.mongodb.net/prod", "kcebg4YPEKT90"),
        ("url_password", "https://svc_user:bFzu0onFC6rAZg7KD@registry.example.com/v2/", "bFzu0onFC6rAZg7KD"),
        ("bearer_token", "Authorization: Bearer DfRWN-gunnbjmwbwM4cO6wCXzecx2KE0WmD4f323", "DfRWN-gunnbjmwbwM4cO6wCXzecx2KE0WmD4f323"),
        ("bearer_token", "Authorization: Bearer .m6Cm-r~GkSTwz9cXQVh3ysmSv~c_dJaoWTMH2ZM", ".m6Cm-r~GkSTwz9cXQVh3ysmSv~c_dJaoWTMH2ZM"),
        ("basic_auth", "Authorization: Basic YWRtaW46VHIwdWI0ZG9yJjM=", "YWRtaW46VHIwdWI0ZG9yJjM="),
        ("basic_auth", "Authorization: Basic ZGVwbG95OmNvcnJlY3QtaG9yc2UtYmF0dGVyeQ==", "ZGVwbG95OmNvcnJlY3QtaG9yc2UtYmF0dGVyeQ=="),
        ("npm_token", "//registry.npmjs.org/:_authToken=npm_7gkZ5BDvY0Cm89RXHXA9aJUathZ8iltTwo1Q", "npm_7gkZ5BDvY0Cm89RXHXA9aJUathZ8iltTwo1Q"),
        ("npm_token", "//registry.npmjs.org/:_authToken=npm_IJs1N1N3w6Vfc2TNNZ0appsqtlEDDPEQGxgU", "npm_IJs1N1N3w6Vfc2TNNZ0appsqtlEDDPEQGxgU"),
        ("npm_token", "//registry.npmjs.org/:_authToken=npm_pytqnqUjp3d5rfZ1s6UblwbCn02a0a9EDXpR", "npm_pytqnqUjp3d5rfZ1s6UblwbCn02a0a9EDXpR"),
        ("sendgrid_key", "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", "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"),
        ("huggingface_token", "hf_QOD3sJRqqS9Nj2Z0Ap2Av1Qs9Wi9dezmgS", "hf_QOD3sJRqqS9Nj2Z0Ap2Av1Qs9Wi9dezmgS"),
        ("generic_secret", "DB_PASSWORD=Bzj5lFZJCIDiJJKMp0", "Bzj5lFZJCIDiJJKMp0"),
        ("generic_secret", "password: \"BJWY9Qq3hFAv0KWfnm2uL\"", "BJWY9Qq3hFAv0KWfnm2uL"),
        ("generic_secret", "mysql -u root --password v7p1g9Ml9acqK%B", "v7p1g9Ml9acqK%B"),
        ("generic_secret", "{\"client_secret\": \"8Tw7REGrhXSPB2Y3L72\"}", "8Tw7REGrhXSPB2Y3L72"),
        ("generic_secret", "redis-cli -a x --pass JwXMpD7P89FxJtvKh05b7Ok", "JwXMpD7P89FxJtvKh05b7Ok"),
        ("generic_secret", "SECRET_KEY = \"9l0bsS45JbueX\"", "9l0bsS45JbueX"),
        ("high_entropy", "the session blob is FapQHWa9P8wgLRax3WPVmMPhDd9aTqThgpWDWwOY for now", "FapQHWa9P8wgLRax3WPVmMPhDd9aTqThgpWDWwOY"),
        ("high_entropy", "the session blob is NRopI5CIloFpb5US794K9TkMw6IcWxzjdbp6GP4S for now", "NRopI5CIloFpb5US794K9TkMw6IcWxzjdbp6GP4S"),
        ("high_entropy", "the session blob is NrS5h1com96V9ui9oi3j4OTFHj5w5nw8jvGUJLXb for now", "NrS5h1com96V9ui9oi3j4OTFHj5w5nw8jvGUJLXb"),
        ("high_entropy", "the session blob is I6ywvLUEoiaUsyJIAletgPGQPoK394ReUPieUm6F for now", "I6ywvLUEoiaUsyJIAletgPGQPoK394ReUPieUm6F"),
        ("high_entropy", "xwR9d9IOvGLi+WxD/HGa4kxw5G7kb6Z8GPs+bM2bkGwZ", "xwR9d9IOvGLi+WxD/HGa4kxw5G7kb6Z8GPs+bM2bkGwZ"),
        ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("aws_secret_key", "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("jwt", "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c", "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
        ("stripe_key", "curl https://api.stripe.com/v1/charges -u sk_test_4eC39HqLyjWDarjtT1zdp7dc:", "4eC39HqLyjWDarjtT1zdp7dc"),
        ("slack_webhook", "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "XXXXXXXXXXXXXXXXXXXXXXXX"),
    ];

    /// Hand-written innocent strings; hashes and ids are added in the test.
    const INNOCENT: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/local/lib/python3.11/site-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so",
        "/home/alice/projects/keyturn/src/domain/redact.rs",
        "/var/log/nginx/access.log.2024-06-01.gz",
        "C:\\Program Files\\Microsoft Visual Studio\\2022\\Community\\VC\\Tools\\MSVC\\14.38.33130\\bin\\Hostx64\\x64\\cl.exe",
        "~/.config/keyturn/config.toml",
        "./node_modules/@typescript-eslint/eslint-plugin/dist/rules/no-unused-vars.js",
        "/opt/homebrew/Cellar/openssl@3/3.3.1/lib/libcrypto.3.dylib",
        "src/main/java/com/example/inventory/service/InventoryReconciliationService.java",
        "target/debug/build/ring-4f3c2b1a9d8e7f60/out/libring_core_0_17_8_.a",
        "/etc/systemd/system/multi-user.target.wants/keyturn.service",
        "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
        "/private/var/folders/7x/k2m9q3fd4c7_0b2hv1n8p0ww0000gn/T/tmp.XyZ123",
        ".github/workflows/release-please-config.yml",
        "/mnt/data/datasets/imagenet/train/n01440764/n01440764_10026.JPEG",
        "https://example.com/a/b?page=2",
        "https://docs.rs/serde_json/latest/serde_json/enum.Value.html",
        "https://github.com/rust-lang/rust/blob/4f3c2b1a9d8e7f60aa11bb22cc33dd44ee55ff66/library/std/src/lib.rs#L120",
        "https://crates.io/crates/regex/1.10.4",
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=42s",
        "https://en.wikipedia.org/wiki/Shannon_(unit)",
        "https://api.github.com/repos/octocat/hello-world/pulls?state=open&per_page=100",
        "https://registry.npmjs.org/@types%2fnode/-/node-20.11.30.tgz",
        "https://storage.googleapis.com/bucket-name/reports/2024/q2/summary.pdf",
        "https://s3.eu-west-1.amazonaws.com/my-bucket/backups/db-2024-06-01T03-00-00Z.sql.gz",
        "http://localhost:8080/healthz",
        "http://127.0.0.1:9090/metrics",
        "https://user@example.com/private/repo.git",
        "ssh://git@github.com:22/org/repo.git",
        "git@gitlab.com:group/subgroup/project.git",
        "https://example.com/search?q=how+to+rotate+api+credentials+safely+in+production",
        "https://mail.google.com/mail/u/0/#inbox/FMfcgzGxSRbVzTQXLKlNdXpWqbjLzHrS",
        "ftp://ftp.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.gz",
        "wss://stream.example.org/v1/events?channel=deployments",
        "https://pypi.org/project/requests/2.32.3/",
        "https://hub.docker.com/_/postgres/tags?page=1&name=16-alpine",
        "https://learn.microsoft.com/en-us/azure/key-vault/general/overview",
        "https://stackoverflow.com/questions/11227809/why-is-processing-a-sorted-array-faster-than-processing-an-unsorted-array",
        "https://www.rfc-editor.org/rfc/rfc7519#section-4.1",
        "The deploy script copies the build artefacts to the staging host and restarts the service.",
        "Please approve: I need to delete the temporary files created by the failed test run yesterday.",
        "This change renames the configuration key and keeps the old name as an alias for one release.",
        "Running the database migration will lock the orders table for about two minutes.",
        "I am going to list the files in the repository root to find the build configuration.",
        "The user asked me to summarise the last five pull requests and post the summary in the channel.",
        "We rotate credentials every ninety days; the next rotation is scheduled for Monday.",
        "To reproduce, run the test suite twice with a cold cache and compare the timings.",
        "The token bucket refills at ten requests per second, so bursts above that are delayed.",
        "Password requirements: at least twelve characters, one digit and one symbol.",
        "Remember to set the secret in the vault, not in the repository.",
        "Authentication uses OAuth 2.0 with the authorization code flow and PKCE.",
        "Le script de déploiement copie les fichiers sur le serveur de préproduction.",
        "Die Datenbankmigration sperrt die Tabelle für etwa zwei Minuten.",
        "El comando elimina los archivos temporales creados por la prueba fallida.",
        "这个命令会删除测试失败后留下的临时文件。",
        "テストの失敗で作成された一時ファイルを削除します。",
        "Этот скрипт копирует артефакты сборки на тестовый сервер.",
        "Supercalifragilisticexpialidocious is a long word, but antidisestablishmentarianism is longer.",
        "In 2023 the team migrated 1,204 services from Python 3.8 to Python 3.11 without downtime.",
        "Error: connection refused (os error 111) while connecting to db.internal:5432",
        "WARN  [2024-06-01T12:00:03.123Z] retrying request 3/5 after 250ms backoff",
        "INFO keyturn::app::submit: request accepted request.id=7f3e2a10 tool=delete_file",
        "thread 'main' panicked at src/main.rs:42:5: called `Option::unwrap()` on a `None` value",
        "E0308: mismatched types: expected `&str`, found `String`",
        "npm ERR! code ERESOLVE npm ERR! ERESOLVE unable to resolve dependency tree",
        "Traceback (most recent call last): File \"app.py\", line 12, in <module>",
        "HTTP/1.1 404 Not Found",
        "{\"name\": \"keyturn\", \"version\": \"0.1.0\", \"private\": true}",
        "{\"log_level\": \"info\", \"max_connections\": 64, \"timeout_ms\": 30000}",
        "[server]\nlisten = \"127.0.0.1:7070\"\nworkers = 4",
        "{\"max_tokens\": 1024, \"temperature\": 0.2, \"model\": \"claude-3-5-sonnet-20241022\"}",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-frontend",
        "{\"page_token\": null, \"page_size\": 50, \"order_by\": \"created_at desc\"}",
        "retries=3;timeout=30s;backoff=exponential",
        "FROM rust:1.79-slim-bookworm AS builder",
        "{\"password_min_length\": 12, \"password_require_digit\": true}",
        "[dependencies]\nserde = { version = \"1\", features = [\"derive\"] }",
        "resource \"aws_s3_bucket\" \"logs\" { bucket = \"acme-prod-logs-eu-west-1\" }",
        "{\"secretName\": \"tls-cert\", \"mountPath\": \"/etc/tls\"}",
        "env:\n  - name: RUST_LOG\n    value: keyturn=debug",
        "{\"tokenizer\": \"cl100k_base\", \"token_count\": 4096}",
        "1.2.3",
        "v2.14.0-rc.1",
        "0.1.0-alpha.3+build.20240601",
        "rustc 1.79.0 (129f3b996 2024-06-10)",
        "Python 3.11.9",
        "node v20.14.0",
        "openssl 3.0.13 30 Jan 2024",
        "go1.22.4 linux/amd64",
        "Linux 6.8.0-35-generic #35-Ubuntu SMP PREEMPT_DYNAMIC x86_64 GNU/Linux",
        "postgres:16.3-alpine3.20",
        "ghcr.io/acme/keyturn:0.4.2",
        "registry.k8s.io/ingress-nginx/controller:v1.10.1",
        "kube-prometheus-stack-grafana-7f9c8d6b5-x2k4p",
        "web-frontend-deployment-6d4cf56db6-kx9zq",
        "my-awesome-project-2024-backup-final-v2",
        "ls -la /var/www/html",
        "git log --oneline -n 20 --author=alice",
        "cargo build --release --target x86_64-unknown-linux-musl",
        "docker run --rm -p 8080:80 -v $(pwd)/site:/usr/share/nginx/html nginx:1.27",
        "kubectl get pods -n monitoring -l app.kubernetes.io/name=grafana",
        "find . -name '*.rs' -not -path './target/*' | xargs wc -l",
        "rm -rf ./build ./dist ./.cache",
        "psql -h db.internal -U readonly -d analytics -c 'select count(*) from events'",
        "curl -sS https://api.example.com/v1/status | jq .",
        "tar -czf backup-2024-06-01.tar.gz /srv/app/data",
        "python -m pytest tests/ -k \"not slow\" --maxfail=1",
        "ssh -i ~/.ssh/id_ed25519 deploy@bastion.example.com",
        "export PATH=\"$HOME/.cargo/bin:$PATH\"",
        "aws s3 cp s3://acme-artifacts/releases/v1.4.0/app.zip ./app.zip --region eu-west-1",
        "gh pr create --title \"Fix flaky test\" --body \"Retries the network call\"",
        "mysql -u root -p shop_db < schema.sql",
        "echo $GITHUB_TOKEN | docker login ghcr.io -u octocat --password-stdin",
        "openssl req -new -newkey rsa:4096 -nodes -keyout server.key -out server.csr",
        "git commit -m \"Bump regex from 1.10.3 to 1.10.4\"",
        "getUserById2FactorAuthenticationHandlerV2",
        "AbstractSingletonProxyFactoryBeanDefinitionRegistry",
        "TEST_CASE_2_SHOULD_PASS_WITH_Valid_Input_And_Defaults",
        "ThisIsAVeryLongCamelCaseIdentifierName123",
        "handle_incoming_approval_request_with_timeout_v2",
        "XMLHttpRequestEventTargetPrototypeAccessor2",
        "com.example.inventory.reconciliation.InventoryReconciliationServiceImpl",
        "org.springframework.boot.autoconfigure.jdbc.DataSourceAutoConfiguration",
        "MicrosoftWindowsKernelPowerEventId41CriticalFailure",
        "python3.11-venv-setuptools-wheel-pip2024",
        "ubuntu-22.04.4-live-server-amd64.iso",
        "Microsoft-Windows-Kernel-Power-Event41",
        "sha512-9G3dx0Cr6+XC5Rqd6zx5uu1EoWF1gfiExxzV4AnlJ3f7hhmO+CEFA0TKMnMtZ6zGJKa6Q7H6k1n3WB8XwU2jbA==",
        "sha384-oqVuAfXRKap7fdgcCY5uykM6+R9GqQ8K/uxy9rx7HNQlGYl1kPzQho1wx4JwY8wC",
        "integrity=\"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\"",
        "aGVsbG8=",
        "d29ybGQ=",
        "Zm9vYmFy",
        "YWRtaW4=",
        "dGVzdA==",
        "SGVsbG8sIFdvcmxkIQ==",
        "the sk- prefix marks secret keys in some APIs",
        "a skeleton crew kept the service running over the weekend",
        "sk-learn-pipeline-for-text-classification",
        "Bearer authentication is described in RFC 6750",
        "a basic understanding of Rust is enough for this task",
        "token: see the vault",
        "password: required",
        "token = ${GITHUB_TOKEN}",
        "DB_PASSWORD=$DB_PASSWORD_FROM_VAULT",
        "api_key: <your-api-key>",
        "password = os.environ[\"DB_PASSWORD\"]",
        "client_secret: process.env.CLIENT_SECRET",
        "-----BEGIN CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop",
        "AKIAEXAMPLE",
        "ghp_ is the prefix of GitHub personal access tokens",
        "xoxb- tokens are Slack bot tokens",
        "eyJ is how a base64 JSON object starts",
        "2024-06-01T12:34:56.789+02:00",
        "Mon, 03 Jun 2024 09:15:00 GMT",
        "1717236000000",
        "+33 1 23 45 67 89",
        "FR76 3000 6000 0112 3456 7890 189",
        "192.168.1.254",
        "fe80::1ff:fe23:4567:890a",
        "00:1A:2B:3C:4D:5E",
        "en_US.UTF-8",
        "America/Los_Angeles",
        "#ff8800",
        "rgba(255, 136, 0, 0.5)",
        "SELECT id, email FROM users WHERE created_at > now() - interval '7 days' ORDER BY id LIMIT 100;",
        "fn main() { println!(\"Hello, world!\"); }",
        "const MAX_RETRIES: u32 = 5;",
        "for i in range(10): print(i * i)",
        "<div class=\"card card--highlighted\">Approve?</div>",
        "Ignore the lint warning on line 12; it is a false positive.",
        "The quick brown fox jumps over the lazy dog while the approver reads the request carefully before clicking.",
    ];

    #[test]
    fn corpus() {
        let r = Redactor::default();
        let mut by_family: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for (family, text, secret) in PLANTED {
            let (out, findings) = r.redact_text(text);
            let e = by_family.entry(family).or_default();
            e.0 += 1;
            let masked = !out.contains(secret) && !findings.is_empty();
            if masked {
                e.1 += 1;
            }
            for f in findings {
                *by_kind.entry(f.kind).or_default() += 1;
            }
            assert!(masked, "{family}: `{secret}` not masked in `{out}`");
            let (again, refound) = r.redact_text(&out);
            assert_eq!(again, out);
            assert!(refound.is_empty(), "{family}: re-flagged `{out}`");
        }
        let mut innocent: Vec<String> = INNOCENT.iter().map(|s| (*s).to_owned()).collect();
        for i in 0..25 {
            innocent.push(uuid_of(i));
            innocent.push(format!("git checkout {}", hex_of(i + 100, 40)));
            innocent.push(format!("sha256:{}", hex_of(i + 200, 64)));
            innocent.push(format!("{}  dist/app-{i}.tar.gz", hex_of(i + 300, 32)));
        }
        let mut false_positives = Vec::new();
        for s in &innocent {
            let (_, findings) = r.redact_text(s);
            if !findings.is_empty() {
                false_positives.push((s.as_str(), findings));
            }
        }
        let rate = false_positives.len() as f64 / innocent.len() as f64;
        eprintln!("planted: {} strings", PLANTED.len());
        for (family, (n, ok)) in &by_family {
            eprintln!("  family {family}: {ok}/{n} masked");
        }
        for (kind, n) in &by_kind {
            eprintln!("  finding kind {kind}: {n}");
        }
        eprintln!(
            "innocent: {} strings, {} false positives ({:.2}%)",
            innocent.len(),
            false_positives.len(),
            rate * 100.0
        );
        for (s, f) in &false_positives {
            eprintln!("  FP {s:?}: {f:?}");
        }
        assert!(PLANTED.len() >= 60 && innocent.len() >= 200);
        assert!(rate < 0.01, "false-positive rate {rate}");
    }

    /// One line of a JSON Lines fixture.
    fn jsonl(text: &str) -> Vec<serde_json::Value> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
            .collect()
    }

    /// The public corpus (tests/fixtures/content_guard, sources in
    /// docs/content-guard.md): every gitleaks provider, command-line
    /// passwords, encoded secrets; innocent paths, code and translated
    /// messages. Prints the figures written in the docs.
    #[test]
    fn corpus_public() {
        let r = Redactor::default();
        let secrets = jsonl(include_str!(
            "../../tests/fixtures/content_guard/secrets.jsonl"
        ));
        let mut by_rule: BTreeMap<String, (usize, usize, Vec<String>)> = BTreeMap::new();
        let mut encoded_flagged = 0;
        let mut encoded_total = 0;
        for row in &secrets {
            let rule = row["rule"].as_str().unwrap_or("?").to_owned();
            let text = row["text"].as_str().unwrap_or("");
            let secret = row["secret"].as_str().unwrap_or("");
            let (out, findings) = r.redact_text(text);
            let masked = !out.contains(secret) && !findings.is_empty();
            let e = by_rule.entry(rule.clone()).or_default();
            e.0 += 1;
            if masked {
                e.1 += 1;
            } else {
                eprintln!("  MISSED {rule}: {text:?} -> {out:?}");
            }
            for f in &findings {
                if !e.2.contains(&f.kind) {
                    e.2.push(f.kind.clone());
                }
            }
            if rule.starts_with("encoded:") {
                encoded_total += 1;
                if findings.iter().any(|f| f.kind == ENCODED_SECRET) {
                    encoded_flagged += 1;
                }
            }
            let (again, refound) = r.redact_text(&out);
            assert_eq!(again, out, "{rule}: not idempotent");
            assert!(refound.is_empty(), "{rule}: re-flagged `{out}`");
        }
        let providers = by_rule
            .keys()
            .filter(|k| !k.starts_with("encoded:") && *k != "command-line-password")
            .count();
        let (n, ok) = by_rule
            .values()
            .fold((0, 0), |(n, ok), (a, b, _)| (n + a, ok + b));
        eprintln!("secrets: {n} strings from {providers} gitleaks rules + command lines + encodings, {ok} masked");
        for (rule, (a, b, kinds)) in &by_rule {
            eprintln!("  rule {rule}: {b}/{a} masked as {}", kinds.join(","));
        }
        eprintln!("encoded: {encoded_flagged}/{encoded_total} flagged {ENCODED_SECRET}");

        let innocent = jsonl(include_str!(
            "../../tests/fixtures/content_guard/innocent.jsonl"
        ));
        let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut fps = 0;
        for row in &innocent {
            let text = row["text"].as_str().unwrap_or("");
            let source = format!(
                "{} {}",
                row["source"].as_str().unwrap_or("?"),
                row["lang"].as_str().unwrap_or("-")
            );
            let (_, findings) = r.redact_text(text);
            let e = by_source.entry(source).or_default();
            e.0 += 1;
            if !findings.is_empty() {
                e.1 += 1;
                fps += 1;
                eprintln!("  FP {text:?}: {findings:?}");
            }
        }
        let rate = fps as f64 / innocent.len() as f64;
        eprintln!(
            "innocent: {} strings, {fps} wrongly masked ({:.2} %)",
            innocent.len(),
            rate * 100.0
        );
        for (source, (a, b)) in &by_source {
            eprintln!("  source {source}: {b}/{a}");
        }
        assert!(providers >= 200, "{providers} gitleaks rules in the corpus");
        assert_eq!(ok, n, "every planted secret is masked");
        assert_eq!(encoded_flagged, encoded_total);
        assert!(rate < 0.005, "innocent strings wrongly masked: {rate}");
    }

    /// Each form masks the password and only the password; look-alikes that
    /// carry none stay as they are.
    #[test]
    fn command_line_passwords() {
        let r = Redactor::default();
        for (text, secret) in [
            ("mysql -u root -p'hunter2secret' shop", "hunter2secret"),
            ("mysql -uroot -phunter2secret shop", "hunter2secret"),
            ("sshpass -p Sup3rS3cret ssh host", "Sup3rS3cret"),
            ("tool --password=hunter2secret", "hunter2secret"),
            ("tool --password hunter2secret", "hunter2secret"),
            ("tool --db-password 'two words'", "two words"),
            ("PGPASSWORD=hunter2secret psql", "hunter2secret"),
            ("MYSQL_PWD=hunter2secret mysql", "hunter2secret"),
            ("curl -u admin:hunter2secret https://x", "hunter2secret"),
            ("curl --user=admin:hunter2secret https://x", "hunter2secret"),
            ("redis-cli -a hunter2secret ping", "hunter2secret"),
            (
                "docker login -u me -p hunter2secret r.example",
                "hunter2secret",
            ),
            ("echo 'hunter2secret' | sudo -S true", "hunter2secret"),
        ] {
            let (out, findings) = r.redact_text(text);
            assert!(!out.contains(secret), "{text} -> {out}");
            assert!(!findings.is_empty(), "{text}");
        }
        for text in [
            "mysql -u root -p shop_db < schema.sql",
            "mysql -h db -P 3306 -u app -p",
            "docker run -u 1000:1000 alpine id",
            "echo $GITHUB_TOKEN | docker login ghcr.io -u octocat --password-stdin",
            "ssh-keygen -t ed25519 -N '' -f key",
            "PGPASSWORD=$DB_PASSWORD psql -h db",
        ] {
            let (out, findings) = r.redact_text(text);
            assert_eq!(out, text);
            assert!(findings.is_empty(), "{text}: {findings:?}");
        }
    }

    /// A secret in an encoding is masked whole and reported with how it was
    /// hidden; text that merely decodes (words, digests) is not.
    #[test]
    fn encoded_secrets_are_found_and_masked() {
        let r = Redactor::default();
        let tok = "ghp_R2d2C3poLuke1Leia2Han3Solo4Chewie5Ab";
        let hex = hex::encode(tok);
        let (out, f) = r.redact_text(&format!("blob {hex} end"));
        assert_eq!(out, "blob [encoded_secret:…] end");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, ENCODED_SECRET);
        assert_eq!(f[0].via.as_deref(), Some("github_token as hex"));
        for innocent in [
            "aGVsbG8gd29ybGQ=",
            "SGVsbG8sIFdvcmxkIQ==",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "https://registry.npmjs.org/@types%2fnode/-/node-20.11.30.tgz",
            "&lt;div&gt;&amp;nbsp;&lt;/div&gt;",
            "ｈｅｌｌｏ ｗｏｒｌｄ ｆｕｌｌｗｉｄｔｈ",
            "a b c d e f g h i j k l m n o p",
        ] {
            let (o, f) = r.redact_text(innocent);
            assert_eq!(o, innocent);
            assert!(f.is_empty(), "{innocent}: {f:?}");
        }
    }
}
