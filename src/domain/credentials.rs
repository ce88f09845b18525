//! Auth-profile failover for one credential: which of its profiles is in
//! use, counted failures, profiles set aside and brought back.
//!
//! Pure: no clock (time is a `now_ms` parameter, any monotonic
//! milliseconds), no I/O, no values (only profile names). The broker in
//! `src/sandbox/credentials.rs` holds the values and drives this machine.
//!
//! The rules:
//! - profiles are tried in their configured order; the active one is the
//!   first that is readable and not set aside;
//! - a failure counts toward the profile's consecutive failures; at
//!   `fail_after` it is set aside (and the next one becomes active);
//! - a success resets the profile's count (and brings it back if it was
//!   set aside and tried anyway, see below);
//! - `retry_after` (when configured) brings a set-aside profile back once
//!   that long has passed since it was set aside; [`Failover::reset`]
//!   brings every profile back; a profile whose value was rotated
//!   ([`Failover::rotated`]) is brought back too: the new value deserves a
//!   fresh count;
//! - an unreadable profile (its source could not be read) is never active.
//!
//! When every readable profile is set aside, the one set aside *longest
//! ago* is active again. Failing closed means still presenting a
//! credential (the run fails or not at the service), never running
//! without one; trying the profile that has had the longest to recover,
//! and refreshing its set-aside time when it fails again, rotates through
//! the profiles instead of hammering one. Only when no profile is readable
//! at all is there no active profile, and the broker refuses the run.

/// One profile's failover state (its name; never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileState {
    name: String,
    failures: u32,
    /// When it was set aside (or last failed while set aside).
    set_aside_ms: Option<i64>,
    /// Orders set-asides (and failed retries) as they happened, so the
    /// longest ago wins even when two happen in the same millisecond.
    aside_order: u64,
    readable: bool,
}

impl ProfileState {
    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consecutive failures since the last success, reset or rotation.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether it is set aside (after `fail_after` failures).
    pub fn is_set_aside(&self) -> bool {
        self.set_aside_ms.is_some()
    }

    /// Whether its last read succeeded.
    pub fn is_readable(&self) -> bool {
        self.readable
    }
}

/// A failover event, for the warn-level log line the broker writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The profile reached `fail_after` consecutive failures.
    SetAside { profile: String },
    /// The profile is usable again (retry_after passed, a success, a
    /// reset, or a rotated value).
    Back { profile: String },
}

/// The failover state of one credential's profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    fail_after: u32,
    retry_after_ms: Option<i64>,
    profiles: Vec<ProfileState>,
    /// The next [`ProfileState::aside_order`].
    next_order: u64,
}

impl Failover {
    /// Profiles in order of preference, all readable and in use.
    /// `fail_after` below 1 is taken as 1 (the config refuses it anyway).
    pub fn new(names: &[String], fail_after: u32, retry_after_ms: Option<i64>) -> Failover {
        Failover {
            fail_after: fail_after.max(1),
            retry_after_ms,
            profiles: names
                .iter()
                .map(|n| ProfileState {
                    name: n.clone(),
                    failures: 0,
                    set_aside_ms: None,
                    aside_order: 0,
                    readable: true,
                })
                .collect(),
            next_order: 0,
        }
    }

    /// The profiles in order.
    pub fn profiles(&self) -> &[ProfileState] {
        &self.profiles
    }

    fn find(&mut self, profile: &str) -> Option<&mut ProfileState> {
        self.profiles.iter_mut().find(|p| p.name == profile)
    }

    /// Brings back the set-aside profiles whose `retry_after` has passed at
    /// `now_ms` (none without `retry_after`). Call before [`Failover::active`].
    pub fn expire(&mut self, now_ms: i64) -> Vec<Change> {
        let Some(after) = self.retry_after_ms else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for p in &mut self.profiles {
            if let Some(at) = p.set_aside_ms {
                if now_ms.saturating_sub(at) >= after {
                    p.set_aside_ms = None;
                    p.failures = 0;
                    changes.push(Change::Back {
                        profile: p.name.clone(),
                    });
                }
            }
        }
        changes
    }

    /// The profile to use: the first readable one not set aside; if every
    /// readable one is set aside, the one set aside (or failed again)
    /// longest ago, by the order of events rather than the clock;
    /// `None` only when none is readable.
    pub fn active(&self) -> Option<&str> {
        if let Some(p) = self
            .profiles
            .iter()
            .find(|p| p.readable && p.set_aside_ms.is_none())
        {
            return Some(&p.name);
        }
        let mut best: Option<&ProfileState> = None;
        for p in self.profiles.iter().filter(|p| p.readable) {
            match best {
                Some(b) if b.aside_order <= p.aside_order => {}
                _ => best = Some(p),
            }
        }
        best.map(|p| p.name.as_str())
    }

    /// Counts a failure of `profile` at `now_ms`. Returns the change when
    /// this failure sets it aside. A profile already set aside (tried
    /// because every profile was) gets its set-aside time refreshed, so the
    /// next try goes to another. Unknown names are ignored.
    pub fn failure(&mut self, profile: &str, now_ms: i64) -> Option<Change> {
        let fail_after = self.fail_after;
        let order = self.next_order;
        let p = self.profiles.iter_mut().find(|p| p.name == profile)?;
        p.failures = p.failures.saturating_add(1);
        if p.set_aside_ms.is_some() {
            p.set_aside_ms = Some(now_ms);
            p.aside_order = order;
            self.next_order += 1;
            return None;
        }
        if p.failures >= fail_after {
            p.set_aside_ms = Some(now_ms);
            p.aside_order = order;
            self.next_order += 1;
            return Some(Change::SetAside {
                profile: p.name.clone(),
            });
        }
        None
    }

    /// Counts a success of `profile`: its count goes back to 0, and a
    /// set-aside profile (tried anyway) is back.
    pub fn success(&mut self, profile: &str) -> Option<Change> {
        let p = self.find(profile)?;
        p.failures = 0;
        p.set_aside_ms.take().map(|_| Change::Back {
            profile: p.name.clone(),
        })
    }

    /// The profile's value changed on a re-read: it is back, count 0.
    pub fn rotated(&mut self, profile: &str) -> Option<Change> {
        self.success(profile)
    }

    /// Every profile back, every count 0.
    pub fn reset(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for p in &mut self.profiles {
            p.failures = 0;
            if p.set_aside_ms.take().is_some() {
                changes.push(Change::Back {
                    profile: p.name.clone(),
                });
            }
        }
        changes
    }

    /// Records whether the profile's last read succeeded.
    pub fn set_readable(&mut self, profile: &str, readable: bool) {
        if let Some(p) = self.find(profile) {
            p.readable = readable;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(fail_after: u32, retry_after_ms: Option<i64>) -> Failover {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        Failover::new(&names, fail_after, retry_after_ms)
    }

    fn aside(p: &str) -> Option<Change> {
        Some(Change::SetAside { profile: p.into() })
    }

    fn back(p: &str) -> Change {
        Change::Back { profile: p.into() }
    }

    #[test]
    fn first_profile_is_active_until_it_fails_fail_after_times() {
        let mut f = three(3, None);
        assert_eq!(f.active(), Some("a"));
        assert_eq!(f.failure("a", 1_000), None);
        assert_eq!(f.failure("a", 2_000), None);
        assert_eq!(f.active(), Some("a"));
        assert_eq!(f.profiles()[0].failures(), 2);
        assert_eq!(f.failure("a", 3_000), aside("a"));
        assert_eq!(f.active(), Some("b"));
        assert!(f.profiles()[0].is_set_aside());
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut f = three(2, None);
        f.failure("a", 1_000);
        assert_eq!(f.success("a"), None);
        assert_eq!(f.profiles()[0].failures(), 0);
        assert_eq!(f.failure("a", 2_000), None);
        assert_eq!(f.active(), Some("a"));
    }

    #[test]
    fn retry_after_brings_a_profile_back() {
        let mut f = three(1, Some(60_000));
        assert_eq!(f.failure("a", 10_000), aside("a"));
        assert!(f.expire(69_999).is_empty());
        assert_eq!(f.active(), Some("b"));
        assert_eq!(f.expire(70_000), vec![back("a")]);
        assert_eq!(f.active(), Some("a"));
        assert_eq!(f.profiles()[0].failures(), 0);
    }

    #[test]
    fn without_retry_after_only_reset_brings_profiles_back() {
        let mut f = three(1, None);
        f.failure("a", 1_000);
        f.failure("b", 2_000);
        assert!(f.expire(i64::MAX).is_empty());
        assert_eq!(f.active(), Some("c"));
        assert_eq!(f.reset(), vec![back("a"), back("b")]);
        assert_eq!(f.active(), Some("a"));
        assert!(f.profiles().iter().all(|p| p.failures() == 0));
    }

    #[test]
    fn all_set_aside_tries_the_one_set_aside_longest_ago_in_turn() {
        let mut f = three(1, None);
        f.failure("a", 1_000);
        f.failure("b", 2_000);
        f.failure("c", 3_000);
        assert_eq!(f.active(), Some("a"));
        // It fails again: its time is refreshed, the next oldest is tried.
        assert_eq!(f.failure("a", 4_000), None);
        assert_eq!(f.active(), Some("b"));
        f.failure("b", 5_000);
        assert_eq!(f.active(), Some("c"));
        // A success brings it back, and it stays active.
        assert_eq!(f.success("c"), Some(back("c")));
        assert_eq!(f.active(), Some("c"));
    }

    #[test]
    fn set_asides_in_the_same_millisecond_keep_their_order() {
        let mut f = three(1, None);
        f.failure("b", 5);
        f.failure("a", 5);
        f.failure("c", 5);
        assert_eq!(f.active(), Some("b"));
        f.failure("b", 5);
        assert_eq!(f.active(), Some("a"));
    }

    #[test]
    fn unreadable_profiles_are_skipped_and_none_readable_is_none() {
        let mut f = three(3, None);
        f.set_readable("a", false);
        assert_eq!(f.active(), Some("b"));
        f.set_readable("b", false);
        f.set_readable("c", false);
        assert_eq!(f.active(), None);
        f.set_readable("a", true);
        assert_eq!(f.active(), Some("a"));
    }

    #[test]
    fn unreadable_profiles_are_skipped_even_when_all_are_set_aside() {
        let mut f = three(1, None);
        f.failure("a", 1_000);
        f.failure("b", 2_000);
        f.failure("c", 3_000);
        f.set_readable("a", false);
        assert_eq!(f.active(), Some("b"));
    }

    #[test]
    fn a_rotated_value_brings_its_profile_back() {
        let mut f = three(1, None);
        f.failure("a", 1_000);
        assert_eq!(f.active(), Some("b"));
        assert_eq!(f.rotated("a"), Some(back("a")));
        assert_eq!(f.active(), Some("a"));
        assert_eq!(f.rotated("b"), None);
    }

    #[test]
    fn unknown_profiles_are_ignored_and_zero_fail_after_is_one() {
        let mut f = three(0, None);
        assert_eq!(f.failure("zz", 1), None);
        assert_eq!(f.success("zz"), None);
        assert_eq!(f.failure("a", 1), aside("a"));
    }
}
