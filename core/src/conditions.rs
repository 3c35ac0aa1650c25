//! Status conditions, with `lastTransitionTime` kept while the status holds.

use jiff::Timestamp;
use mandate_api::meta::{Condition, Time};

/// A condition of `type_`, carrying over the transition time from `previous`
/// when its status did not change (a change is stamped now).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    condition_at(previous, type_, ok, reason, message, generation, Timestamp::now())
}

/// [`condition`], with a change stamped `now`.
pub fn condition_at(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time)
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message.into(), 4096),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether `conditions` has `type_` with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Cut `s` to at most `max` bytes, on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_stamped_with_the_time_given() {
        let at = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let c = condition_at(&[], "Ready", false, "Broken", "no", None, at);
        assert_eq!(c.last_transition_time, Time(at));
        assert!(!is_true(std::slice::from_ref(&c), "Ready"));
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let first = condition(&[], "Ready", true, "Ready", "ok", Some(1));
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Ready",
            "still ok",
            Some(2),
        );
        assert_eq!(first.last_transition_time, again.last_transition_time);
        // A flip gets a new time, even from a condition set long ago.
        let mut old = first.clone();
        old.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let flipped = condition(std::slice::from_ref(&old), "Ready", false, "Broken", "no", Some(3));
        assert_eq!(flipped.status, "False");
        assert!(
            flipped.last_transition_time.0 > old.last_transition_time.0,
            "the time did not move on a flip"
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = truncate("é".repeat(5000), 4096);
        assert!(s.len() <= 4096 && s.ends_with("..."));
    }
}
