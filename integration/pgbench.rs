//! pgbench through pgtide: initialisation, select-only and TPC-B workloads in the simple
//! and extended protocols with 50 clients on a pool of 5, and pgbench's balance invariant
//! afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness;

/// Seconds each pgbench run lasts.
const RUN_SECONDS: u32 = 4;
/// A pgbench run that has not ended after this long is killed and the test fails.
const PGBENCH_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs pgbench as app/apppass against `port` on 127.0.0.1 with `args`; returns
/// (success, stdout, stderr). Killed (by PID, through `kill_on_drop`) on timeout.
pub(crate) async fn pgbench(port: u16, db: &str, args: &[&str]) -> (bool, String, String) {
    pgbench_env(port, db, args, &[]).await
}

/// [`pgbench`] with extra environment variables (e.g. `PGSSLMODE`).
pub(crate) async fn pgbench_env(
    port: u16,
    db: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let child = tokio::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg(db)
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "30")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run pgbench");
    let out = tokio::time::timeout(PGBENCH_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("pgbench {args:?} did not finish within {PGBENCH_TIMEOUT:?}"))
        .expect("pgbench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgbench -i -s 2` through `port`; panics on failure.
pub(crate) async fn init(port: u16, db: &str) {
    let (ok, out, err) = pgbench(port, db, &["-i", "-s", "2", "-q"]).await;
    assert!(ok, "pgbench -i failed:\n{out}\n{err}");
}

/// One timed run of `seconds` with 50 clients through pgtide; asserts success, no failed
/// or aborted transactions, and some processed ones. Returns the number processed.
pub(crate) async fn run(
    addr: SocketAddr,
    db: &str,
    mode: &str,
    seconds: u32,
    select_only: bool,
) -> u64 {
    run_env(addr, db, mode, seconds, select_only, &[]).await
}

/// [`run`] with extra environment variables for pgbench (e.g. `PGSSLMODE`).
pub(crate) async fn run_env(
    addr: SocketAddr,
    db: &str,
    mode: &str,
    seconds: u32,
    select_only: bool,
    env: &[(&str, &str)],
) -> u64 {
    let t = seconds.to_string();
    let mut args = vec!["-c", "50", "-j", "2", "-T", &t, "-M", mode, "-n"];
    if select_only {
        args.push("-S");
    }
    let what = format!("pgbench {}", args.join(" "));
    let (ok, out, err) = pgbench_env(addr.port(), db, &args, env).await;
    assert!(ok, "{what} exited with failure:\n{out}\n{err}");
    assert!(
        !out.contains("aborted") && !err.contains("aborted"),
        "{what}: clients aborted:\n{out}\n{err}"
    );
    if let Some(line) = out
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
    {
        assert!(
            line.starts_with("number of failed transactions: 0 "),
            "{what}: {line}\n{out}\n{err}"
        );
    }
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{what}: no transaction count in the output:\n{out}\n{err}"));
    assert!(processed > 0, "{what} processed nothing:\n{out}\n{err}");
    processed
}

fn config_pool_5(db: &str) -> pgtide::config::Config {
    let mut cfg = harness::config_for(db);
    cfg.pgtide.pool_size = 5;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_init_and_select_only_through_pgtide() {
    let db = harness::fresh_database("pgbench_select");
    let pooler = harness::start_pgtide(config_pool_5(&db)).await;
    let addr = pooler.local_addr();

    // Initialisation through pgtide too: DDL, COPY FROM STDIN, VACUUM.
    init(addr.port(), &db).await;
    assert_eq!(
        harness::psql(
            harness::primary_port(),
            &db,
            "SELECT count(*) FROM pgbench_accounts"
        ),
        "200000"
    );

    run(addr, &db, "simple", RUN_SECONDS, true).await;
    run(addr, &db, "extended", RUN_SECONDS, true).await;

    // pgtide kept to its pool size.
    let n: u32 = harness::psql(
        harness::primary_port(),
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
    )
    .parse()
    .unwrap();
    assert!(n <= 5, "{n} server connections for pool_size 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_simple_and_extended_keep_the_balances() {
    let db = harness::fresh_database("pgbench_tpcb");
    init(harness::primary_port(), &db).await;
    let pooler = harness::start_pgtide(config_pool_5(&db)).await;
    let addr = pooler.local_addr();

    let simple = run(addr, &db, "simple", RUN_SECONDS, false).await;
    let extended = run(addr, &db, "extended", RUN_SECONDS, false).await;

    check_balances(&db, simple + extended);
}

/// pgbench's invariant, checked on the primary: every committed transaction updated one
/// account, one teller and one branch by the delta it logged in the history, and left
/// exactly one history row (`transactions` of them in all).
pub(crate) fn check_balances(db: &str, transactions: u64) {
    let sums = harness::psql(
        harness::primary_port(),
        db,
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts) || ' ' || \
                (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers) || ' ' || \
                (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches) || ' ' || \
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    let sums: Vec<&str> = sums.split(' ').collect();
    assert_eq!(sums.len(), 4, "{sums:?}");
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "balance invariant broken (accounts, tellers, branches, history): {sums:?}"
    );
    let history: u64 = harness::psql(
        harness::primary_port(),
        db,
        "SELECT count(*) FROM pgbench_history",
    )
    .parse()
    .expect("a count");
    assert_eq!(
        history, transactions,
        "history rows vs transactions pgbench reported"
    );
}
