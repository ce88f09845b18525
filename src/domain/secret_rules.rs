//! The provider table of the secret masker: one entry per token format of a
//! public service (the providers of the gitleaks default rule set, written
//! here as our own Rust regexes) and the command-line password forms
//! (`mysql -p'…'`, `sshpass -p …`, `--password=…`, `PGPASSWORD=…`). Pure
//! data: `redact.rs` compiles it and runs it behind a keyword prefilter.
//!
//! Three shapes keep the table short and the regexes uniform:
//! - [`token`]: a self-identifying token (`shpat_…`, `dop_v1_…`), matched
//!   anywhere between token boundaries. The body must not run on into more
//!   token characters, so a fixed-length body never masks half a word.
//! - [`keyed`]: a value with no prefix of its own, recognised only when a
//!   provider name sits in the key before it (`ADAFRUIT_KEY = "…"`,
//!   `"datadog_api_key": "…"`). The value must hold a digit and six distinct
//!   characters, and is hidden whole (no preview), because a prefix-less
//!   value has nothing public about it.
//! - [`raw`]: a full pattern whose capture groups hold the secret (command
//!   lines, YAML, XML), for the few formats that fit neither shape.
//!
//! Every entry lists lowercase keywords; a string is only run through an
//! entry's regex when one keyword occurs in it (ASCII case-insensitive), the
//! same trick gitleaks uses, so 200 rules cost about as much as ten.
//! The `rust` regex crate has no lookaround: boundaries are written as
//! character classes and, where a value may be quoted three ways, as several
//! alternative capture groups (the first that took part is the secret).

/// Which capture group holds the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// This group number (0: the whole match).
    Nth(usize),
    /// The first group, from 1 up, that took part in the match.
    FirstSet,
}

/// How an entry's regex is built.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    /// Body of a self-identifying token.
    Token(&'static str),
    /// Provider names (regex alternation) in the key, and the value's body.
    Keyed {
        names: &'static str,
        body: &'static str,
    },
    /// A complete pattern and the group holding the secret.
    Raw { pattern: &'static str, group: Group },
}

/// One provider format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Provider {
    /// Kind reported in findings and shown in the mask.
    pub(crate) kind: &'static str,
    /// Lowercase literals, one of which occurs in any match.
    pub(crate) keywords: &'static [&'static str],
    pub(crate) shape: Shape,
    /// Hide the whole secret instead of keeping a first/last-4 preview.
    pub(crate) hide: bool,
}

const fn token(
    kind: &'static str,
    keywords: &'static [&'static str],
    body: &'static str,
) -> Provider {
    Provider {
        kind,
        keywords,
        shape: Shape::Token(body),
        hide: false,
    }
}

const fn keyed(
    kind: &'static str,
    keywords: &'static [&'static str],
    names: &'static str,
    body: &'static str,
) -> Provider {
    Provider {
        kind,
        keywords,
        shape: Shape::Keyed { names, body },
        hide: true,
    }
}

const fn raw(
    kind: &'static str,
    keywords: &'static [&'static str],
    pattern: &'static str,
    group: Group,
) -> Provider {
    Provider {
        kind,
        keywords,
        shape: Shape::Raw { pattern, group },
        hide: true,
    }
}

/// A token starts after a character that cannot be part of it.
const TOKEN_START: &str = r"(?:^|[^A-Za-z0-9_\-])";
/// …and ends before one.
const TOKEN_END: &str = r"(?:[^A-Za-z0-9_\-]|$)";
/// Between a provider name and its value: the rest of the key, optional
/// quotes, an assignment operator, optional quotes.
const KEYED_MIDDLE: &str =
    r#"[A-Za-z0-9_.\-]{0,20}[ \t'"]{0,3}(?:=|>|:{1,3}=|\|\||:|=>|\?=|,)[ \t'"\x60=]{0,5}"#;
/// After a keyed value: a quote, space, separator, escaped newline or the end.
const KEYED_END: &str = r#"(?:[\x60'"\s;,&)}\]]|\\[nr]|$)"#;

impl Provider {
    /// The regex source and the group holding the secret.
    pub(crate) fn pattern(&self) -> (String, Group) {
        match self.shape {
            Shape::Token(body) => (format!("{TOKEN_START}({body}){TOKEN_END}"), Group::Nth(1)),
            Shape::Keyed { names, body } => (
                format!("(?i)(?:{names}){KEYED_MIDDLE}({body}){KEYED_END}"),
                Group::Nth(1),
            ),
            Shape::Raw { pattern, group } => (pattern.to_owned(), group),
        }
    }

    /// Keyed values must look like values, not prose or placeholders.
    pub(crate) fn is_keyed(&self) -> bool {
        matches!(self.shape, Shape::Keyed { .. })
    }
}

/// A value under a provider's key: a digit, six distinct characters.
pub(crate) fn keyed_value_ok(s: &str) -> bool {
    let mut seen: Vec<char> = Vec::new();
    for c in s.chars() {
        if !seen.contains(&c) {
            seen.push(c);
        }
    }
    s.chars().any(|c| c.is_ascii_digit()) && seen.len() >= 6
}

const UUID: &str = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";

/// Provider formats, after the hand-tuned formats of `redact.rs` (which
/// already cover AWS, GitHub, most of GitLab and Slack, Stripe, OpenAI,
/// Anthropic, Google, JWTs, npm, SendGrid, Hugging Face and private keys).
#[rustfmt::skip]
pub(crate) const PROVIDERS: &[Provider] = &[
    token("onepassword_secret_key", &["a3-"], r"A3-[A-Z0-9]{6}-(?:[A-Z0-9]{11}|[A-Z0-9]{6}-[A-Z0-9]{5})-[A-Z0-9]{5}-[A-Z0-9]{5}-[A-Z0-9]{5}"),
    token("onepassword_service_token", &["ops_"], r"ops_eyJ[A-Za-z0-9+/]{250,}={0,3}"),
    keyed("adafruit_key", &["adafruit"], "adafruit", r"[a-z0-9_\-]{32}"),
    keyed("adobe_client_id", &["adobe"], "adobe", r"[a-f0-9]{32}"),
    token("adobe_client_secret", &["p8e-"], r"p8e-[A-Za-z0-9]{32}"),
    token("age_secret_key", &["age-secret-key-1"], r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"),
    keyed("airtable_key", &["airtable"], "airtable", r"[a-z0-9]{17}"),
    token("airtable_pat", &["pat"], r"pat[A-Za-z0-9]{14}\.[a-f0-9]{64}"),
    keyed("algolia_key", &["algolia"], "algolia", r"[a-z0-9]{32}"),
    token("alibaba_access_key", &["ltai"], r"LTAI[A-Za-z0-9]{20}"),
    keyed("alibaba_secret_key", &["alibaba"], "alibaba", r"[a-z0-9]{30}"),
    token("artifactory_key", &["akcp"], r"AKCp[A-Za-z0-9]{69}"),
    token("artifactory_reference_token", &["cmvmd"], r"cmVmd[A-Za-z0-9]{59}"),
    keyed("asana_client_id", &["asana"], "asana", r"[0-9]{16}"),
    keyed("asana_client_secret", &["asana"], "asana", r"[a-z0-9]{32}"),
    keyed("atlassian_token", &["atlassian", "confluence", "jira"], "atlassian|confluence|jira", r"[a-z0-9]{20}[a-f0-9]{4}"),
    token("atlassian_token", &["atatt3"], r"ATATT3[A-Za-z0-9_\-=]{186}"),
    token("authress_key", &["sc_", "ext_", "scauth_", "authress_"], r"(?:sc|ext|scauth|authress)_[A-Za-z0-9]{5,30}\.[A-Za-z0-9]{4,6}\.acc[_\-][A-Za-z0-9\-]{10,32}\.[A-Za-z0-9+/_=\-]{30,120}"),
    token("aws_bedrock_key", &["absk"], r"ABSK[A-Za-z0-9+/]{109,269}={0,2}"),
    token("aws_bedrock_key", &["bedrock-api-key-"], r"bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29t[A-Za-z0-9+/=%]*"),
    raw("azure_client_secret", &["q~"], r#"(?:^|[\\'"\x60\s>=:(,)])([a-zA-Z0-9_~.]{3}\dQ~[a-zA-Z0-9_~.\-]{31,34})(?:$|[\\'"\x60\s<),])"#, Group::Nth(1)),
    keyed("beamer_token", &["beamer"], "beamer", r"b_[a-z0-9=_\-]{44}"),
    keyed("bitbucket_client_id", &["bitbucket"], "bitbucket", r"[a-z0-9]{32}"),
    keyed("bitbucket_client_secret", &["bitbucket"], "bitbucket", r"[a-z0-9=_\-]{64}"),
    keyed("bittrex_key", &["bittrex"], "bittrex", r"[a-z0-9]{32}"),
    keyed("cisco_meraki_key", &["meraki"], "meraki", r"[0-9a-f]{40}"),
    token("clickhouse_secret", &["4b1d"], r"4b1d[A-Za-z0-9]{38}"),
    token("clojars_token", &["clojars_"], r"(?i:CLOJARS_)[A-Za-z0-9]{60}"),
    keyed("cloudflare_key", &["cloudflare"], "cloudflare", r"[a-z0-9_\-]{40}|[a-f0-9]{37}"),
    token("cloudflare_origin_ca_key", &["v1.0-"], r"v1\.0-[a-f0-9]{24}-[a-f0-9]{146}"),
    keyed("codecov_token", &["codecov"], "codecov", r"[a-z0-9]{32}"),
    keyed("cohere_key", &["cohere", "co_api_key"], "cohere|co_api_key", r"[a-z0-9]{40}"),
    keyed("coinbase_token", &["coinbase"], "coinbase", r"[a-z0-9_\-]{64}"),
    keyed("confluent_key", &["confluent"], "confluent", r"[a-z0-9]{64}|[a-z0-9]{16}"),
    keyed("contentful_token", &["contentful"], "contentful", r"[a-z0-9=_\-]{43}"),
    token("databricks_token", &["dapi"], r"dapi[a-f0-9]{32}(?:-[0-9])?"),
    keyed("datadog_token", &["datadog"], "datadog", r"[a-z0-9]{40}"),
    keyed("defined_networking_token", &["dnkey"], "dnkey", r"dnkey-[a-z0-9=_\-]{26}-[a-z0-9=_\-]{52}"),
    token("digitalocean_token", &["doo_v1_", "dop_v1_", "dor_v1_"], r"do[opr]_v1_[a-f0-9]{64}"),
    keyed("discord_token", &["discord"], "discord", r"[a-f0-9]{64}|[0-9]{18}|[a-z0-9=_\-]{32}"),
    token("doppler_token", &["dp.pt."], r"dp\.pt\.[A-Za-z0-9]{43}"),
    keyed("droneci_token", &["droneci"], "droneci", r"[a-z0-9]{32}"),
    keyed("dropbox_token", &["dropbox"], "dropbox", r"sl\.[a-z0-9\-=_]{135}|[a-z0-9]{11}AAAAAAAAAA[a-z0-9\-_=]{43}|[a-z0-9]{15}"),
    token("duffel_token", &["duffel_"], r"duffel_(?:test|live)_[A-Za-z0-9_\-=]{43}"),
    token("dynatrace_token", &["dt0c01."], r"dt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64}"),
    token("easypost_token", &["ezak", "eztk"], r"EZ[AT]K[A-Za-z0-9]{54}"),
    token("jwt", &["ey"], r"ey[A-Za-z0-9]{17,}\.ey[A-Za-z0-9/\\_\-]{17,}\.(?:[A-Za-z0-9/\\_\-]{10,}={0,2})?"),
    keyed("etsy_token", &["etsy"], "etsy", r"[a-z0-9]{24}"),
    raw("facebook_token", &["|", "%7c"], r"(?i)(?:^|[^0-9])([0-9]{15,16}(?:\||%7c)[0-9a-z\-_]{27,40})(?:[^0-9a-z\-_]|$)", Group::Nth(1)),
    token("facebook_token", &["eaam", "eaac"], r"EAA[MC][A-Za-z0-9]{100,}"),
    keyed("facebook_secret", &["facebook"], "facebook", r"[a-f0-9]{32}"),
    keyed("fastly_token", &["fastly"], "fastly", r"[a-z0-9=_\-]{32}"),
    keyed("finicity_token", &["finicity"], "finicity", r"[a-f0-9]{32}|[a-z0-9]{20}"),
    keyed("finnhub_token", &["finnhub"], "finnhub", r"[a-z0-9]{20}"),
    keyed("flickr_token", &["flickr"], "flickr", r"[a-z0-9]{32}"),
    token("flutterwave_key", &["flwseck_test", "flwpubk_test"], r"FLW(?:SECK|PUBK)_TEST-[a-hA-H0-9]{32}-X|FLWSECK_TEST-[a-hA-H0-9]{12}"),
    token("flyio_token", &["fo1_", "fm1", "fm2_"], r"fo1_[A-Za-z0-9_\-]{43}|fm1[ar]_[A-Za-z0-9+/]{100,}={0,3}|fm2_[A-Za-z0-9+/]{100,}={0,3}"),
    token("frameio_token", &["fio-u-"], r"fio-u-[A-Za-z0-9\-_=]{64}"),
    raw("freemius_secret_key", &["secret_key"], r#"(?i)["']secret_key["']\s*=>\s*["'](sk_[^\s"']{29})["']"#, Group::Nth(1)),
    keyed("freshbooks_token", &["freshbooks"], "freshbooks", r"[a-z0-9]{64}"),
    token("gitlab_token", &["glffct-", "glft-", "glimt-", "glagent-", "gloas-"], r"gl(?:ffct|ft|imt|agent|oas)-[0-9A-Za-z_\-]{20,64}"),
    token("gitlab_token", &["gr1348941"], r"GR1348941[A-Za-z0-9_\-]{20}"),
    raw("gitlab_token", &["_gitlab_session="], r"_gitlab_session=([0-9a-z]{32})", Group::Nth(1)),
    keyed("gitter_token", &["gitter"], "gitter", r"[a-z0-9_\-]{40}"),
    keyed("gocardless_token", &["gocardless"], "gocardless", r"live_[a-z0-9\-_=]{40}"),
    token("grafana_token", &["eyjrijoi"], r"eyJrIjoi[A-Za-z0-9]{70,400}={0,3}"),
    token("grafana_token", &["glc_"], r"glc_[A-Za-z0-9+/]{32,400}={0,3}"),
    token("grafana_token", &["glsa_"], r"glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}"),
    token("harness_key", &["pat.", "sat."], r"(?:pat|sat)\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{20}"),
    token("terraform_token", &["atlasv1"], r"[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9\-_=]{60,70}"),
    keyed("heroku_key", &["heroku"], "heroku", UUID),
    token("heroku_key", &["hrku-aa"], r"HRKU-AA[0-9A-Za-z_\-]{58}"),
    keyed("hubspot_key", &["hubspot"], "hubspot", UUID),
    token("huggingface_token", &["api_org_"], r"api_org_[A-Za-z]{34}"),
    token("infracost_token", &["ico-"], r"ico-[A-Za-z0-9]{32}"),
    keyed("intercom_key", &["intercom"], "intercom", r"[a-z0-9=_\-]{60}"),
    token("intra42_secret", &["s-s4t2ud-", "s-s4t2af-"], r"s-s4t2(?:ud|af)-[a-fA-F0-9]{64}"),
    keyed("jfrog_key", &["jfrog", "artifactory", "bintray", "xray"], "jfrog|artifactory|bintray|xray", r"[a-z0-9]{73}|[a-z0-9]{64}"),
    token("jwt_base64", &["zxlk"], r"ZXlK[A-Za-z0-9+/]{40,}={0,2}"),
    keyed("kraken_token", &["kraken"], "kraken", r"[a-z0-9/=_+\-]{80,90}"),
    keyed("kucoin_key", &["kucoin"], "kucoin", UUID),
    keyed("kucoin_key", &["kucoin"], "kucoin", r"[a-f0-9]{24}"),
    raw("kubernetes_secret", &["kind:"], r#"(?i)\bkind:[ \t]*["']?secret\b["']?(?s:.){0,200}?\bdata:[ \t]*((?:\r?\n[ \t]+[A-Za-z0-9_.\-]+:[ \t]*["']?[A-Za-z0-9+/]{4,}={0,3}["']?)+)"#, Group::Nth(1)),
    raw("kubernetes_secret", &["kind:"], r#"(?i)\bdata:[ \t]*((?:\r?\n[ \t]+[A-Za-z0-9_.\-]+:[ \t]*["']?[A-Za-z0-9+/]{4,}={0,3}["']?)+)(?s:.){0,200}?\bkind:[ \t]*["']?secret\b"#, Group::Nth(1)),
    keyed("launchdarkly_token", &["launchdarkly"], "launchdarkly", r"[a-z0-9=_\-]{40}"),
    token("linear_key", &["lin_api_"], r"lin_api_[A-Za-z0-9]{40}"),
    keyed("linear_client_secret", &["linear"], "linear", r"[a-f0-9]{32}"),
    keyed("linkedin_client", &["linkedin", "linked_in", "linked-in"], r"linked[_\-]?in", r"[a-z0-9]{16}|[a-z0-9]{14}"),
    keyed("lob_key", &["lob"], r"\blob", r"(?:live|test)_(?:pub_[a-f0-9]{31}|[a-f0-9]{35})"),
    keyed("looker_client", &["looker"], "looker", r"[a-z0-9]{24}|[a-z0-9]{20}"),
    keyed("mailchimp_key", &["mailchimp"], r"mailchimpsdk\.initialize|mailchimp", r"[a-f0-9]{32}-us[0-9]{2}"),
    keyed("mailgun_key", &["mailgun"], "mailgun", r"(?:key|pubkey)-[a-f0-9]{32}|[a-h0-9]{32}-[a-h0-9]{8}-[a-h0-9]{8}"),
    keyed("mapbox_token", &["mapbox"], "mapbox", r"pk\.[a-z0-9]{60}\.[a-z0-9]{22}"),
    keyed("mattermost_token", &["mattermost"], "mattermost", r"[a-z0-9]{26}"),
    token("maxmind_license_key", &["_mmk"], r"[A-Za-z0-9]{6}_[A-Za-z0-9]{29}_mmk"),
    keyed("messagebird_key", &["messagebird", "message_bird", "message-bird"], r"message[_\-]?bird", r"[a-z0-9]{25}"),
    keyed("messagebird_key", &["messagebird", "message_bird", "message-bird"], r"message[_\-]?bird", UUID),
    raw("teams_webhook", &["webhook.office.com"], r"https://[a-z0-9]+\.webhook\.office\.com/webhookb2/([a-z0-9\-]{36}@[a-z0-9\-]{36}/IncomingWebhook/[a-z0-9]{32}/[a-z0-9\-]{36})", Group::Nth(1)),
    keyed("netlify_token", &["netlify"], "netlify", r"[a-z0-9=_\-]{40,46}"),
    keyed("newrelic_key", &["new-relic", "newrelic", "new_relic"], r"new[\-_]?relic", r"nrjs-[a-f0-9]{19}|nrii-[a-z0-9\-]{32}|nrak-[a-z0-9]{27}|[a-z0-9]{64}"),
    token("notion_token", &["ntn_"], r"ntn_[0-9]{11}[A-Za-z0-9]{35}"),
    raw("nuget_password", &["<add key="], r#"(?i)<add key="(?:ClearText)?Password"\s*value="([^"]{8,})"\s*/>"#, Group::Nth(1)),
    keyed("nytimes_token", &["nytimes", "new-york-times", "newyorktimes"], r"nytimes|new-york-times|newyorktimes", r"[a-z0-9=_\-]{32}"),
    token("octopus_deploy_key", &["api-"], r"API-[A-Z0-9]{26}"),
    keyed("okta_token", &["okta"], "okta", r"00[A-Za-z0-9_=\-]{40}"),
    token("openshift_token", &["sha256~"], r"sha256~[A-Za-z0-9_\-]{43}"),
    token("perplexity_key", &["pplx-"], r"pplx-[A-Za-z0-9]{48}"),
    keyed("plaid_key", &["plaid"], "plaid", r"access-(?:sandbox|development|production)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[a-z0-9]{30}|[a-z0-9]{24}"),
    token("planetscale_token", &["pscale_tkn_", "pscale_oauth_", "pscale_pw_"], r"pscale_(?:tkn|oauth|pw)_[A-Za-z0-9_=.\-]{32,64}"),
    token("postman_key", &["pmak-"], r"PMAK-[a-fA-F0-9]{24}-[a-fA-F0-9]{34}"),
    token("prefect_token", &["pnu_"], r"pnu_[A-Za-z0-9]{36}"),
    keyed("privateai_key", &["privateai", "private_ai", "private-ai"], r"private[_\-]?ai", r"[a-z0-9]{32}"),
    token("pulumi_token", &["pul-"], r"pul-[a-f0-9]{40}"),
    token("pypi_token", &["pypi-ageichlwas5vcmc"], r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}"),
    keyed("rapidapi_key", &["rapidapi"], "rapidapi", r"[a-z0-9_\-]{50}"),
    token("readme_key", &["rdme_"], r"rdme_[a-z0-9]{70}"),
    token("rubygems_key", &["rubygems_"], r"rubygems_[a-f0-9]{48}"),
    token("scalingo_token", &["tk-us-"], r"tk-us-[A-Za-z0-9_\-]{48}"),
    keyed("sendbird_token", &["sendbird"], "sendbird", r"[a-f0-9]{40}"),
    keyed("sendbird_token", &["sendbird"], "sendbird", UUID),
    token("sendgrid_key", &["sg."], r"SG\.[A-Za-z0-9=_\-.]{66}"),
    token("sendinblue_key", &["xkeysib-"], r"xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}"),
    token("sentry_token", &["sntrys_eyjpyxqio"], r"sntrys_eyJpYXQiO[A-Za-z0-9+/]{10,200}(?:LCJyZWdpb25fdXJs|InJlZ2lvbl91cmwi|cmVnaW9uX3VybCI6)[A-Za-z0-9+/]{10,200}={0,2}_[A-Za-z0-9+/]{43}"),
    token("sentry_token", &["sntryu_"], r"sntryu_[a-f0-9]{64}"),
    keyed("sentry_token", &["sentry"], "sentry", r"[a-f0-9]{64}"),
    token("settlemint_token", &["sm_aat_", "sm_pat_", "sm_sat_"], r"sm_[aps]at_[A-Za-z0-9]{16}"),
    token("shippo_token", &["shippo_"], r"shippo_(?:live|test)_[a-fA-F0-9]{40}"),
    token("shopify_token", &["shpat_", "shpca_", "shppa_", "shpss_"], r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"),
    keyed("sidekiq_secret", &["contribsys"], r"bundle_(?:enterprise|gems)__contribsys__com", r"[a-f0-9]{8}:[a-f0-9]{8}"),
    token("slack_token", &["xoxe"], r"xoxe\.xox[bp]-[0-9]-[A-Za-z0-9]{163,166}|xoxe-[0-9]-[A-Za-z0-9]{146}"),
    keyed("snyk_token", &["snyk"], r"snyk[_.\-]?(?:(?:api|oauth)[_.\-]?)?(?:key|token)", UUID),
    keyed("sonar_token", &["sonar"], r"sonar[_.\-]?(?:login|token)", r"(?:squ_|sqp_|sqa_)?[a-z0-9=_\-]{40}"),
    token("sourcegraph_token", &["sgp_"], r"sgp_(?:[a-fA-F0-9]{16}_|local_)?[a-fA-F0-9]{40}"),
    keyed("sourcegraph_token", &["sourcegraph"], "sourcegraph", r"[a-f0-9]{40}"),
    token("square_token", &["sq0atp-", "eaaa"], r"(?:EAAA|sq0atp-)[A-Za-z0-9_\-]{22,60}"),
    keyed("squarespace_token", &["squarespace"], "squarespace", UUID),
    keyed("sumologic_key", &["sumo"], "sumo", r"su[a-z0-9]{12}|[a-z0-9]{64}"),
    keyed("telegram_bot_token", &["telegr"], "telegr", r"[0-9]{5,16}:A[a-z0-9_\-]{34}"),
    keyed("travisci_token", &["travis"], "travis", r"[a-z0-9]{22}"),
    keyed("twitch_token", &["twitch"], "twitch", r"[a-z0-9]{30}"),
    token("twilio_key", &["sk"], r"SK[0-9a-fA-F]{32}"),
    keyed("twitter_token", &["twitter"], "twitter", r"a{22}[a-z0-9%]{80,100}|[0-9]{15,25}-[a-z0-9]{20,40}|[a-z0-9]{50}|[a-z0-9]{45}|[a-z0-9]{25}"),
    keyed("typeform_token", &["typeform"], "typeform", r"tfp_[a-z0-9\-_.=]{59}"),
    token("vault_token", &["hvb.", "hvs."], r"hvb\.[A-Za-z0-9_\-]{138,}|hvs\.[A-Za-z0-9_\-]{90,120}"),
    raw("vault_token", &["s."], r"(?:^|[^A-Za-z0-9_.\-])(s\.[A-Za-z0-9]{24})(?:[^A-Za-z0-9_\-]|$)", Group::Nth(1)),
    keyed("yandex_key", &["yandex"], "yandex", r"t1\.[a-z0-9_\-]+={0,2}\.[a-z0-9_\-]{86}={0,2}|aqvn[a-z0-9_\-]{35,38}|yc[a-z0-9_\-]{38}"),
    keyed("zendesk_key", &["zendesk"], "zendesk", r"[a-z0-9]{40}"),
];

/// A password after a short flag, quoted either way or bare (and not another
/// flag): three alternative groups.
macro_rules! flag_value {
    () => {
        r#"(?:'([^'\n]+)'|"([^"\n]+)"|([^\s'"\-][^\s'"]*))"#
    };
}

/// Command-line password forms, before the generic rules.
#[rustfmt::skip]
pub(crate) const COMMAND_LINE: &[Provider] = &[
    // mysql -p'secret', -p"secret", -psecret (never `-p db`, which prompts).
    raw("cli_password", &["mysql", "mariadb"], concat!(r#"(?i:\b(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlshow|mysqlcheck|mysqlpump|mysqlsh|mariadb(?:-dump|-admin)?))\b[^\n|;&]*?[ \t]-p"#, r#"(?:'([^'\n]+)'|"([^"\n]+)"|([^\s'"\-][^\s'"]*))"#), Group::FirstSet),
    raw("cli_password", &["sshpass"], concat!(r"\bsshpass\b[^\n|;&]*?[ \t]-p[ \t]*", flag_value!()), Group::FirstSet),
    raw("cli_password", &["redis-cli"], concat!(r"\bredis-cli\b[^\n|;&]*?[ \t]-a[ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["login"], concat!(r"\b(?:docker|podman|buildah|skopeo|nerdctl|oras|helm[ \t]+registry)[ \t]+login\b[^\n|;&]*?[ \t]-p[ \t]*", flag_value!()), Group::FirstSet),
    raw("cli_password", &["sqlcmd", "bcp", "osql", "isql"], concat!(r"\b(?:sqlcmd|bcp|osql|isql)\b[^\n|;&]*?[ \t]-P[ \t]*", flag_value!()), Group::FirstSet),
    raw("cli_password", &["mongo"], concat!(r"\bmongo(?:sh|dump|restore|import|export|stat|top)?\b[^\n|;&]*?[ \t](?:-p|--password)[ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["ldap"], concat!(r"\bldap[a-z]+\b[^\n|;&]*?[ \t]-w[ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["az"], concat!(r"\baz[ \t]+login\b[^\n|;&]*?[ \t](?:-p|--password)[ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["zip"], concat!(r"\b(?:zip|unzip|zipcloak)\b[^\n|;&]*?[ \t]-P[ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["7z"], r"\b7z[ar]?\b[^\n|;&]*?[ \t]-p([^\s'\x22]+)", Group::Nth(1)),
    raw("cli_password", &["ssh-keygen"], concat!(r"\bssh-keygen\b[^\n|;&]*?[ \t]-[NP][ \t]+", flag_value!()), Group::FirstSet),
    raw("cli_password", &["pass:"], r"(?i)-pass(?:in|out|word)?[ \t]+pass:([^\s'\x22]+)", Group::Nth(1)),
    raw("cli_password", &["%"], r"(?:^|\s)(?:-U|--user)[ \t]+['\x22]?[^\s%'\x22]+%([^\s'\x22]+)", Group::Nth(1)),
    raw("cli_password", &["htpasswd"], r"\bhtpasswd[ \t]+-[a-zA-Z]*b[a-zA-Z]*[ \t]+\S+[ \t]+\S+[ \t]+(\S+)", Group::Nth(1)),
    raw("cli_password", &["net"], r"(?i)\bnet[ \t]+use[ \t]+\S+[ \t]+([^\s/]\S*)[ \t]+/user:", Group::Nth(1)),
    raw("cli_password", &["sudo"], r#"\becho[ \t]+(?:'([^'\n]+)'|"([^"\n]+)"|([^\s'"|]+))[ \t]*\|[ \t]*sudo[ \t]+(?:-[a-zA-Z]+[ \t]+)*-[a-zA-Z]*S"#, Group::FirstSet),
    raw("cli_password", &["chpasswd"], r#"\becho[ \t]+['"]?[^:\s'"]+:([^\s'"]+)['"]?[ \t]*\|[ \t]*(?:sudo[ \t]+)?chpasswd"#, Group::Nth(1)),
    // Environment variables read by database and backup tools.
    raw("cli_password", &["pwd", "auth", "pass"], r#"\b(?:MYSQL_PWD|REDISCLI_AUTH|SSHPASS|PGPASSWORD|SQLCMDPASSWORD|ISQL_PASSWORD|RCLONE_CONFIG_PASS|BORG_PASSPHRASE|RESTIC_PASSWORD|RSYNC_PASSWORD|ANSIBLE_BECOME_PASS|PGPASS)=(?:'([^'\n]+)'|"([^"\n]+)"|([^\s'"$][^\s'";&|]*))"#, Group::FirstSet),
    // --password='two words', --db-pass "x y": quoted values may hold spaces.
    raw("cli_password", &["pass", "pwd"], r#"(?i)(?:^|[\s"'])--?[a-z0-9_\-]*(?:password|passwd|passphrase|pass|pwd)(?:=|[ \t]+)(?:'([^'\n]{1,200})'|"([^"\n]{1,200})")"#, Group::FirstSet),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_compiles_and_names_a_group() {
        for p in PROVIDERS.iter().chain(COMMAND_LINE) {
            let (src, group) = p.pattern();
            let re = regex::Regex::new(&src);
            assert!(re.is_ok(), "{}: {:?}", p.kind, re.err());
            let n = re.map(|r| r.captures_len()).unwrap_or(0);
            if let Group::Nth(g) = group {
                assert!(g < n, "{}: no group {g}", p.kind);
            }
            assert!(!p.keywords.is_empty(), "{}: no keyword", p.kind);
            for k in p.keywords {
                assert_eq!(*k, k.to_ascii_lowercase(), "{}: keyword {k}", p.kind);
            }
        }
    }
}
