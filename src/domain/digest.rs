//! Flood digests, pure: when more approval cards wait than Discord lets the
//! bot post in time, which waiting requests go into which digest (one per
//! agent and tool), what a digest shows (its tally), and how a bulk action's
//! outcome is told. No I/O, no clock (time is a parameter), no ids made
//! here (the caller passes them in). Imports nothing outside the domain.

use super::request::{ApprovalRequest, RequestId, State};
use uuid::Uuid;

/// Default `discord.digest_threshold`: more waiting cards than this (and
/// more than [`BEHIND_MS`] of posting at the channel's rate) start digests.
pub const DEFAULT_THRESHOLD: u32 = 20;
/// Digests start only when posting every waiting card one by one would
/// take longer than this at the rate Discord allows in the channel.
pub const BEHIND_MS: i64 = 15_000;
/// A digest takes new requests of its agent and tool for this long after
/// the last one joined; then single cards resume for new requests.
pub const HOLD_MS: i64 = 30_000;
/// Most requests in one digest (a bigger group gets a second digest).
pub const MAX_MEMBERS: u32 = 1000;
/// A group smaller than this keeps its cards (a digest of one is a card).
pub const MIN_GROUP: usize = 2;
/// Sample arguments a digest shows.
pub const SAMPLES: usize = 3;

/// A card waiting for its first post, with what groups it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub request_id: RequestId,
    pub agent: String,
    pub tool: String,
}

/// A digest that still takes requests of its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub id: Uuid,
    pub agent: String,
    pub tool: String,
    pub members: u32,
}

/// A digest to create (its id made by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDigest {
    pub id: Uuid,
    pub agent: String,
    pub tool: String,
}

/// Which waiting requests join which digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub new: Vec<NewDigest>,
    /// `(request, digest)` in the order they join.
    pub joins: Vec<(RequestId, Uuid)>,
}

/// Whether the waiting cards are a flood: more than `threshold` (0: never)
/// and more than [`BEHIND_MS`] of posting at `posts_per_sec`, the rate
/// Discord allows in the channel. Unknown until Discord answered a post
/// with its rate-limit headers: no flood before (the first card teaches it).
pub fn flooded(waiting: u64, threshold: u32, posts_per_sec: Option<f64>) -> bool {
    if threshold == 0 || waiting <= u64::from(threshold) {
        return false;
    }
    match posts_per_sec {
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            waiting as f64 / rate * 1000.0 > BEHIND_MS as f64
        }
        _ => false,
    }
}

/// Plans one pass: a waiting request whose group has an open digest with
/// room joins it (flood or not: the digest is live); in a flood, a group of
/// at least [`MIN_GROUP`] without one gets new digests (`ids` supplies
/// their ids; when it runs out, the rest keep their cards). Everything
/// else keeps its card. `waiting` is oldest deadline first.
pub fn plan(
    waiting: &[Waiting],
    open: &[Open],
    flooded: bool,
    ids: &mut dyn Iterator<Item = Uuid>,
) -> Plan {
    let mut out = Plan::default();
    // (agent, tool, id, members) of every digest this pass may fill.
    let mut slots: Vec<(String, String, Uuid, u32)> = open
        .iter()
        .map(|o| (o.agent.clone(), o.tool.clone(), o.id, o.members))
        .collect();
    let group_size = |a: &str, t: &str| {
        waiting
            .iter()
            .filter(|w| w.agent == a && w.tool == t)
            .count()
    };
    for w in waiting {
        let room = slots
            .iter_mut()
            .find(|s| s.0 == w.agent && s.1 == w.tool && s.3 < MAX_MEMBERS);
        let target = match room {
            Some(s) => Some(s),
            None if flooded && group_size(&w.agent, &w.tool) >= MIN_GROUP => match ids.next() {
                Some(id) => {
                    out.new.push(NewDigest {
                        id,
                        agent: w.agent.clone(),
                        tool: w.tool.clone(),
                    });
                    slots.push((w.agent.clone(), w.tool.clone(), id, 0));
                    slots.last_mut()
                }
                None => None,
            },
            None => None,
        };
        if let Some(s) = target {
            s.3 += 1;
            out.joins.push((w.request_id, s.2));
        }
    }
    out
}

/// How a digest's requests stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub total: u32,
    pub pending: u32,
    pub approved: u32,
    pub denied: u32,
    pub timed_out: u32,
    pub cancelled: u32,
}

impl Tally {
    pub fn of<'a>(requests: impl IntoIterator<Item = &'a ApprovalRequest>) -> Tally {
        let mut t = Tally::default();
        for r in requests {
            t.total += 1;
            match r.state {
                State::Pending => t.pending += 1,
                State::Approved => t.approved += 1,
                State::Denied => t.denied += 1,
                State::TimedOut => t.timed_out += 1,
                State::Cancelled => t.cancelled += 1,
            }
        }
        t
    }

    /// What the message shows, as stored to tell whether it is stale.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}",
            self.total, self.pending, self.approved, self.denied, self.timed_out, self.cancelled
        )
    }

    /// Every request is decided.
    pub fn done(&self) -> bool {
        self.pending == 0
    }
}

/// What one request of a bulk action came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkStep {
    /// This vote decided it.
    Decided,
    /// The vote counts, but more approvals are needed.
    Counted,
    /// Someone (or its deadline) decided it meanwhile.
    AlreadyDecided,
    /// This approver may not decide it (critical tool, own request,
    /// already voted).
    Refused,
}

/// A bulk action's tally, for the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkReport {
    pub decided: u32,
    pub counted: u32,
    pub already: u32,
    pub refused: u32,
    /// Left pending because the action stopped on an error.
    pub left: u32,
}

impl BulkReport {
    pub fn add(&mut self, s: BulkStep) {
        match s {
            BulkStep::Decided => self.decided += 1,
            BulkStep::Counted => self.counted += 1,
            BulkStep::AlreadyDecided => self.already += 1,
            BulkStep::Refused => self.refused += 1,
        }
    }

    /// "Approved 35, 2 were already decided."
    pub fn text(&self, approve: bool, failed: bool) -> String {
        let verb = if approve { "Approved" } else { "Denied" };
        let mut parts = vec![format!("{verb} {}", self.decided)];
        if self.counted > 0 {
            parts.push(format!(
                "{} approval{} recorded (more are needed)",
                self.counted,
                plural(self.counted)
            ));
        }
        if self.already > 0 {
            parts.push(format!(
                "{} {} already decided",
                self.already,
                if self.already == 1 { "was" } else { "were" }
            ));
        }
        if self.refused > 0 {
            parts.push(format!(
                "{} {} not yours to decide (critical, your own, or already voted)",
                self.refused,
                if self.refused == 1 { "was" } else { "were" }
            ));
        }
        let mut text = parts.join(", ") + ".";
        if failed {
            text.push_str(&format!(
                " Something went wrong, so the action stopped: {} request{} left pending (they time out as denied unless decided).",
                self.left,
                plural(self.left)
            ));
        }
        text
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(n: u128, agent: &str, tool: &str) -> Waiting {
        Waiting {
            request_id: RequestId(Uuid::from_u128(n)),
            agent: agent.into(),
            tool: tool.into(),
        }
    }

    fn ids() -> impl Iterator<Item = Uuid> {
        (1000u128..).map(Uuid::from_u128)
    }

    #[test]
    fn a_flood_needs_both_the_count_and_the_delay() {
        assert!(!flooded(20, 20, Some(1.0)), "at the threshold");
        assert!(flooded(21, 20, Some(1.0)), "one past it, 21 s behind");
        assert!(
            !flooded(200, 20, Some(60.0)),
            "a fast channel drains 200 in 3 s"
        );
        assert!(flooded(2000, 20, Some(60.0)));
        assert!(!flooded(10_000, 0, Some(1.0)), "0 turns digests off");
        assert!(!flooded(10_000, 20, None), "the rate is not known yet");
        assert!(!flooded(10_000, 20, Some(f64::NAN)));
    }

    #[test]
    fn a_flood_groups_by_agent_and_tool_and_leaves_singles_as_cards() {
        let waiting = vec![
            w(1, "a", "x"),
            w(2, "b", "x"),
            w(3, "a", "x"),
            w(4, "a", "y"),
            w(5, "b", "x"),
        ];
        let p = plan(&waiting, &[], true, &mut ids());
        assert_eq!(p.new.len(), 2, "{p:?}");
        assert_eq!(
            (p.new[0].agent.as_str(), p.new[0].tool.as_str()),
            ("a", "x")
        );
        assert_eq!(
            (p.new[1].agent.as_str(), p.new[1].tool.as_str()),
            ("b", "x")
        );
        let joined: Vec<u128> = p.joins.iter().map(|(r, _)| r.0.as_u128()).collect();
        assert_eq!(joined, vec![1, 2, 3, 5], "a/y alone keeps its card");
        assert_eq!(p.joins[0].1, p.joins[2].1);
        assert_ne!(p.joins[0].1, p.joins[1].1);
        // No flood: nothing moves.
        assert_eq!(plan(&waiting, &[], false, &mut ids()), Plan::default());
    }

    #[test]
    fn an_open_digest_takes_its_group_even_after_the_flood() {
        let open = vec![Open {
            id: Uuid::from_u128(7),
            agent: "a".into(),
            tool: "x".into(),
            members: 3,
        }];
        let p = plan(&[w(1, "a", "x"), w(2, "a", "y")], &open, false, &mut ids());
        assert!(p.new.is_empty());
        assert_eq!(
            p.joins,
            vec![(RequestId(Uuid::from_u128(1)), Uuid::from_u128(7))]
        );
    }

    #[test]
    fn a_full_digest_gets_a_successor() {
        let open = vec![Open {
            id: Uuid::from_u128(7),
            agent: "a".into(),
            tool: "x".into(),
            members: MAX_MEMBERS - 1,
        }];
        let waiting = vec![w(1, "a", "x"), w(2, "a", "x"), w(3, "a", "x")];
        let p = plan(&waiting, &open, true, &mut ids());
        assert_eq!(p.joins[0].1, Uuid::from_u128(7));
        assert_eq!(p.new.len(), 1);
        assert_eq!(p.joins[1].1, p.new[0].id);
        assert_eq!(p.joins[2].1, p.new[0].id);
        // Without ids left, the rest keep their cards.
        let p = plan(&waiting, &open, true, &mut std::iter::empty());
        assert_eq!(p.joins.len(), 1);
    }

    #[test]
    fn the_report_says_what_happened() {
        let mut r = BulkReport::default();
        for _ in 0..35 {
            r.add(BulkStep::Decided);
        }
        r.add(BulkStep::AlreadyDecided);
        r.add(BulkStep::AlreadyDecided);
        assert_eq!(r.text(true, false), "Approved 35, 2 were already decided.");
        let r = BulkReport {
            decided: 3,
            left: 4,
            ..BulkReport::default()
        };
        let t = r.text(false, true);
        assert!(t.starts_with("Denied 3. Something went wrong"), "{t}");
        assert!(t.contains("4 requests left pending"), "{t}");
    }
}
