//! The failed-login slowdown: consecutive failed logins are counted per client address,
//! and once an address has failed `auth_failure_threshold` times in a row, every login
//! answer to it (failure *and* success, so that an attacker cannot tell a right guess by
//! its speed) waits `auth_failure_delay`, doubling with each further failure up to
//! `auth_failure_delay_max`. A successful login clears the address's count; an address
//! that has not failed for [`FORGET_AFTER`] starts again from zero.
//!
//! IPv4 addresses count one by one; IPv6 addresses count per /64 network (one host
//! usually owns a whole /64). The table holds at most [`MAX_ADDRESSES`] entries; when it
//! is full, forgotten entries are dropped, then the one that failed longest ago. The
//! caller waits with an async sleep: no worker thread is blocked, and other addresses
//! are not affected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An address whose last failure is older than this starts from zero again.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most addresses tracked at once.
pub const MAX_ADDRESSES: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// Per-address counts of consecutive failed logins.
#[derive(Debug)]
pub struct FailedLogins {
    threshold: u32,
    delay: Duration,
    max: Duration,
    table: Mutex<HashMap<IpAddr, Entry>>,
    capacity: usize,
}

/// The address that failures are counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        v4 => v4,
    }
}

impl FailedLogins {
    /// `threshold` 0 or a zero `delay` turns the slowdown off (failures are still counted).
    pub fn new(threshold: u32, delay: Duration, max: Duration) -> Self {
        Self::with_capacity(threshold, delay, max, MAX_ADDRESSES)
    }

    fn with_capacity(threshold: u32, delay: Duration, max: Duration, capacity: usize) -> Self {
        FailedLogins {
            threshold,
            delay,
            max: max.max(delay),
            table: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Consecutive failures of `ip`'s address (0 when forgotten).
    pub fn failures(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        self.lock()
            .get(&key(ip))
            .filter(|e| now.duration_since(e.last) < FORGET_AFTER)
            .map_or(0, |e| e.failures)
    }

    /// How long the answer to a login from `ip` must wait now: zero below the
    /// threshold, then `delay` doubled per failure beyond it, at most `max`.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        if self.threshold == 0 || self.delay.is_zero() {
            return Duration::ZERO;
        }
        let n = self.failures(ip);
        if n < self.threshold {
            return Duration::ZERO;
        }
        let doublings = (n - self.threshold).min(31);
        self.delay
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Counts a failed login from `ip`; returns the address's consecutive failures.
    pub fn record_failure(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let k = key(ip);
        let mut table = self.lock();
        if !table.contains_key(&k) && table.len() >= self.capacity {
            table.retain(|_, e| now.duration_since(e.last) < FORGET_AFTER);
            if table.len() >= self.capacity {
                if let Some(oldest) = table.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k) {
                    table.remove(&oldest);
                }
            }
        }
        let e = table.entry(k).or_insert(Entry {
            failures: 0,
            last: now,
        });
        if now.duration_since(e.last) >= FORGET_AFTER {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        e.failures
    }

    /// A successful login from `ip`: its address starts again from zero.
    pub fn record_success(&self, ip: IpAddr) {
        self.lock().remove(&key(ip));
    }

    /// Whether `failures` consecutive failures put an address in the slowdown (for
    /// logging the moment it starts).
    pub fn is_threshold(&self, failures: u32) -> bool {
        self.threshold > 0 && !self.delay.is_zero() && failures == self.threshold
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delay_starts_at_threshold_doubles_and_caps() {
        let f = FailedLogins::new(3, Duration::from_secs(1), Duration::from_secs(5));
        let a = ip("10.0.0.1");
        let delays: Vec<u64> = (0..7)
            .map(|_| {
                let d = f.delay(a).as_secs();
                f.record_failure(a);
                d
            })
            .collect();
        assert_eq!(delays, [0, 0, 0, 1, 2, 4, 5]);
        // Another address is not affected.
        assert_eq!(f.delay(ip("10.0.0.2")), Duration::ZERO);
        // A success clears the count.
        f.record_success(a);
        assert_eq!(f.delay(a), Duration::ZERO);
        assert_eq!(f.failures(a), 0);
    }

    #[test]
    fn off_when_threshold_or_delay_is_zero() {
        for f in [
            FailedLogins::new(0, Duration::from_secs(1), Duration::from_secs(5)),
            FailedLogins::new(2, Duration::ZERO, Duration::ZERO),
        ] {
            for _ in 0..10 {
                f.record_failure(ip("10.0.0.1"));
            }
            assert_eq!(f.delay(ip("10.0.0.1")), Duration::ZERO);
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let f = FailedLogins::new(1, Duration::from_secs(1), Duration::from_secs(5));
        f.record_failure(ip("2001:db8:1:2::1"));
        assert_eq!(f.failures(ip("2001:db8:1:2:ffff::9")), 1);
        assert_eq!(f.failures(ip("2001:db8:1:3::1")), 0);
        f.record_failure(ip("::ffff:192.0.2.1"));
        assert_eq!(f.failures(ip("192.0.2.1")), 1);
        // Enormous failure counts do not overflow the delay.
        for _ in 0..100 {
            f.record_failure(ip("192.0.2.1"));
        }
        assert_eq!(f.delay(ip("192.0.2.1")), Duration::from_secs(5));
    }

    #[test]
    fn the_table_is_bounded() {
        let f = FailedLogins::with_capacity(1, Duration::from_secs(1), Duration::from_secs(2), 4);
        for i in 0..20u8 {
            f.record_failure(IpAddr::from([10, 0, 0, i]));
        }
        assert_eq!(f.len(), 4);
        // The latest address is always kept.
        assert_eq!(f.failures(IpAddr::from([10, 0, 0, 19])), 1);
    }
}
