//! The lethal-trifecta guard: a task that can read private data, sees
//! untrusted input and can talk to the outside world can be steered into
//! leaking. Tools are tagged in the config with the capability they give; when
//! a task (one agent, one task id) has already used tools of two of the three
//! kinds, a call that brings the third is escalated to a human whatever its risk.
//!
//! Pure: the task's history (tools already approved, with their tags) is a
//! parameter, read from the store by the caller, so it survives restarts.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A capability a tool gives a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolTag {
    /// Reads mail, files, databases, anything the user would not publish.
    ReadsPrivateData,
    /// Reads web pages, issues, inbound mail: text an attacker can write.
    SeesUntrustedInput,
    /// Sends mail, posts, fetches URLs: data can leave through it.
    CommunicatesExternally,
}

/// The three kinds, in display order.
pub const ALL_TAGS: [ToolTag; 3] = [
    ToolTag::ReadsPrivateData,
    ToolTag::SeesUntrustedInput,
    ToolTag::CommunicatesExternally,
];

impl ToolTag {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolTag::ReadsPrivateData => "reads_private_data",
            ToolTag::SeesUntrustedInput => "sees_untrusted_input",
            ToolTag::CommunicatesExternally => "communicates_externally",
        }
    }
}

impl fmt::Display for ToolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call completes the trifecta, or `None` when it does not.
///
/// `history` holds the tools the task has already used (approved), each with
/// its tags; `tool`/`tags` is the call being decided. The call is escalated
/// when it carries at least one tag and, together with the history, the task
/// would hold all three kinds. A task that already holds all three (a human
/// let the third through) keeps asking for every tagged call.
pub fn check(history: &[(String, Vec<ToolTag>)], tool: &str, tags: &[ToolTag]) -> Option<String> {
    if tags.is_empty() {
        return None;
    }
    let mut held: BTreeSet<ToolTag> = BTreeSet::new();
    for (_, t) in history {
        held.extend(t.iter().copied());
    }
    let all: BTreeSet<ToolTag> = held.iter().chain(tags).copied().collect();
    if all.len() < ALL_TAGS.len() {
        return None;
    }
    let used: Vec<String> = ALL_TAGS
        .iter()
        .filter(|k| held.contains(k))
        .map(|k| {
            let mut tools: Vec<&str> = history
                .iter()
                .filter(|(_, t)| t.contains(k))
                .map(|(name, _)| name.as_str())
                .collect();
            tools.sort_unstable();
            tools.dedup();
            format!("{k} ({})", tools.join(", "))
        })
        .collect();
    let brings: Vec<&str> = ALL_TAGS
        .iter()
        .filter(|k| tags.contains(k))
        .map(|k| k.as_str())
        .collect();
    let history_text = if used.is_empty() {
        String::new()
    } else {
        format!("this task has already used {}; ", used.join(" and "))
    };
    Some(format!(
        "lethal trifecta: {history_text}`{tool}` is {}, so the task could read private data, \
         take orders from untrusted input and send data out",
        brings.join(" and ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ToolTag::*;

    /// (history, tags of the call, escalated?)
    type Case<'a> = (&'a [(&'a str, &'a [ToolTag])], &'a [ToolTag], bool);

    fn h(list: &[(&str, &[ToolTag])]) -> Vec<(String, Vec<ToolTag>)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_vec()))
            .collect()
    }

    #[test]
    fn table() {
        let cases: &[Case] = &[
            // Nothing used yet: no single-kind tool escalates.
            (&[], &[CommunicatesExternally], false),
            // Two kinds used, the third arrives: escalate.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[CommunicatesExternally],
                true,
            ),
            // Any order: private + external, then untrusted.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("send_email", &[CommunicatesExternally]),
                ],
                &[SeesUntrustedInput],
                true,
            ),
            // Two kinds used, another tool of a kind already held: fine.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[ReadsPrivateData],
                false,
            ),
            // Only one kind used: the second kind does not escalate.
            (
                &[("read_email", &[ReadsPrivateData])],
                &[SeesUntrustedInput],
                false,
            ),
            // An untagged tool never escalates.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[],
                false,
            ),
            // One tool that is all three at once.
            (
                &[],
                &[ReadsPrivateData, SeesUntrustedInput, CommunicatesExternally],
                true,
            ),
            // A tool with two kinds completes one already held.
            (
                &[("browse", &[SeesUntrustedInput])],
                &[ReadsPrivateData, CommunicatesExternally],
                true,
            ),
            // All three held already: every tagged call keeps asking.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                    ("send_email", &[CommunicatesExternally]),
                ],
                &[ReadsPrivateData],
                true,
            ),
        ];
        for (i, (hist, tags, want)) in cases.iter().enumerate() {
            let got = check(&h(hist), "the_tool", tags);
            assert_eq!(got.is_some(), *want, "case {i}: {got:?}");
        }
    }

    #[test]
    fn reason_names_kinds_and_tools() {
        let why = check(
            &h(&[
                ("read_email", &[ReadsPrivateData]),
                ("fetch_url", &[SeesUntrustedInput]),
                ("read_calendar", &[ReadsPrivateData]),
            ]),
            "send_email",
            &[CommunicatesExternally],
        )
        .unwrap();
        assert!(
            why.contains("reads_private_data (read_calendar, read_email)"),
            "{why}"
        );
        assert!(why.contains("sees_untrusted_input (fetch_url)"), "{why}");
        assert!(
            why.contains("`send_email` is communicates_externally"),
            "{why}"
        );
    }
}
