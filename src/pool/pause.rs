//! `PAUSE` / `RESUME`: a gate every pool checkout passes. While a database is paused, a
//! client starting a transaction waits at the gate (without a `query_wait_timeout`) until
//! `RESUME`; transactions already running keep their server until they end.
//!
//! The open gate costs one atomic load per checkout; the set of paused databases is
//! behind a lock only looked at while something is paused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct Paused {
    /// `PAUSE` without a database: everything.
    all: bool,
    dbs: HashSet<String>,
}

/// Which databases are paused.
#[derive(Default)]
pub struct PauseGate {
    any: AtomicBool,
    paused: Mutex<Paused>,
    resumed: Notify,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Paused> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `database` is paused (by name or by a global PAUSE).
    pub fn is_paused(&self, database: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let p = self.lock();
        p.all || p.dbs.contains(database)
    }

    /// Waits until `database` is not paused; returns at once when it is not.
    pub async fn wait_resumed(&self, database: &str) {
        loop {
            let notified = self.resumed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_paused(database) {
                return;
            }
            notified.await;
        }
    }

    /// Pauses `database`, or everything. Err when it already is.
    pub fn pause(&self, database: Option<&str>) -> Result<(), String> {
        let mut p = self.lock();
        match database {
            None if p.all => return Err("pgtide is already paused".into()),
            None => p.all = true,
            Some(db) if p.all || p.dbs.contains(db) => {
                return Err(format!("database \"{db}\" is already paused"))
            }
            Some(db) => {
                p.dbs.insert(db.to_string());
            }
        }
        self.any.store(true, Ordering::Release);
        Ok(())
    }

    /// Resumes `database`, or everything (every database paused by name too). Err when it
    /// was not paused.
    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        let mut p = self.lock();
        match database {
            None if !p.all && p.dbs.is_empty() => {
                return Err("pgtide is not paused".into());
            }
            None => {
                p.all = false;
                p.dbs.clear();
            }
            Some(db) if p.dbs.remove(db) => {}
            Some(db) if p.all => {
                return Err(format!(
                    "database \"{db}\" is paused by a PAUSE of every database; RESUME without a name resumes it"
                ))
            }
            Some(db) => return Err(format!("database \"{db}\" is not paused")),
        }
        self.any
            .store(p.all || !p.dbs.is_empty(), Ordering::Release);
        drop(p);
        self.resumed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_and_resume_by_name_and_globally() {
        let g = PauseGate::default();
        assert!(!g.is_paused("a"));
        g.pause(Some("a")).unwrap();
        assert!(g.is_paused("a") && !g.is_paused("b"));
        assert!(g.pause(Some("a")).is_err());
        assert!(g.resume(Some("b")).is_err());
        g.resume(Some("a")).unwrap();
        assert!(!g.is_paused("a"));
        assert!(g.resume(None).is_err());
        g.pause(None).unwrap();
        assert!(g.is_paused("a") && g.is_paused("b"));
        assert!(g.resume(Some("a")).is_err());
        g.resume(None).unwrap();
        assert!(!g.is_paused("a"));
    }

    #[tokio::test]
    async fn a_waiter_is_released_by_resume() {
        let g = std::sync::Arc::new(PauseGate::default());
        g.pause(Some("db")).unwrap();
        let g2 = g.clone();
        let w = tokio::spawn(async move { g2.wait_resumed("db").await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!w.is_finished());
        g.resume(Some("db")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("released")
            .unwrap();
    }
}
