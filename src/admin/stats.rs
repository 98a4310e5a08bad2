//! `SHOW STATS`' averages: a snapshot of the totals every [`STATS_PERIOD`].

use std::sync::Arc;
use std::time::Duration;

use crate::shared::Shared;
use crate::shutdown::{Phase, ShutdownSignal};

/// How often `SHOW STATS` averages are brought up to date (PgBouncer's `stats_period`).
pub const STATS_PERIOD: Duration = Duration::from_secs(15);

/// Takes a snapshot of the totals every [`STATS_PERIOD`] until shutdown begins.
pub fn spawn_stats(shared: Arc<Shared>, mut signal: ShutdownSignal) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => shared.record_stats(),
                _ = signal.reached(Phase::Draining) => return,
            }
        }
    });
}
