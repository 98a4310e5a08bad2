//! The health monitor (`pgtide::cluster`) against real streaming replication: roles and
//! lag on the shared cluster (read-only), and replay pauses, a stopped replica and a
//! promotion on a cluster of its own (pausing the shared one would stall every other
//! test's `fresh_database`).

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtide::auth::{SaltedPasswordCache, StoredCredential};
use pgtide::cluster::{Cluster, CurrentRole, HostId, MonitorLogin};
use pgtide::config::{HealthSettings, HostConfig, HostRole};
use pgtide::demo::{ClusterOptions, LocalCluster};

use crate::harness;

const P: HostId = HostId(0);
const R: HostId = HostId(1);
const MIB: u64 = 1024 * 1024;

/// Short intervals: a state change shows within a few hundred milliseconds.
fn fast_health() -> HealthSettings {
    HealthSettings {
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        failures: 2,
        successes: 2,
        backoff_max: Duration::from_millis(400),
    }
}

fn login(db: &str, user: &str, password: &str) -> MonitorLogin {
    MonitorLogin {
        dbname: db.to_string(),
        user: user.to_string(),
        secret: Some(Arc::new(StoredCredential::new(user, password))),
        salted: Arc::new(SaltedPasswordCache::new()),
        max_message: 1 << 20,
        tls: pgtide::tls::ServerTls::disabled(),
    }
}

fn hosts(primary_port: u16, replica_port: u16) -> Vec<HostConfig> {
    [primary_port, replica_port]
        .into_iter()
        .map(|port| HostConfig {
            host: "127.0.0.1".to_string(),
            port,
            role: HostRole::Auto,
            weight: 1,
        })
        .collect()
}

/// Polls `cond` until it holds, for up to 30 s.
async fn eventually(what: &str, cluster: &Cluster, cond: impl Fn(&Cluster) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond(cluster) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; hosts: {:#?}",
            cluster.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs blocking work (psql, pg_ctl) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking work panicked")
}

fn is_primary_up(c: &Cluster, id: HostId) -> bool {
    c.primary() == Some(id)
        && c.host(id)
            .is_some_and(|h| h.up && h.current_role == CurrentRole::Primary)
}

fn is_replica_up(c: &Cluster, id: HostId) -> bool {
    c.host(id)
        .is_some_and(|h| h.up && h.current_role == CurrentRole::Replica)
}

async fn with_deadline<F: Future>(what: &str, f: F) -> F::Output {
    harness::to(what, f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_lag_on_the_shared_cluster() {
    let shared = harness::cluster();
    let cluster = Cluster::with_login(
        "app",
        hosts(shared.primary_port, harness::replica_port()),
        fast_health(),
        &login(harness::APP_DB, harness::APP_USER, harness::APP_PASSWORD),
    );
    let monitor = cluster.spawn();
    eventually("the primary is found", &cluster, |c| is_primary_up(c, P)).await;
    eventually("the replica is up", &cluster, |c| is_replica_up(c, R)).await;
    let s = cluster.snapshot();
    assert!(s[0].replay_lsn.is_some());
    assert_eq!(s[0].lag_bytes, None, "a primary has no lag");
    blocking(harness::wait_replica_caught_up).await;
    // Other tests write meanwhile: "about zero" is well within the default limits.
    eventually("the replica is within the lag limits", &cluster, |c| {
        c.replicas_within(16 * MIB, Duration::from_secs(10)) == [R]
    })
    .await;
    let r = cluster.host(R).unwrap();
    assert!(r.lag_bytes.is_some() && r.lag_seconds.is_some(), "{r:#?}");
    assert_eq!(r.consecutive_failures, 0);
    assert!(r.last_error.is_none());
    with_deadline("monitor stop", monitor.stop()).await;
}

/// `pg_ctl <args> -D <dir>/<name>` as the owner of the data directory (the `postgres` OS
/// user when we are root, as `LocalCluster` runs the servers).
pub(crate) fn pg_ctl(lc: &LocalCluster, name: &str, args: &[&str]) {
    let data = lc.dir.join(name);
    let mut cmd = Command::new(lc.bindir().join("pg_ctl"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(&lc.dir)
        .arg("-D")
        .arg(&data)
        .args(args)
        .stdin(Stdio::null());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let meta = std::fs::metadata(&data).expect("data directory");
        cmd.uid(meta.uid()).gid(meta.gid()).env("HOME", &lc.dir);
    }
    let out = cmd.output().expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {args:?} on {name} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Starts the stopped server `name` (`primary` or `replica`) again, on its port and with
/// its log file.
pub(crate) fn pg_ctl_start(lc: &LocalCluster, name: &str) {
    let log = lc.log_path(name == "replica");
    let log = log.to_str().expect("utf-8 path").to_string();
    pg_ctl(lc, name, &["-l", &log, "-w", "-t", "60", "start"]);
}

fn psql(lc: &Arc<LocalCluster>, port: u16, sql: &str) -> String {
    lc.psql(port, "mon", sql)
        .unwrap_or_else(|e| panic!("psql on {port}: {sql}\n{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_outage_and_promotion_on_a_cluster_of_its_own() {
    let lc = harness::own_cluster(ClusterOptions {
        users: vec![("mon".to_string(), "monpass".to_string(), true)],
        databases: vec!["mon".to_string()],
        with_replica: true,
    })
    .await;
    let lc = Arc::new(lc);
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let cluster = Cluster::with_login(
        "mon",
        hosts(pport, rport),
        fast_health(),
        &login("mon", "mon", "monpass"),
    );
    let monitor = cluster.spawn();
    eventually("the primary is found", &cluster, |c| is_primary_up(c, P)).await;
    eventually("the replica is up", &cluster, |c| is_replica_up(c, R)).await;
    eventually("the replica has caught up", &cluster, |c| {
        c.replicas_within(MIB, Duration::ZERO) == [R]
    })
    .await;

    // Replay paused, ~13 MB written on the primary: the replica falls behind.
    let l = lc.clone();
    blocking(move || {
        psql(&l, rport, "SELECT pg_wal_replay_pause()");
        psql(
            &l,
            pport,
            "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 100000) g",
        );
    })
    .await;
    eventually("the replica lags by more than 1 MiB", &cluster, |c| {
        c.host(R).unwrap().lag_bytes.is_some_and(|b| b > MIB)
    })
    .await;
    assert!(cluster.replicas_within(MIB, Duration::ZERO).is_empty());
    assert!(
        is_replica_up(&cluster, R),
        "a lagging replica is still up, only not within the limit"
    );
    assert_eq!(cluster.replicas_within(0, Duration::ZERO), [R]);

    let l = lc.clone();
    blocking(move || psql(&l, rport, "SELECT pg_wal_replay_resume()")).await;
    eventually("the replica catches up", &cluster, |c| {
        c.replicas_within(MIB, Duration::ZERO) == [R]
    })
    .await;

    // The replica stops: marked down; started again: back up.
    let l = lc.clone();
    blocking(move || pg_ctl(&l, "replica", &["-m", "fast", "-w", "stop"])).await;
    eventually("the stopped replica is down", &cluster, |c| {
        !c.host(R).unwrap().up
    })
    .await;
    assert!(cluster.replicas_within(0, Duration::ZERO).is_empty());
    assert!(cluster.host(R).unwrap().last_error.is_some());
    assert_eq!(cluster.primary(), Some(P), "the primary is unaffected");
    let l = lc.clone();
    blocking(move || {
        pg_ctl_start(&l, "replica");
    })
    .await;
    eventually("the restarted replica is up", &cluster, |c| {
        is_replica_up(c, R)
    })
    .await;

    // The primary stops: no primary; the replica is promoted: it becomes the primary.
    let mut changes = cluster.primary_changes();
    changes.borrow_and_update();
    let l = lc.clone();
    blocking(move || pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"])).await;
    eventually("the stopped primary is gone", &cluster, |c| {
        c.primary().is_none() && !c.host(P).unwrap().up
    })
    .await;
    with_deadline("the primary change is announced", changes.changed())
        .await
        .unwrap();
    let l = lc.clone();
    blocking(move || pg_ctl(&l, "replica", &["-w", "-t", "60", "promote"])).await;
    eventually("the promoted replica is the primary", &cluster, |c| {
        is_primary_up(c, R)
    })
    .await;
    assert_eq!(*changes.borrow_and_update(), Some(R));
    assert!(cluster.replicas_within(0, Duration::ZERO).is_empty());

    with_deadline("monitor stop", monitor.stop()).await;
    let lc = Arc::into_inner(lc).expect("no other owner left");
    blocking(move || drop(lc)).await;
}
