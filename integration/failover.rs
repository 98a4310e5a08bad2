//! Failover on real servers: an old primary that comes back out of recovery after its
//! replica was promoted never takes writes, whichever host a (re)started pgtide hears
//! from first; primaries pgtide cannot order take none at all, and it says so.

use std::sync::Arc;
use std::time::Duration;

use pgtide::config::{ConfigDuration, Database, HostConfig, HostRole};
use pgtide::demo::LocalCluster;
use tokio_postgres::SimpleQueryMessage;

use crate::cluster::pg_ctl;
use crate::harness::{self, to, APP_PASSWORD, APP_USER};
use crate::routing::{blocking, own_cluster};

/// A pgtide in front of the hosts on `ports` (in that order, all `auto`), with fast
/// health checks and `app` as an admin.
async fn pgtide_for(ports: &[u16]) -> pgtide::Pooler {
    let mut config = harness::config_for("rt");
    *config.databases.get_mut("rt").expect("rt") = Database {
        hosts: Some(
            ports
                .iter()
                .map(|&port| HostConfig {
                    host: "127.0.0.1".into(),
                    port,
                    role: HostRole::Auto,
                    weight: 1,
                })
                .collect(),
        ),
        ..Database::default()
    };
    config.pgtide.health_check_interval = ConfigDuration(Duration::from_millis(100));
    config.pgtide.health_check_timeout = ConfigDuration::secs(5);
    config.pgtide.admin_users = vec![APP_USER.to_string()];
    harness::start_pgtide(config).await
}

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// SHOW HOSTS' `port`, `timeline` and `writes_refused`, per host of `rt`.
async fn hosts(pooler: &pgtide::Pooler) -> Vec<(String, Option<String>, Option<String>)> {
    let console = harness::app_at(pooler.local_addr(), "pgtide").await;
    let msgs = to("SHOW HOSTS", console.simple_query("SHOW HOSTS"))
        .await
        .expect("SHOW HOSTS");
    let SimpleQueryMessage::Row(first) = msgs
        .iter()
        .find(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .expect("a host row")
    else {
        unreachable!()
    };
    let col = |name: &str| {
        first
            .columns()
            .iter()
            .position(|c| c.name() == name)
            .unwrap_or_else(|| panic!("SHOW HOSTS has no {name} column"))
    };
    let (port, timeline, refused) = (col("port"), col("timeline"), col("writes_refused"));
    rows(&msgs)
        .into_iter()
        .map(|r| {
            (
                r[port].clone().unwrap_or_default(),
                r[timeline].clone(),
                r[refused].clone(),
            )
        })
        .collect()
}

/// The PID of the postmaster of `name` (`primary` or `replica`).
fn postmaster(lc: &LocalCluster, name: &str) -> i32 {
    let text =
        std::fs::read_to_string(lc.dir.join(name).join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a PID on the first line")
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the PID is a postmaster of ours.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Stops the primary, promotes the replica (a new timeline), and starts the old primary
/// again: it comes back out of recovery, on the old timeline. Returns (old, new) ports.
async fn diverge(lc: &Arc<LocalCluster>) -> (u16, u16) {
    let (old, new) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let l = lc.clone();
    blocking(move || {
        l.psql(old, "rt", "CREATE TABLE w (v int)").expect("table");
        l.wait_replica_caught_up().expect("caught up");
        // The restarted server must come back on its own port, with no other cluster
        // starting meanwhile (see harness::CLUSTER_PORTS).
        let _ports = harness::CLUSTER_PORTS.blocking_lock();
        pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"]);
        pg_ctl(&l, "replica", &["-w", "-t", "60", "promote"]);
        crate::cluster::pg_ctl_start(&l, "primary");
        // The old primary takes a write the promoted node never sees: it has diverged.
        l.psql(old, "rt", "INSERT INTO w VALUES (-1)")
            .expect("diverging write");
    })
    .await;
    for port in [old, new] {
        let l = lc.clone();
        let out = blocking(move || l.psql(port, "rt", "SELECT pg_is_in_recovery()")).await;
        assert_eq!(out.expect("psql").trim(), "f", "{port} is out of recovery");
    }
    (old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_never_reach_the_old_primary_whichever_host_answers_first() {
    let lc = own_cluster().await;
    let (old, new) = diverge(&lc).await;
    let (old_pm, new_pm) = (postmaster(&lc, "primary"), postmaster(&lc, "replica"));
    // Each pgtide start: the two configured orders, and either host answering its first
    // health check 1.5 s after the other (its postmaster stopped meanwhile).
    for (order, late) in [
        ([old, new], new_pm),
        ([old, new], old_pm),
        ([new, old], new_pm),
        ([new, old], old_pm),
    ] {
        signal(late, libc::SIGSTOP);
        let pooler = pgtide_for(&order).await;
        // A thread, so that the server is resumed even if the test fails meanwhile.
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            signal(late, libc::SIGCONT);
        });
        let what = format!("hosts {order:?}, postmaster {late} late");
        let c = harness::app_at(pooler.local_addr(), "rt").await;
        for i in 0..10 {
            let msgs = to(
                "write",
                c.simple_query(&format!(
                    "INSERT INTO w VALUES ({i}) RETURNING inet_server_port()"
                )),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: write {i}: {e:?}"));
            assert_eq!(
                rows(&msgs)[0][0].as_deref(),
                Some(new.to_string().as_str()),
                "{what}: write {i} went to the promoted node"
            );
        }
        blocking(move || resume.join()).await.expect("SIGCONT");
        let hosts = hosts(&pooler).await;
        let row = |port: u16| {
            hosts
                .iter()
                .find(|h| h.0 == port.to_string())
                .unwrap_or_else(|| panic!("{what}: no SHOW HOSTS row for {port}: {hosts:?}"))
        };
        assert_eq!(row(old).1.as_deref(), Some("1"), "{what}: {hosts:?}");
        assert_eq!(row(new).1.as_deref(), Some("2"), "{what}: {hosts:?}");
        assert!(
            row(old)
                .2
                .as_deref()
                .is_some_and(|w| w.starts_with("diverged: on timeline 1")),
            "{what}: the old primary is shown as diverged: {hosts:?}"
        );
        assert_eq!(row(new).2, None, "{what}: {hosts:?}");
        pooler.shutdown();
        pooler.wait().await;
    }
    // Not one of the 40 writes reached the old primary.
    let l = lc.clone();
    let on_old = blocking(move || l.psql(old, "rt", "SELECT count(*) FROM w WHERE v >= 0")).await;
    assert_eq!(on_old.expect("psql").trim(), "0");
    let l = lc.clone();
    let on_new = blocking(move || l.psql(new, "rt", "SELECT count(*) FROM w")).await;
    assert_eq!(on_new.expect("psql").trim(), "40");

    // The promoted node stops: the old one, although up and out of recovery, is refused
    // (an ERROR naming the reason; the client keeps its connection).
    let pooler = pgtide_for(&[old, new]).await;
    let c = harness::app_at(pooler.local_addr(), "rt").await;
    let msgs = to(
        "write",
        c.simple_query("INSERT INTO w VALUES (100) RETURNING inet_server_port()"),
    )
    .await
    .expect("write");
    assert_eq!(rows(&msgs)[0][0].as_deref(), Some(new.to_string().as_str()));
    let l = lc.clone();
    blocking(move || {
        // Stopped for good: no restart on this port follows.
        pg_ctl(&l, "replica", &["-m", "fast", "-w", "stop"]);
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        match to("write", c.simple_query("INSERT INTO w VALUES (101)")).await {
            Err(e) => {
                let db = e
                    .as_db_error()
                    .map(|d| (d.code().code().to_string(), d.message().to_string()));
                if let Some((code, message)) = db {
                    if message.contains("refuses") {
                        break (code, message);
                    }
                }
            }
            Ok(_) => panic!("a write succeeded with only the diverged primary up"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes were never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(err.0, "08001", "{err:?}");
    assert!(
        err.1.contains("diverged: on timeline 1, behind timeline 2"),
        "{err:?}"
    );
    let msgs = to("SELECT", c.simple_query("SELECT 1")).await;
    assert!(
        msgs.is_err() && !c.is_closed(),
        "reads on the primary are refused too, and the client stays: {msgs:?}"
    );
    let l = lc.clone();
    let on_old = blocking(move || l.psql(old, "rt", "SELECT count(*) FROM w WHERE v >= 0")).await;
    assert_eq!(
        on_old.expect("psql").trim(),
        "0",
        "nothing reached the old primary"
    );
    pooler.shutdown();
    pooler.wait().await;
    let lc = Arc::into_inner(lc).expect("no other owner left");
    blocking(move || drop(lc)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primaries_of_different_clusters_take_no_writes_and_pgtide_says_why() {
    let alone = || {
        harness::own_cluster(pgtide::demo::ClusterOptions {
            users: vec![(APP_USER.to_string(), APP_PASSWORD.to_string(), true)],
            databases: vec!["rt".to_string()],
            with_replica: false,
        })
    };
    let (a, b) = (Arc::new(alone().await), Arc::new(alone().await));
    let pooler = pgtide_for(&[a.primary_port, b.primary_port]).await;
    let c = harness::app_at(pooler.local_addr(), "rt").await;
    let e = to("write", c.simple_query("CREATE TABLE nope (v int)"))
        .await
        .expect_err("writes are refused");
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08001", "{db:?}");
    assert!(
        db.message()
            .contains("belong to different clusters (system identifiers"),
        "{db:?}"
    );
    assert!(!c.is_closed(), "an ERROR, not a FATAL");
    for h in hosts(&pooler).await {
        assert!(
            h.2.as_deref().is_some_and(|w| w.starts_with("conflict: ")),
            "every primary is shown in conflict: {h:?}"
        );
    }
    let samples = crate::metrics::scrape(pooler.metrics_addr().expect("metrics")).await;
    assert_eq!(
        samples.get("pgtide_writes_refused{database=\"rt\"}"),
        Some(&1.0),
        "the metric says it"
    );
    let (status, body) =
        crate::metrics::get(pooler.metrics_addr().expect("metrics"), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("writes refused"), "{body}");
    for lc in [&a, &b] {
        let l = lc.clone();
        let table =
            blocking(move || l.psql(l.primary_port, "rt", "SELECT to_regclass('nope') IS NULL"))
                .await;
        assert_eq!(table.expect("psql").trim(), "t", "nothing was created");
    }
    pooler.shutdown();
    pooler.wait().await;
    drop(c);
    for lc in [a, b] {
        let lc = Arc::into_inner(lc).expect("no other owner left");
        blocking(move || drop(lc)).await;
    }
}
