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

/// A check of server number `server` of cluster 1, out of recovery on `timeline`.
fn primary(server: u8, timeline: u32, lsn: u64) -> Result<ProbeResult, String> {
    primary_of(1, server, timeline, lsn)
}

/// The same of a cluster of system identifier `system_id`.
fn primary_of(system_id: u64, server: u8, timeline: u32, lsn: u64) -> Result<ProbeResult, String> {
    Ok(ProbeResult {
        in_recovery: false,
        lsn: Some(Lsn(lsn)),
        replay_age: None,
        server: Some(ServerIdentity {
            system_id,
            timeline: Some(timeline),
            started: format!("started-{server}"),
        }),
    })
}

/// The first server of cluster 1 on timeline 1.
fn primary_at(lsn: u64) -> Result<ProbeResult, String> {
    primary(0, 1, lsn)
}

fn replica_at(lsn: u64, age: f64) -> Result<ProbeResult, String> {
    Ok(ProbeResult {
        in_recovery: true,
        lsn: Some(Lsn(lsn)),
        replay_age: Some(age),
        server: None,
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
    // The replica is promoted: a new timeline.
    c.record(R, primary(1, 2, 200));
    assert_eq!(c.primary(), Some(R));
    assert_eq!(*changes.borrow_and_update(), Some(R));
    assert_eq!(c.host(R).unwrap().current_role, CurrentRole::Primary);
    assert!(c.replicas_within(0, NO_LIMIT).is_empty());
    // The old primary comes back out of recovery: writes stay with the new one.
    c.record(P, primary(0, 1, 150));
    c.record(P, primary(0, 1, 150));
    assert!(c.host(P).unwrap().up);
    assert_eq!(c.primary(), Some(R));
    assert!(!changes.has_changed().unwrap());
    let old = c.host(P).unwrap();
    assert_eq!(old.timeline, Some(1));
    assert!(
        old.passed_over
            .as_deref()
            .is_some_and(|w| w.starts_with("diverged: on timeline 1")),
        "{old:?}"
    );
    assert_eq!(c.host(R).unwrap().passed_over, None);
    assert_eq!(c.write_refusal(), None);
    // The new primary goes down: the diverged one never takes writes, and writes are
    // refused with the reason (not left to a fall-back).
    c.record(R, fail());
    c.record(R, fail());
    assert_eq!(c.primary(), None);
    let why = c.write_refusal().expect("writes are refused");
    assert!(
        why.contains("h0:5432 diverged: on timeline 1, behind timeline 2 of h1:5432"),
        "{why}"
    );
    // Back: the new primary again, no refusal.
    c.record(R, primary(1, 2, 300));
    c.record(R, primary(1, 2, 300));
    assert_eq!(c.primary(), Some(R));
    assert_eq!(c.write_refusal(), None);
}

#[test]
fn after_a_restart_the_newest_timeline_wins_whichever_host_answers_first() {
    // Old primary (timeline 1) and the promoted node (timeline 2) are both up when
    // pgtide starts: no matter the configured order nor the order of the answers, the
    // promoted one takes writes, and nothing is chosen before both have answered.
    for roles in [
        [HostRole::Primary, HostRole::Replica],
        [HostRole::Auto, HostRole::Auto],
        [HostRole::Replica, HostRole::Primary],
    ] {
        for old_first in [true, false] {
            let (old, new) = (HostId(0), HostId(1));
            let c = cluster(&roles);
            let mut answers = [(old, primary(0, 1, 500)), (new, primary(1, 2, 400))];
            if !old_first {
                answers.reverse();
            }
            let [(first, a), (second, b)] = answers;
            c.record(first, a);
            assert_eq!(
                c.primary(),
                None,
                "{roles:?}: nothing chosen before every host answered"
            );
            c.record(second, b);
            assert_eq!(c.primary(), Some(new), "{roles:?} old first: {old_first}");
            assert!(c.host(old).unwrap().passed_over.is_some());
            assert_eq!(c.write_refusal(), None);
        }
    }
}

#[test]
fn a_host_that_never_answers_delays_the_choice_until_it_is_down() {
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, primary_at(100));
    assert_eq!(c.primary(), None);
    c.record(R, fail());
    assert_eq!(c.primary(), None, "one failure: still unknown");
    c.record(R, fail());
    assert_eq!(
        c.primary(),
        Some(P),
        "down: it cannot be a newer primary now"
    );
    // A primary that stays keeps its place while another host is unknown.
    let c = cluster(&[HostRole::Primary, HostRole::Replica, HostRole::Replica]);
    c.record(P, primary_at(100));
    c.record(R, replica_at(100, 0.0));
    c.record(HostId(2), fail());
    c.record(HostId(2), fail());
    assert_eq!(c.primary(), Some(P));
}

#[test]
fn primaries_pgtide_cannot_order_take_no_writes() {
    // Split brain: two servers of one cluster on the same timeline.
    let c = cluster(&[HostRole::Auto, HostRole::Auto]);
    c.record(P, primary(0, 2, 100));
    c.record(R, primary(1, 2, 100));
    assert_eq!(c.primary(), None);
    let why = c.write_refusal().expect("refused");
    assert!(
        why.contains("h0:5432 and h1:5432 are all out of recovery on timeline 2"),
        "{why}"
    );
    assert!(c.snapshot().iter().all(|h| h
        .passed_over
        .as_deref()
        .is_some_and(|w| w.starts_with("conflict: "))));
    // One is demoted: the other takes writes.
    c.record(R, replica_at(100, 0.0));
    assert_eq!(c.primary(), Some(P));
    assert_eq!(c.write_refusal(), None);
    assert!(c.snapshot().iter().all(|h| h.passed_over.is_none()));

    // Two clusters made by different initdb runs.
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, primary_of(1, 0, 1, 100));
    c.record(R, primary_of(2, 1, 3, 100));
    assert_eq!(c.primary(), None);
    let why = c.write_refusal().expect("refused");
    assert!(
        why.contains("different clusters (system identifiers 1, 2)"),
        "{why}"
    );

    // A server that does not say which timeline it is on cannot be ordered.
    let c = cluster(&[HostRole::Primary, HostRole::Replica]);
    c.record(P, primary_at(100));
    c.record(
        R,
        Ok(ProbeResult {
            in_recovery: false,
            lsn: Some(Lsn(1)),
            replay_age: None,
            server: None,
        }),
    );
    assert_eq!(c.primary(), None);
    assert!(c
        .write_refusal()
        .unwrap()
        .contains("did not report its timeline"));
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
    // Two entries naming one server (same system identifier and start time).
    let c = cluster(&[HostRole::Auto, HostRole::Primary]);
    c.record(HostId(1), primary_at(1));
    c.record(HostId(0), primary_at(1));
    assert_eq!(c.primary(), Some(HostId(1)));
    assert_eq!(c.write_refusal(), None);
    // Among equals, the first configured; chosen fresh only when there is none.
    let c = cluster(&[HostRole::Replica, HostRole::Auto, HostRole::Auto]);
    c.record(HostId(0), primary_at(1));
    c.record(HostId(1), fail());
    c.record(HostId(1), fail());
    c.record(HostId(2), replica_at(1, 0.0));
    assert_eq!(c.primary(), Some(HostId(0)));
    c.record(HostId(1), primary_at(1));
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
