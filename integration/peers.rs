//! Several pgtide processes as one pooler: `so_reuseport` on one port, cancel requests
//! forwarded to the peer that handed out the key, and rolling restarts without failed
//! transactions (real processes, pgbench and a client that reconnects).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::cli::{free_addr, ChildGuard};
use crate::harness::{self, to};

/// A pgtide config for `db` on `listen` (shared, SO_REUSEPORT), as peer `id` of the
/// peers at `peers` (their `peer_listen` addresses, by id from 1).
fn peer_config(
    db: &str,
    listen: SocketAddr,
    id: u32,
    peers: &[SocketAddr],
) -> pgtide::config::Config {
    let mut c = harness::config_for(db);
    c.pgtide.listen = listen;
    c.pgtide.so_reuseport = true;
    c.pgtide.peer_id = id;
    c.pgtide.peer_listen = peers[id as usize - 1].to_string();
    c.pgtide.peers = peers
        .iter()
        .enumerate()
        .map(|(i, a)| ((i + 1).to_string(), a.to_string()))
        .collect();
    c.pgtide.pool_size = 60;
    c
}

/// Clients of `db` that a pgtide's metrics count (all states).
async fn clients_of(pooler: &pgtide::Pooler, db: &str) -> f64 {
    let samples = crate::metrics::scrape(pooler.metrics_addr().expect("metrics")).await;
    samples
        .iter()
        .filter(|(k, _)| {
            k.starts_with("pgtide_clients{") && k.contains(&format!("database=\"{db}\""))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Backends of `db` running `pg_sleep` on the primary.
fn sleeping(db: &str) -> usize {
    let out = harness::psql(
        harness::primary_port(),
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        ),
    );
    out.trim().parse().expect("a count")
}

async fn until_sleeping(db: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let db2 = db.to_string();
        let now = crate::routing::blocking(move || sleeping(&db2)).await;
        if now >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {now} of {n} queries started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_process_that_runs_the_query() {
    let db = harness::fresh_database("peers_cancel");
    let listen = free_addr();
    let peers = [free_addr(), free_addr()];
    let one = harness::start_pgtide(peer_config(&db, listen, 1, &peers)).await;
    let two = harness::start_pgtide(peer_config(&db, listen, 2, &peers)).await;
    assert_eq!(one.local_addr(), listen);
    assert_eq!(two.local_addr(), listen);

    // 200 queries in waves of 40, each cancelled from a fresh connection to the shared
    // port (which process takes it is the kernel's choice).
    let mut slowest = Duration::ZERO;
    let mut latencies = Vec::new();
    let (mut on_one, mut on_two) = (0.0, 0.0);
    for wave in 0..5 {
        let mut clients = Vec::new();
        for _ in 0..40 {
            clients.push(std::sync::Arc::new(harness::app_at(listen, &db).await));
        }
        let (a, b) = (clients_of(&one, &db).await, clients_of(&two, &db).await);
        assert_eq!(
            a + b,
            40.0,
            "wave {wave}: every client is on one of the two"
        );
        on_one += a;
        on_two += b;
        let mut running = Vec::new();
        for c in &clients {
            let token = c.cancel_token();
            let c = c.clone();
            running.push((
                token,
                tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await }),
            ));
        }
        until_sleeping(&db, 40).await;
        let cancelled_at = Instant::now();
        for (token, _) in &running {
            to("cancel", token.cancel_query(NoTls))
                .await
                .expect("cancel sent");
        }
        for (i, (_, q)) in running.into_iter().enumerate() {
            let r = to("cancelled query", q).await.expect("query task");
            let e = r.expect_err("the query was cancelled");
            assert_eq!(
                e.code(),
                Some(&SqlState::QUERY_CANCELED),
                "wave {wave}, query {i}: {e:?}"
            );
            slowest = slowest.max(cancelled_at.elapsed());
            latencies.push(cancelled_at.elapsed());
        }
    }
    assert!(
        on_one > 0.0 && on_two > 0.0,
        "the kernel spread the clients over both processes ({on_one} and {on_two})"
    );
    latencies.sort();
    // For the record (cargo test -- --nocapture): from a wave's first cancel to each end.
    eprintln!(
        "cancel to 57014 over {} queries: median {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        slowest
    );
    assert!(
        slowest < Duration::from_secs(1),
        "every query ended within a second of its cancel (slowest: {slowest:?})"
    );

    // A forged key and a stale key cancel nothing.
    let c = std::sync::Arc::new(harness::app_at(listen, &db).await);
    let gone = harness::app_at(listen, &db).await;
    let stale = gone.cancel_token();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let q = {
        let c = c.clone();
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(1.5)").await })
    };
    until_sleeping(&db, 1).await;
    to("stale cancel", stale.cancel_query(NoTls))
        .await
        .expect("sent");
    for _ in 0..20 {
        // Random keys, half of them carrying a peer's id in the secret.
        let mut raw = crate::rawpg::RawPg::connect(listen).await;
        let secret = rand::random::<i32>();
        let secret = if rand::random::<bool>() {
            (secret & !0x3fff) | 2
        } else {
            secret
        };
        let mut packet = crate::rawpg::be_i32(16);
        packet.extend(crate::rawpg::be_i32(80_877_102));
        packet.extend(crate::rawpg::be_i32(rand::random::<i32>() & 0x3fff_ffff));
        packet.extend(crate::rawpg::be_i32(secret));
        raw.send(&packet).await;
        let _ = raw.until_eof().await;
    }
    to("query", q)
        .await
        .expect("task")
        .expect("neither a stale nor a forged key cancelled the query");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    one.shutdown();
    two.shutdown();
    one.wait().await;
    two.wait().await;
}

/// `net.ipv4.tcp_migrate_req`, set for the test and put back after it: connections
/// queued on a closing SO_REUSEPORT listener move to another one instead of being reset
/// (what the README tells operators to set).
struct MigrateReq(Option<String>);

impl MigrateReq {
    const PATH: &'static str = "/proc/sys/net/ipv4/tcp_migrate_req";

    fn on() -> MigrateReq {
        let old = std::fs::read_to_string(Self::PATH).ok();
        std::fs::write(Self::PATH, "1").unwrap_or_else(|e| {
            panic!(
                "cannot set {} (run the tests as root on Linux 5.14 or later): {e}",
                Self::PATH
            )
        });
        MigrateReq(old)
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(Self::PATH, old.trim());
        }
    }
}

/// A pgtide process with `config` written to `dir/name.toml`.
fn spawn_pgtide(dir: &std::path::Path, name: &str, config: &pgtide::config::Config) -> ChildGuard {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(config).expect("serialize")).expect("write config");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgtide"));
    cmd.arg("--config").arg(&path).env("PGTIDE_LOG", "info");
    ChildGuard::spawn(cmd, name, false)
}

/// SIGTERM, then a new process with the same configuration in its place.
fn restart(
    p: &mut ChildGuard,
    dir: &std::path::Path,
    name: &str,
    config: &pgtide::config::Config,
    peer: SocketAddr,
) {
    p.signal(libc::SIGTERM);
    let status = p
        .wait_timeout(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{name} did not exit after SIGTERM:\n{}", p.stderr_text()));
    assert!(
        status.success(),
        "{name} exited with {status}:\n{}",
        p.stderr_text()
    );
    *p = spawn_pgtide(dir, name, config);
    p.wait_accepting(peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_fail_no_transaction() {
    let _migrate = MigrateReq::on();
    let db = harness::fresh_database("peers_roll");
    harness::psql(
        harness::primary_port(),
        &db,
        "CREATE TABLE roll (i int PRIMARY KEY); GRANT ALL ON roll TO PUBLIC",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = free_addr();
    let peers = [free_addr(), free_addr()];
    let configs: Vec<_> = (1..=2)
        .map(|id| {
            let mut c = peer_config(&db, listen, id, &peers);
            c.pgtide.shutdown_delay = pgtide::config::ConfigDuration(Duration::from_millis(300));
            c.pgtide.shutdown_timeout = pgtide::config::ConfigDuration::secs(10);
            c.pgtide.pool_size = 10;
            c
        })
        .collect();
    let mut procs: Vec<ChildGuard> = (0..2)
        .map(|i| spawn_pgtide(dir.path(), &format!("pgtide{}", i + 1), &configs[i]))
        .collect();
    for (p, peer) in procs.iter_mut().zip(peers) {
        p.wait_accepting(peer);
    }

    // pgbench -C: a new connection for every transaction, for 10 s.
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").expect("script");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=pgtide_trust dbname={db}",
        listen.port()
    );
    let pgbench = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-C",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            "10",
            "--failures-detailed",
            "-f",
        ])
        .arg(&script)
        .arg(&conninfo)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pgbench (apt-get install postgresql-client)");

    // A client that keeps its connection and reconnects when told 57P01: each insert
    // either commits once or is not run at all (and is sent again).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, db) = (stop.clone(), db.clone());
        tokio::spawn(async move {
            let (mut done, mut reconnects, mut failed) = (0i32, 0, Vec::new());
            let mut c = harness::app_at(listen, &db).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c
                    .simple_query(&format!("INSERT INTO roll VALUES ({done})"))
                    .await
                {
                    Ok(_) => done += 1,
                    Err(e) if e.code() == Some(&SqlState::ADMIN_SHUTDOWN) || c.is_closed() => {
                        reconnects += 1;
                        c = harness::app_at(listen, &db).await;
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (done, reconnects, failed)
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..2 {
        let (dir, name, config, peer) = (
            dir.path().to_path_buf(),
            format!("pgtide{}", i + 1),
            configs[i].clone(),
            peers[i],
        );
        let mut p = procs.remove(0);
        p = crate::routing::blocking(move || {
            restart(&mut p, &dir, &name, &config, peer);
            p
        })
        .await;
        procs.push(p);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let out = crate::routing::blocking(move || pgbench.wait_with_output())
        .await
        .expect("pgbench");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (done, reconnects, failed) = to("writer", writer).await.expect("writer task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("aborted") && stdout.contains("number of failed transactions: 0"),
        "pgbench -C across two rolling restarts:\n{stdout}\n{stderr}\n--- pgtide1:\n{}\n--- pgtide2:\n{}",
        procs[0].stderr_text(),
        procs[1].stderr_text()
    );
    eprintln!(
        "rolling restarts: pgbench -C {}; the reconnecting client committed {done} with {reconnects} reconnects",
        stdout
            .lines()
            .filter(|l| l.starts_with("number of") || l.starts_with("tps"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(
        failed.is_empty(),
        "the reconnecting client's failed transactions: {failed:?}"
    );
    assert!(
        reconnects >= 1,
        "the reconnecting client was told 57P01 at least once"
    );
    assert!(done > 100, "the reconnecting client committed {done}");
    let rows = harness::psql(
        harness::primary_port(),
        &db,
        "SELECT count(*), count(DISTINCT i) FROM roll",
    );
    assert_eq!(
        rows.trim(),
        format!("{done}|{done}"),
        "every commit once, none lost"
    );
}

/// `shutdown_delay`: from the shutdown's start, `/readyz` answers 503 while clients are
/// still accepted and served; after the delay pgtide stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_shutdown_delay_readyz_fails_and_clients_are_still_served() {
    let (db, pooler, addr) = harness::setup("peers_delay", |c| {
        c.pgtide.shutdown_delay = pgtide::config::ConfigDuration(Duration::from_millis(1500));
    })
    .await;
    let maddr = pooler.metrics_addr().expect("metrics");
    assert_eq!(crate::metrics::get(maddr, "/readyz").await.0, 200);
    let idle = harness::app_at(addr, &db).await;
    let started = Instant::now();
    pooler.shutdown();
    let (status, body) = crate::metrics::get(maddr, "/readyz").await;
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: pgtide is shutting down")
    );
    // Within the delay: new clients get in and run queries, connected ones too.
    let fresh = harness::app_at(addr, &db).await;
    for c in [&fresh, &idle] {
        to("query", c.simple_query("SELECT 1"))
            .await
            .expect("served during the delay");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the checks took too long to mean anything"
    );
    // After it: no longer accepting, and the idle clients are told 57P01.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting 10 s after the delay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "stopped accepting before the delay was over"
    );
    let e = to("query", idle.simple_query("SELECT 1"))
        .await
        .expect_err("told to leave");
    assert!(
        e.code() == Some(&SqlState::ADMIN_SHUTDOWN) || idle.is_closed(),
        "{e:?}"
    );
    pooler.wait().await;
}
