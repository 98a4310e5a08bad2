//! The cluster's bookkeeping driven by scripted check results, and the monitor loop with
//! closure probes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

fn settings() -> HealthSettings {
    HealthSettings {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(100),
        failures: 2,
        successes: 2,
        backoff_max: Duration::from_millis(40),
    }
}

fn host(name: &str, role: HostRole) -> HostConfig {
    HostConfig {
        host: name.to_string(),
        port: 5432,
        role,
        weight: 1,
    }
}

fn never() -> Box<dyn Probe> {
    Box::new(FnProbe(|| Err("not used".to_string())))
}

/// A cluster of `roles` whose probes are never run (the tests call `record`).
fn cluster(roles: &[HostRole]) -> Arc<Cluster> {
    let hosts = roles
        .iter()
        .enumerate()
        .map(|(i, r)| host(&format!("h{i}"), *r))
        .collect();
    Cluster::new(
        "db",
        hosts,
        settings(),
        roles.iter().map(|_| never()).collect(),
    )
}

fn primary_at(lsn: u64) -> Result<ProbeResult, String> {
    Ok(ProbeResult {
        in_recovery: false,
        lsn: Some(Lsn(lsn)),
        replay_age: None,
    })
}

fn replica_at(lsn: u64, age: f64) -> Result<ProbeResult, String> {
    Ok(ProbeResult {
        in_recovery: true,
        lsn: Some(Lsn(lsn)),
        replay_age: Some(age),
    })
}

fn fail() -> Result<ProbeResult, String> {
    Err("connection refused".to_string())
}

const P: HostId = HostId(0);
const R: HostId = HostId(1);
const NO_LIMIT: Duration = Duration::ZERO;

#[test]
fn roles_are_discovered_and_the_primary_chosen() {
    let c = cluster(&[HostRole::Auto, HostRole::Auto]);
    assert_eq!(c.primary(), None);
    assert!(c
        .snapshot()
        .iter()
        .all(|h| !h.up && h.current_role == CurrentRole::Unknown));
    c.record(R, replica_at(100, 0.5));
    assert_eq!(c.primary(), None);
    c.record(P, primary_at(100));
    assert_eq!(c.primary(), Some(P));
    let s = c.snapshot();
    assert_eq!(s[0].current_role, CurrentRole::Primary);
    assert_eq!(s[0].lag_bytes, None);
    assert_eq!(s[1].current_role, CurrentRole::Replica);
    assert!(s[1].up);
    assert_eq!(s[1].addr, "h1:5432");
    assert_eq!(s[1].replay_lsn, Some(Lsn(100)));
    // Caught up with the primary: no lag, whatever the replay age.
    assert_eq!((s[1].lag_bytes, s[1].lag_seconds), (Some(0), Some(0.0)));
    assert_eq!(c.replicas_within(1, Duration::from_millis(1)), [R]);
}

#[test]
fn lagging_replicas_are_left_out() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, primary_at(10_000));
    c.record(R, replica_at(4_000, 3.0));
    let s = c.host(R).unwrap();
    assert_eq!((s.lag_bytes, s.lag_seconds), (Some(6_000), Some(3.0)));
    assert_eq!(c.replicas_within(0, NO_LIMIT), [R]);
    assert_eq!(c.replicas_within(6_000, NO_LIMIT), [R]);
    assert!(c.replicas_within(5_999, NO_LIMIT).is_empty());
    assert_eq!(c.replicas_within(0, Duration::from_secs(3)), [R]);
    assert!(c.replicas_within(0, Duration::from_secs(2)).is_empty());
    // The lag uses the newest primary position, also one learned after the replica's
    // check.
    c.record(P, primary_at(20_000));
    assert_eq!(c.host(R).unwrap().lag_bytes, Some(16_000));
    // Caught up again.
    c.record(R, replica_at(20_000, 30.0));
    assert_eq!(c.replicas_within(1, Duration::from_secs(1)), [R]);
}

#[test]
fn unknown_lag_is_not_within_a_limit() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(R, replica_at(100, 1.0));
    // No primary position known yet.
    assert_eq!(c.host(R).unwrap().lag_bytes, None);
    assert!(c.replicas_within(1 << 20, NO_LIMIT).is_empty());
    assert_eq!(c.replicas_within(0, Duration::from_secs(5)), [R]);
}

#[test]
fn down_hosts_are_not_used_and_come_back_after_m_successes() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, primary_at(100));
    c.record(R, replica_at(100, 0.0));
    assert_eq!(c.record(R, fail()), Duration::from_millis(10));
    assert!(c.host(R).unwrap().up, "one failure is not enough");
    assert_eq!(c.replicas_within(0, NO_LIMIT), [R]);
    // Down: back-off doubles, capped at 40 ms.
    assert_eq!(c.record(R, fail()), Duration::from_millis(20));
    let s = c.host(R).unwrap();
    assert!(!s.up);
    assert_eq!(s.health, Health::Down);
    assert_eq!(s.consecutive_failures, 2);
    assert_eq!(s.last_error.as_deref(), Some("connection refused"));
    assert!(c.replicas_within(0, NO_LIMIT).is_empty());
    assert_eq!(c.record(R, fail()), Duration::from_millis(40));
    assert_eq!(c.record(R, fail()), Duration::from_millis(40));
    c.record(R, replica_at(100, 0.0));
    assert!(!c.host(R).unwrap().up);
    c.record(R, replica_at(100, 0.0));
    assert!(c.host(R).unwrap().up);
    assert_eq!(c.replicas_within(0, NO_LIMIT), [R]);
}

#[test]
fn failover_to_a_promoted_replica_is_announced() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    let mut changes = c.primary_changes();
    c.record(P, primary_at(100));
    c.record(R, replica_at(100, 0.0));
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), Some(P));
    // The primary dies: no primary after `failures` failures.
    c.record(P, fail());
    assert_eq!(c.primary(), Some(P));
    c.record(P, fail());
    assert_eq!(c.primary(), None);
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), None);
    // The replica is promoted.
    c.record(R, primary_at(200));
    assert_eq!(c.primary(), Some(R));
    assert_eq!(*changes.borrow_and_update(), Some(R));
    assert_eq!(c.host(R).unwrap().current_role, CurrentRole::Primary);
    assert!(c.replicas_within(0, NO_LIMIT).is_empty());
    // The old primary comes back out of recovery: writes stay with the new one.
    c.record(P, primary_at(150));
    c.record(P, primary_at(150));
    assert!(c.host(P).unwrap().up);
    assert_eq!(c.primary(), Some(R));
    assert!(!changes.has_changed().unwrap());
}

#[test]
fn a_configured_primary_in_recovery_is_a_replica() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, replica_at(100, 0.0));
    c.record(R, primary_at(100));
    assert_eq!(c.primary(), Some(R));
    assert_eq!(c.replicas_within(0, NO_LIMIT), [P]);
    assert_eq!(c.host(P).unwrap().configured_role, HostRole::Primary);
}

#[test]
fn the_configured_primary_wins_over_auto_hosts() {
    let c = cluster(&[HostRole::Auto, HostRole::Primary]);
    c.record(HostId(1), primary_at(1));
    c.record(HostId(0), primary_at(1));
    assert_eq!(c.primary(), Some(HostId(1)));
    // Among equals, the first configured; chosen fresh only when there is none.
    let c = cluster(&[HostRole::Replica, HostRole::Auto]);
    c.record(HostId(0), primary_at(1));
    assert_eq!(c.primary(), Some(HostId(0)));
    c.record(HostId(1), primary_at(1));
    assert_eq!(c.primary(), Some(HostId(0)), "the current primary stays");
}

#[tokio::test]
async fn the_monitor_checks_on_its_interval_and_stops() {
    let replica_lsn = Arc::new(AtomicU64::new(100));
    let replica_alive = Arc::new(AtomicBool::new(true));
    let checks = Arc::new(AtomicU64::new(0));
    let probes: Vec<Box<dyn Probe>> = vec![
        Box::new(FnProbe({
            let checks = checks.clone();
            move || {
                checks.fetch_add(1, Ordering::Relaxed);
                primary_at(1000)
            }
        })),
        Box::new(FnProbe({
            let lsn = replica_lsn.clone();
            let alive = replica_alive.clone();
            move || {
                if alive.load(Ordering::Relaxed) {
                    replica_at(lsn.load(Ordering::Relaxed), 1.0)
                } else {
                    fail()
                }
            }
        })),
    ];
    let c = Cluster::new(
        "db",
        vec![host("p", HostRole::Auto), host("r", HostRole::Auto)],
        settings(),
        probes,
    );
    let handle = c.spawn();
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut changes = c.primary_changes();
    tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|p| *p == Some(P)))
        .await
        .expect("a primary appears")
        .unwrap();
    until("the replica is up and lagging", || {
        c.host(R).unwrap().lag_bytes == Some(900)
    })
    .await;
    assert!(c.replicas_within(100, NO_LIMIT).is_empty());
    replica_lsn.store(1000, Ordering::Relaxed);
    until("the replica caught up", || {
        c.replicas_within(100, NO_LIMIT) == [R]
    })
    .await;
    replica_alive.store(false, Ordering::Relaxed);
    until("the replica is down", || !c.host(R).unwrap().up).await;
    replica_alive.store(true, Ordering::Relaxed);
    until("the replica is back", || c.host(R).unwrap().up).await;
    // A second run has no probes left and returns at once.
    let controller = ShutdownController::new();
    c.run(controller.signal()).await;
    tokio::time::timeout(Duration::from_secs(10), handle.stop())
        .await
        .expect("the monitors stop");
    let after = checks.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        checks.load(Ordering::Relaxed),
        after,
        "no checks after stop"
    );
}
