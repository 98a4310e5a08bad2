//! `max_db_connections`: the connection budget one database's pools share.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::Pool;

/// A per-database connection budget shared by the pools of every user of that database
/// (`max_db_connections`; 0 = unlimited).
#[derive(Debug, Default)]
pub struct DbLimit {
    max: AtomicU32,
    used: AtomicU32,
    /// The pools of this database (one per user), whose idle connections can be closed to
    /// make room for another user's pool when the limit is reached.
    pub(super) pools: Mutex<Vec<std::sync::Weak<Pool>>>,
}

impl DbLimit {
    pub fn new(max: u32) -> Arc<DbLimit> {
        Arc::new(DbLimit {
            max: AtomicU32::new(max),
            used: AtomicU32::new(0),
            pools: Mutex::new(Vec::new()),
        })
    }

    /// Closes one idle connection of another pool of this database, if there is one.
    pub(super) fn make_room(&self, for_pool: &Pool) -> bool {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        pools
            .iter()
            .filter(|p| !std::ptr::eq(p.as_ref(), for_pool))
            .any(|p| p.close_one_idle())
    }

    pub(super) fn try_acquire(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                if max == 0 || u < max {
                    Some(u + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }

    pub(super) fn release(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }

    /// Applies a reloaded `max_db_connections`.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Connections open for this database across its pools.
    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
    }
}
