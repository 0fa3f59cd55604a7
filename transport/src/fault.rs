//! Test-only fault injection for process-level tests: drop, delay or fail requests
//! between chosen nodes without netem. An endpoint consults a [`FaultPlan`] only when
//! one was passed explicitly in its `EndpointConfig::fault_plan`; production
//! configurations leave it `None`.
//!
//! The plan is consulted once per request, on the requesting side before the request is
//! sent ([`Direction::Outgoing`]) and on the serving side before it is handed to the
//! application ([`Direction::Incoming`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// What happens to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Deliver it normally.
    Deliver,
    /// Lose it: the requester hears nothing and runs into its request timeout.
    Drop,
    /// Deliver it after this delay.
    Delay(Duration),
    /// Fail it at once: the requester gets an error.
    Fail,
}

/// Which side of a request a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A request this node sends.
    Outgoing,
    /// A request this node receives.
    Incoming,
}

/// One rule: `action` for requests to or from `peer` (any peer if `None`) in
/// `direction` (both if `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// The peer node the rule applies to; `None` for every peer.
    pub peer: Option<String>,
    /// The direction the rule applies to; `None` for both.
    pub direction: Option<Direction>,
    /// What happens to matching requests.
    pub action: FaultAction,
}

/// A changeable list of rules; the first matching rule decides, no match delivers.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<FaultRule>>,
    applied: AtomicU64,
}

impl FaultPlan {
    /// An empty plan: everything is delivered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace all rules.
    pub fn set(&self, rules: Vec<FaultRule>) {
        *self.rules.lock().unwrap_or_else(PoisonError::into_inner) = rules;
    }

    /// Add a rule after the existing ones.
    pub fn push(&self, rule: FaultRule) {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rule);
    }

    /// Remove all rules.
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// The action for one request to or from `peer`.
    pub fn decide(&self, peer: &str, direction: Direction) -> FaultAction {
        let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let action = rules
            .iter()
            .find(|r| {
                r.peer.as_deref().is_none_or(|p| p == peer)
                    && r.direction.is_none_or(|d| d == direction)
            })
            .map_or(FaultAction::Deliver, |r| r.action);
        if action != FaultAction::Deliver {
            self.applied.fetch_add(1, Ordering::Relaxed);
        }
        action
    }

    /// How many requests a rule has dropped, delayed or failed so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_decides() {
        let plan = FaultPlan::new();
        assert_eq!(plan.decide("a", Direction::Outgoing), FaultAction::Deliver);
        plan.push(FaultRule {
            peer: Some("a".into()),
            direction: Some(Direction::Incoming),
            action: FaultAction::Fail,
        });
        plan.push(FaultRule {
            peer: None,
            direction: None,
            action: FaultAction::Drop,
        });
        assert_eq!(plan.decide("a", Direction::Incoming), FaultAction::Fail);
        assert_eq!(plan.decide("a", Direction::Outgoing), FaultAction::Drop);
        assert_eq!(plan.decide("b", Direction::Incoming), FaultAction::Drop);
        assert_eq!(plan.applied(), 3);
        plan.clear();
        assert_eq!(plan.decide("b", Direction::Incoming), FaultAction::Deliver);
    }
}
