//! The circuit breaker of one host: consecutive check results decide whether it is up,
//! and how long to wait before the next check. Pure state, no IO, no clock.

use std::time::Duration;

use crate::config::HealthSettings;

/// What the breaker knows about a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not checked successfully yet, and not failed often enough to be down. Not usable.
    Unknown,
    Up,
    Down,
}

/// Counts consecutive results: `failures` in a row mark a host down, `successes` in a row
/// bring a down host back (the first success of a host never seen up counts at once).
/// While down, the pause between checks doubles after every failed check, from twice the
/// interval up to `backoff_max`.
#[derive(Clone, Debug)]
pub struct Breaker {
    settings: HealthSettings,
    health: Health,
    consecutive_failures: u32,
    consecutive_successes: u32,
}

impl Breaker {
    pub fn new(settings: HealthSettings) -> Self {
        Breaker {
            settings,
            health: Health::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }

    /// Records one check result; returns the new health when it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let before = self.health;
        if ok {
            self.consecutive_failures = 0;
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            let up = match self.health {
                Health::Up => false,
                Health::Unknown => true,
                Health::Down => self.consecutive_successes >= self.settings.successes.max(1),
            };
            if up {
                self.health = Health::Up;
            }
        } else {
            self.consecutive_successes = 0;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.consecutive_failures >= self.settings.failures.max(1) {
                self.health = Health::Down;
            }
        }
        (self.health != before).then_some(self.health)
    }

    /// A connection to the host just failed outside the health checks (a client's
    /// checkout could not reach it): down at once, as if the threshold of failed checks
    /// had been reached. The checks bring it back up as usual.
    pub fn trip(&mut self) -> Option<Health> {
        let before = self.health;
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.max(self.settings.failures.max(1));
        self.health = Health::Down;
        (self.health != before).then_some(self.health)
    }

    /// How long to wait before the next check.
    pub fn next_delay(&self) -> Duration {
        let interval = self.settings.interval;
        if self.health != Health::Down || self.consecutive_failures == 0 {
            return interval;
        }
        // The check that marked the host down is step 1: twice the interval.
        let steps = self
            .consecutive_failures
            .saturating_sub(self.settings.failures.max(1))
            + 1;
        let factor = 1u32.checked_shl(steps.min(31)).unwrap_or(u32::MAX);
        interval
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.settings.backoff_max.max(interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(failures: u32, successes: u32) -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures,
            successes,
            backoff_max: Duration::from_secs(10),
        }
    }

    #[test]
    fn first_success_brings_an_unknown_host_up() {
        let mut b = Breaker::new(settings(3, 2));
        assert_eq!(b.health(), Health::Unknown);
        assert_eq!(b.record(true), Some(Health::Up));
        assert_eq!(b.record(true), None);
    }

    #[test]
    fn n_failures_mark_down_and_m_successes_mark_up() {
        let mut b = Breaker::new(settings(3, 2));
        b.record(true);
        assert_eq!(b.record(false), None);
        assert_eq!(b.record(false), None);
        // A success in between resets the count.
        assert_eq!(b.record(true), None);
        assert_eq!(b.record(false), None);
        assert_eq!(b.record(false), None);
        assert_eq!(b.health(), Health::Up);
        assert_eq!(b.record(false), Some(Health::Down));
        assert_eq!(b.consecutive_failures(), 3);
        assert_eq!(b.record(false), None);
        // One success is not enough; a failure in between starts over.
        assert_eq!(b.record(true), None);
        assert_eq!(b.record(false), None);
        assert_eq!(b.record(true), None);
        assert_eq!(b.health(), Health::Down);
        assert_eq!(b.record(true), Some(Health::Up));
        assert_eq!(b.consecutive_successes(), 2);
    }

    #[test]
    fn a_host_never_reached_goes_down_after_n_failures() {
        let mut b = Breaker::new(settings(2, 2));
        assert_eq!(b.record(false), None);
        assert_eq!(b.health(), Health::Unknown);
        assert_eq!(b.record(false), Some(Health::Down));
    }

    #[test]
    fn one_failure_or_success_when_so_configured() {
        let mut b = Breaker::new(settings(1, 1));
        b.record(true);
        assert_eq!(b.record(false), Some(Health::Down));
        assert_eq!(b.record(true), Some(Health::Up));
    }

    #[test]
    fn back_off_doubles_while_down_and_is_capped() {
        let mut b = Breaker::new(settings(3, 2));
        let secs = |b: &Breaker| b.next_delay().as_secs_f64();
        assert_eq!(secs(&b), 1.0);
        b.record(false);
        b.record(false);
        assert_eq!(secs(&b), 1.0, "not down yet: the plain interval");
        let mut seen = Vec::new();
        for _ in 0..6 {
            b.record(false);
            seen.push(secs(&b));
        }
        assert_eq!(seen, [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]);
        // A success while down: checks at the interval again, to come back quickly.
        b.record(true);
        assert_eq!(secs(&b), 1.0);
        b.record(false);
        assert_eq!(secs(&b), 2.0);
    }

    #[test]
    fn back_off_never_overflows() {
        let mut b = Breaker::new(HealthSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 1,
            successes: 1,
            backoff_max: Duration::MAX,
        });
        for _ in 0..100 {
            b.record(false);
        }
        assert!(b.next_delay() >= Duration::from_secs(1 << 30));
    }
}
