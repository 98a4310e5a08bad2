//! Driver matrix: real client drivers (psycopg 3, asyncpg, node-postgres, pgjdbc) through
//! pgtide in transaction mode with `pool_size = 2`, each using its own prepared-statement
//! cache from ≥ 20 concurrent connections. The client programs live in
//! `integration/drivers/`; each checks its results and prints one `OK <driver>` line.
//!
//! The runtimes come from `scripts/deps.sh` (a venv at `.venv-drivers/`, `node_modules`
//! in `integration/drivers/`, `/usr/share/java/postgresql.jar` and a JDK). A missing
//! runtime fails the test with a message saying so; it never passes silently.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgtide::config::ConfigDuration;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::harness::{self, APP_PASSWORD, APP_USER};

/// How long one driver program may run before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// The pool size every driver is squeezed through.
const POOL_SIZE: u32 = 2;
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn drivers_dir() -> PathBuf {
    root().join("integration").join("drivers")
}

fn missing(what: &str) -> ! {
    panic!(
        "driver runtime missing: {what}. Run `scripts/deps.sh` (it installs the Python venv \
         .venv-drivers/ with psycopg and asyncpg, node-postgres in integration/drivers/, \
         and pgjdbc with a JDK)"
    )
}

/// Runs `cmd args` to completion (for runtime checks); true when it exits 0.
fn runs(cmd: &Path, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The venv's python, checked to import `module`.
fn python_with(module: &str) -> PathBuf {
    let py = root().join(".venv-drivers").join("bin").join("python");
    if !py.exists() {
        missing(&format!("{} does not exist", py.display()));
    }
    if !runs(&py, &["-c", &format!("import {module}")]) {
        missing(&format!("{} cannot import {module}", py.display()));
    }
    py
}

fn node() -> PathBuf {
    let node = PathBuf::from("node");
    if !runs(&node, &["--version"]) {
        missing("`node` is not on PATH");
    }
    let pg = drivers_dir()
        .join("node_modules")
        .join("pg")
        .join("package.json");
    if !pg.exists() {
        missing(&format!("{} does not exist", pg.display()));
    }
    node
}

/// Compiles PgjdbcTest.java into `out`; returns the java classpath to run it with.
async fn compile_pgjdbc(out: &Path) -> String {
    if !Path::new(JDBC_JAR).exists() {
        missing(&format!(
            "{JDBC_JAR} does not exist (libpostgresql-jdbc-java)"
        ));
    }
    if !runs(Path::new("javac"), &["-version"]) {
        missing("`javac` does not run (a JDK)");
    }
    if !runs(Path::new("java"), &["-version"]) {
        missing("`java` does not run");
    }
    let src = drivers_dir().join("PgjdbcTest.java");
    let compiled = Command::new("javac")
        .arg("-d")
        .arg(out)
        .arg("-cp")
        .arg(JDBC_JAR)
        .arg(&src)
        .output()
        .await
        .expect("javac runs");
    assert!(
        compiled.status.success(),
        "javac {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    format!("{JDBC_JAR}:{}", out.display())
}

/// Number of server connections of user `app` on database `db` (pgtide's, since the
/// observer is `postgres`).
async fn app_backends(db: &str) -> usize {
    let db = db.to_string();
    tokio::task::spawn_blocking(move || {
        harness::psql(
            harness::primary_port(),
            &db,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
                 AND usename = '{APP_USER}' AND backend_type = 'client backend'"
            ),
        )
    })
    .await
    .expect("psql task")
    .trim()
    .parse()
    .expect("a count")
}

/// Runs `cmd` with a time limit; on timeout kills the child by its PID and fails.
async fn run_limited(what: &str, mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let pid = child.id().expect("a running child has a pid");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v).await;
        v
    });
    let err_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v).await;
        v
    });
    let status = match tokio::time::timeout(RUN_LIMIT, child.wait()).await {
        Ok(s) => s.unwrap_or_else(|e| panic!("{what}: wait: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped
            // (we still hold it), so the PID cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait().await;
            let out = out_task.await.unwrap_or_default();
            let err = err_task.await.unwrap_or_default();
            panic!(
                "{what}: still running after {RUN_LIMIT:?}, killed (pid {pid}).\n\
                 stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
    };
    Output {
        status,
        stdout: out_task.await.unwrap_or_default(),
        stderr: err_task.await.unwrap_or_default(),
    }
}

/// Starts pgtide (transaction mode, pool_size 2) for a fresh database, runs the driver
/// program that `make` builds (given host, port, user, password, db), and checks its
/// exit status, its `OK <driver>` line and that pgtide never used more than 2 server
/// connections.
async fn run_driver<F>(prefix: &str, driver: &str, make: F)
where
    F: FnOnce(&[String]) -> Command,
{
    let db = tokio::task::spawn_blocking({
        let prefix = prefix.to_string();
        move || harness::fresh_database(&prefix)
    })
    .await
    .expect("fresh database");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = POOL_SIZE;
    // A leaked or pinned server shows up as 53300 within this, not as a hang.
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(20);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let args = vec![
        addr.ip().to_string(),
        addr.port().to_string(),
        APP_USER.to_string(),
        APP_PASSWORD.to_string(),
        db.clone(),
    ];
    let cmd = make(&args);

    // Watch the server side while the program runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let watcher = tokio::spawn({
        let (done, peak, db) = (done.clone(), peak.clone(), db.clone());
        async move {
            while !done.load(Ordering::Relaxed) {
                let n = app_backends(&db).await;
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let out = run_limited(driver, cmd).await;
    done.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");
    let after = app_backends(&db).await;
    pooler.shutdown();

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{driver} through pgtide failed ({}).\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let ok = format!("OK {driver}");
    assert!(
        stdout.lines().any(|l| l.starts_with(&ok)),
        "{driver}: no `{ok}` line.\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        after <= POOL_SIZE as usize && peak <= POOL_SIZE as usize,
        "{driver}: pgtide used more than {POOL_SIZE} server connections \
         (peak seen {peak}, {after} after the run)"
    );
    assert!(
        after >= 1,
        "{driver}: no server connection of pgtide left on {db} after the run"
    );
}

fn psycopg(threshold: &'static str) -> impl FnOnce(&[String]) -> Command {
    move |args| {
        let mut c = Command::new(python_with("psycopg"));
        c.arg(drivers_dir().join("psycopg_test.py"))
            .args(args)
            .arg(threshold);
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepare_threshold_0() {
    run_driver("drv_psycopg0", "psycopg", psycopg("0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_default_threshold() {
    run_driver("drv_psycopg", "psycopg", psycopg("default")).await;
}

/// psycopg's pipeline mode: libpq ends each pipeline with Sync then Flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_pipeline_mode() {
    run_driver("drv_psycopgpipe", "psycopg", psycopg("pipeline")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_statement_cache_and_prepare() {
    run_driver("drv_asyncpg", "asyncpg", |args| {
        let mut c = Command::new(python_with("asyncpg"));
        c.arg(drivers_dir().join("asyncpg_test.py")).args(args);
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_named_queries() {
    let node = node();
    run_driver("drv_nodepg", "node-pg", |args| {
        let mut c = Command::new(node);
        c.current_dir(drivers_dir())
            .arg("node_pg_test.js")
            .args(args);
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepare_threshold_1() {
    let classes = tempfile::tempdir().expect("a temp dir");
    let cp = compile_pgjdbc(classes.path()).await;
    run_driver("drv_pgjdbc", "pgjdbc", |args| {
        let mut c = Command::new("java");
        c.arg("-cp").arg(cp).arg("PgjdbcTest").args(args);
        c
    })
    .await;
}
