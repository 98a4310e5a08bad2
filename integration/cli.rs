//! The `pgtide` binary as a user runs it: `check-config`, zero-config mode (`--upstream`
//! and `DATABASE_URL`), signals and graceful shutdown, and `pgtide demo`.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{self, tcp_connect_string};

const PGTIDE: &str = env!("CARGO_BIN_EXE_pgtide");
/// Every wait in this file ends after this long at most.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A child process that is killed (by its PID) and reaped when dropped, e.g. when an
/// assertion fails. Its stderr goes to a temporary file, for failure messages.
pub(crate) struct ChildGuard {
    child: Child,
    stderr: tempfile::NamedTempFile,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stderr captured (stdout as configured by the
    /// caller, null by default).
    pub(crate) fn spawn(mut cmd: Command, what: &str, pipe_stdout: bool) -> ChildGuard {
        let stderr = tempfile::NamedTempFile::new().expect("temp file");
        cmd.stdin(Stdio::null())
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(stderr.reopen().expect("reopen temp file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        ChildGuard {
            child,
            stderr,
            what: what.to_string(),
        }
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    pub(crate) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet
        // (we only reap through `wait_timeout`/`Drop`), so the PID cannot be reused.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    pub(crate) fn stderr_text(&self) -> String {
        let mut s = String::new();
        let _ = self
            .stderr
            .reopen()
            .and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// The exit status, if the child ends within `timeout`.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn has_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until something accepts TCP connections on `addr`; panics if the child exits
    /// or 30 s pass.
    pub(crate) fn wait_accepting(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return;
            }
            if let Some(status) = self.has_exited() {
                panic!(
                    "{} exited ({status}) before accepting on {addr}:\n{}",
                    self.what,
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} does not accept on {addr} after 30 s:\n{}",
                self.what,
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill(); // SIGKILL to this child's PID
            let _ = self.child.wait();
        }
    }
}

/// A loopback address on a port that was free a moment ago.
pub(crate) fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// `psql -X -At -c sql` with a connection URL (or other conninfo) and an optional
/// PGPASSWORD; returns (success, stdout, stderr). Killed by PID after 30 s.
fn psql_url(conninfo: &str, password: Option<&str>, sql: &str) -> (bool, String, String) {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "20");
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let mut child = ChildGuard::spawn(cmd, "psql", true);
    let mut stdout = child.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = child
        .wait_timeout(TIMEOUT)
        .unwrap_or_else(|| panic!("psql {conninfo} -c {sql:?} did not finish within 30 s"));
    let out = reader.join().unwrap();
    (
        status.success(),
        out.trim().to_string(),
        child.stderr_text(),
    )
}

/// Runs an async block on a small runtime of its own (the tests of this file are plain
/// `#[test]`s driving child processes).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `pgtide check-config FILE`: (exit status, stdout + stderr).
pub(crate) fn check_config(file: &Path) -> (ExitStatus, String) {
    let mut cmd = Command::new(PGTIDE);
    cmd.arg("check-config").arg(file);
    let mut child = ChildGuard::spawn(cmd, "pgtide check-config", true);
    let mut stdout = child.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = child
        .wait_timeout(TIMEOUT)
        .expect("pgtide check-config did not finish within 30 s");
    let out = reader.join().unwrap();
    (status, format!("{out}{}", child.stderr_text()))
}

#[test]
fn check_config_accepts_good_files_and_names_every_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
[pgtide]
listen = "127.0.0.1:6432"
pool_mode = "session"
pool_size = 7
query_wait_timeout = "30s"

[databases.app]
host = "127.0.0.1"
port = 5432

[users.app]
password = "secret"
auth_type = "md5"
"#,
    )
    .unwrap();
    let (status, out) = check_config(&good);
    assert_eq!(status.code(), Some(0), "a valid file was refused:\n{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[pgtide]
listen = "127.0.0.1:6432"
listen_adress = "127.0.0.1:7000"
auth_type = "password"
max_client_conn = "lots"

[databases.app]
host = "127.0.0.1"

[users.app]
password = "secret"
"#,
    )
    .unwrap();
    let (status, out) = check_config(&bad);
    assert_eq!(status.code(), Some(1), "a bad file must exit 1:\n{out}");
    // Each mistake gets its own line that starts with its key (an unknown-key message may
    // list every allowed key, so a mere mention is not enough).
    for key in ["listen_adress", "auth_type", "max_client_conn"] {
        assert!(
            out.lines().any(|l| l
                .split(':')
                .next()
                .is_some_and(|head| head.trim().trim_start_matches("pgtide.") == key)),
            "check-config has no problem line for {key}:\n{out}"
        );
    }

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("pooler.toml.example");
    let (status, out) = check_config(&example);
    assert_eq!(
        status.code(),
        Some(0),
        "pooler.toml.example fails check-config:\n{out}"
    );

    let (status, out) = check_config(&dir.path().join("missing.toml"));
    assert_eq!(status.code(), Some(1), "a missing file must exit 1:\n{out}");
}

#[test]
fn check_config_reads_the_auth_file_and_hba_file_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgtide.toml");
    std::fs::write(
        &config,
        "[pgtide]\nauth_file = \"userlist.txt\"\nauth_hba_file = \"hba.conf\"\n[databases.app]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("userlist.txt"),
        "; users\n\"alice\" \"secret-pw\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hba.conf"),
        "host all all 10.0.0.0/8 scram-sha-256\n",
    )
    .unwrap();
    let (status, out) = check_config(&config);
    assert_eq!(
        status.code(),
        Some(0),
        "valid auth files were refused:\n{out}"
    );

    // Mistakes in either file are reported with the file, the line and what is wrong,
    // and never with a password.
    std::fs::write(
        dir.path().join("userlist.txt"),
        "\"alice\" \"secret-pw\"\nbob secret-pw\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hba.conf"),
        "# comment\nhost all +admins 10.0.0.0/8 md5\n",
    )
    .unwrap();
    let (status, out) = check_config(&config);
    assert_eq!(status.code(), Some(1), "bad auth files must exit 1:\n{out}");
    assert!(
        out.contains("pgtide.auth_file:") && out.contains("userlist.txt: line 2:"),
        "{out}"
    );
    assert!(
        out.contains("pgtide.auth_hba_file:") && out.contains("hba.conf: line 2: group membership"),
        "{out}"
    );
    assert!(!out.contains("secret-pw"), "a password was echoed:\n{out}");

    std::fs::remove_file(dir.path().join("userlist.txt")).unwrap();
    let (status, out) = check_config(&config);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("cannot read"), "{out}");
}

/// `pgtide` on `listen` (and a metrics port of its own: tests run side by side), with
/// no `DATABASE_URL` from the environment; the caller names the upstream.
fn zero_config_command(listen: SocketAddr) -> Command {
    let mut cmd = Command::new(PGTIDE);
    cmd.env_remove("DATABASE_URL")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg("127.0.0.1:0");
    cmd
}

/// `pgtide --upstream` for database `db` as the trust user.
fn trust_upstream(db: &str) -> String {
    format!(
        "postgres://pgtide_trust@127.0.0.1:{}/{db}",
        harness::primary_port()
    )
}

/// `pgtide` with the upstream URL of database `db` (as `--upstream`, or in `DATABASE_URL`)
/// listening on a free port; waits until it accepts.
fn spawn_zero_config(db: &str, via_env: bool) -> (ChildGuard, SocketAddr) {
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{}/{db}",
        harness::APP_USER,
        harness::APP_PASSWORD,
        harness::primary_port()
    );
    spawn_upstream(&url, via_env)
}

/// `pgtide` for the upstream `url` on a free port; waits until it accepts.
fn spawn_upstream(url: &str, via_env: bool) -> (ChildGuard, SocketAddr) {
    spawn_upstream_with(url, via_env, &[])
}

/// The same, with `--replica` URLs.
fn spawn_upstream_with(url: &str, via_env: bool, replicas: &[String]) -> (ChildGuard, SocketAddr) {
    let listen = free_addr();
    let mut cmd = zero_config_command(listen);
    for r in replicas {
        cmd.arg("--replica").arg(r);
    }
    if via_env {
        cmd.env("DATABASE_URL", url);
    } else {
        cmd.arg("--upstream").arg(url);
    }
    let mut child = ChildGuard::spawn(cmd, "pgtide (zero-config)", false);
    child.wait_accepting(listen);
    (child, listen)
}

/// Logs in through `addr` as app with psql and tokio-postgres and checks who and where.
fn check_zero_config_clients(addr: SocketAddr, db: &str) {
    let url = format!("postgres://app@{addr}/{db}");
    let (ok, out, err) = psql_url(
        &url,
        Some(harness::APP_PASSWORD),
        "select current_user || '@' || current_database()",
    );
    assert!(ok, "psql through zero-config pgtide: {err}");
    assert_eq!(out, format!("app@{db}"));

    block_on(async {
        let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, db);
        let client = tokio::time::timeout(TIMEOUT, harness::connect(&conn))
            .await
            .expect("login timed out")
            .expect("tokio-postgres through zero-config pgtide");
        let rows = tokio::time::timeout(TIMEOUT, client.simple_query("SELECT 40 + 2"))
            .await
            .expect("query timed out")
            .expect("query through zero-config pgtide");
        let v = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(v.as_deref(), Some("42"));
        // A wrong password is refused.
        let bad = tcp_connect_string(addr, "app", "wrong", db);
        let err = tokio::time::timeout(TIMEOUT, harness::connect(&bad))
            .await
            .expect("login timed out")
            .expect_err("a wrong password logged in through zero-config pgtide");
        assert_eq!(
            err.as_db_error().map(|d| d.code().code()),
            Some("28P01"),
            "{err:?}"
        );
    });
}

#[test]
fn zero_config_with_upstream_flag_and_database_url_then_sigterm() {
    let db = harness::fresh_database("cli_zero");
    for via_env in [false, true] {
        let how = if via_env {
            "DATABASE_URL"
        } else {
            "--upstream"
        };
        let (mut child, addr) = spawn_zero_config(&db, via_env);
        check_zero_config_clients(addr, &db);
        child.signal(libc::SIGTERM);
        let status = child
            .wait_timeout(Duration::from_secs(15))
            .unwrap_or_else(|| {
                panic!(
                    "pgtide ({how}) still running 15 s after SIGTERM:\n{}",
                    child.stderr_text()
                )
            });
        assert_eq!(
            status.code(),
            Some(0),
            "pgtide ({how}) after SIGTERM: {status}\n{}",
            child.stderr_text()
        );
        // Text logs to a file carry no terminal colour codes.
        let logs = child.stderr_text();
        assert!(logs.contains("pgtide is ready"), "{logs}");
        assert!(
            !logs.contains('\u{1b}'),
            "colour codes in a log file:\n{logs}"
        );
    }
}

#[test]
fn zero_config_url_without_password_means_trust() {
    let db = harness::fresh_database("cli_zero_trust");
    let (mut child, addr) = spawn_upstream(&trust_upstream(&db), false);
    let (ok, out, err) = psql_url(
        &format!("postgres://pgtide_trust@{addr}/{db}"),
        None,
        "select current_user",
    );
    assert!(ok, "psql as pgtide_trust without a password: {err}");
    assert_eq!(out, "pgtide_trust");
    child.signal(libc::SIGTERM);
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("pgtide still running 15 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", child.stderr_text());
}

/// Waits until `addr` refuses connections (pgtide stopped accepting); panics after 30 s.
fn wait_refusing(child: &mut ChildGuard, addr: SocketAddr) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(_) => return,
            Ok(s) => drop(s),
        }
        if child.has_exited().is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgtide still accepts clients 30 s after SIGTERM:\n{}",
            child.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_lets_an_open_transaction_commit_and_a_second_sigterm_exits_at_once() {
    let db = harness::fresh_database("cli_graceful");
    harness::psql(
        harness::primary_port(),
        &db,
        "CREATE TABLE t (x int); GRANT ALL ON t TO app",
    );

    // 1. Graceful: the transaction in flight finishes, then pgtide exits 0.
    let (mut child, addr) = spawn_zero_config(&db, false);
    block_on(async {
        let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
        let client = tokio::time::timeout(TIMEOUT, harness::connect(&conn))
            .await
            .unwrap()
            .expect("login");
        let idle = tokio::time::timeout(TIMEOUT, harness::connect(&conn))
            .await
            .unwrap()
            .expect("login of the idle client");
        // Idle after a transaction (a client that has run nothing yet when the drain
        // begins may still send its first one: see the README's Signals).
        tokio::time::timeout(TIMEOUT, idle.simple_query("SELECT 1"))
            .await
            .unwrap()
            .expect("the idle client's first query");
        tokio::time::timeout(
            TIMEOUT,
            client.batch_execute("BEGIN; INSERT INTO t VALUES (1)"),
        )
        .await
        .unwrap()
        .expect("begin + insert");
        child.signal(libc::SIGTERM);
        wait_refusing(&mut child, addr);
        assert!(
            child.has_exited().is_none(),
            "pgtide exited while a transaction was open:\n{}",
            child.stderr_text()
        );
        // A client outside any transaction is told that pgtide is shutting down.
        let err = tokio::time::timeout(TIMEOUT, idle.simple_query("SELECT 1"))
            .await
            .expect("the idle client's query hangs after SIGTERM")
            .expect_err("an idle client can still run queries after SIGTERM");
        if let Some(d) = err.as_db_error() {
            assert_eq!(d.code().code(), "57P01", "idle client after SIGTERM: {d:?}");
        }
        tokio::time::timeout(
            TIMEOUT,
            client.batch_execute("INSERT INTO t VALUES (2); COMMIT"),
        )
        .await
        .expect("the open transaction hangs after SIGTERM")
        .expect("the open transaction must be able to finish after SIGTERM");
        drop(client);
    });
    let status = child.wait_timeout(TIMEOUT).unwrap_or_else(|| {
        panic!(
            "pgtide did not exit after its last client left:\n{}",
            child.stderr_text()
        )
    });
    assert_eq!(status.code(), Some(0), "{status}\n{}", child.stderr_text());
    assert_eq!(
        harness::psql(
            harness::primary_port(),
            &db,
            "SELECT string_agg(x::text, ',' ORDER BY x) FROM t"
        ),
        "1,2",
        "the transaction committed during shutdown"
    );

    // 2. A second SIGTERM while a transaction holds the shutdown: exit at once, non-zero.
    let (mut child, addr) = spawn_zero_config(&db, false);
    block_on(async {
        let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
        let client = tokio::time::timeout(TIMEOUT, harness::connect(&conn))
            .await
            .unwrap()
            .expect("login");
        tokio::time::timeout(
            TIMEOUT,
            client.batch_execute("BEGIN; INSERT INTO t VALUES (3)"),
        )
        .await
        .unwrap()
        .expect("begin + insert");
        child.signal(libc::SIGTERM);
        wait_refusing(&mut child, addr);
        assert!(
            child.has_exited().is_none(),
            "pgtide exited while a transaction was open"
        );
        child.signal(libc::SIGTERM);
        let status = child
            .wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!(
                    "a second SIGTERM did not stop pgtide within 10 s:\n{}",
                    child.stderr_text()
                )
            });
        assert_eq!(
            status.code(),
            Some(1),
            "a second SIGTERM must exit with status 1, got {status}"
        );
        drop(client);
    });
}

/// Reads `pgtide demo`'s stdout until it prints the psql command; returns (URL, data
/// directory, everything read).
fn read_demo_banner(rx: &mpsc::Receiver<String>, child: &mut ChildGuard) -> (String, PathBuf) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = String::new();
    let mut data_dir = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                let t = line.trim();
                if let Some(d) = t.strip_prefix("data") {
                    data_dir = Some(PathBuf::from(d.trim()));
                }
                if let Some(rest) = t.strip_prefix("psql ") {
                    let url = rest.trim().trim_matches('"').to_string();
                    let dir = data_dir.unwrap_or_else(|| {
                        panic!("demo printed no data directory before psql:\n{seen}")
                    });
                    return (url, dir);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait_timeout(Duration::from_secs(5));
                panic!(
                    "pgtide demo closed stdout ({status:?}) before printing the psql command:\n{seen}\n{}",
                    child.stderr_text()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "pgtide demo printed no psql command within 90 s:\n{seen}\n{}",
            child.stderr_text()
        );
    }
}

#[test]
fn demo_serves_psql_and_removes_everything_on_sigint() {
    let listen = free_addr();
    let mut cmd = Command::new(PGTIDE);
    cmd.arg("demo")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg("127.0.0.1:0");
    let mut child = ChildGuard::spawn(cmd, "pgtide demo", true);
    let stdout = child.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let (url, data_dir) = read_demo_banner(&rx, &mut child);
    assert!(
        url.contains(&listen.to_string()),
        "the printed URL {url} is not pgtide's address {listen}"
    );
    assert!(
        data_dir.is_dir(),
        "data directory {data_dir:?} does not exist"
    );

    let (ok, out, err) = psql_url(&url, None, "select 1");
    assert!(ok, "psql {url}: {err}");
    assert_eq!(out, "1");

    // The demo shows routing: its own check line, then a read of ours on the standby.
    let deadline = Instant::now() + Duration::from_secs(30);
    let check = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) if line.starts_with("Routing check") => break line,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("demo output ended: {e}"),
        }
        assert!(Instant::now() < deadline, "no routing check line");
    };
    assert!(
        check.contains("read (SELECT pg_is_in_recovery()) was answered by the replica")
            && check.contains("a write transaction by the primary"),
        "{check}"
    );
    let (ok, out, err) = psql_url(&url, None, "select pg_is_in_recovery()");
    assert!(ok, "psql {url}: {err}");
    assert_eq!(out, "t", "a read through the demo ran on the primary");
    let console = format!("{}/pgtide", url.rsplit_once('/').expect("a URL path").0);
    let (ok, out, err) = psql_url(&console, None, "SHOW HOSTS");
    assert!(
        ok && out.contains("replica"),
        "console {console}: {out} {err}"
    );

    child.signal(libc::SIGINT);
    let status = child
        .wait_timeout(Duration::from_secs(25))
        .unwrap_or_else(|| {
            panic!(
                "pgtide demo still running 25 s after SIGINT:\n{}",
                child.stderr_text()
            )
        });
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        status.success(),
        "pgtide demo after SIGINT: {status}\n{}\n{}",
        rest.join("\n"),
        child.stderr_text()
    );
    assert!(
        !data_dir.exists(),
        "the demo's data directory {data_dir:?} is still there"
    );
    // And nothing listens on the demo's address any more.
    assert!(TcpStream::connect_timeout(&listen, Duration::from_secs(1)).is_err());
}

/// Zero-config mode with `--replica`: reads go to the replica, writes to the primary.
#[test]
fn zero_config_with_a_replica_routes_reads_to_it() {
    let db = harness::fresh_database("cli_replica");
    harness::psql(harness::primary_port(), &db, "CREATE TABLE t (v int)");
    harness::wait_replica_caught_up();
    let url = |port: u16| {
        format!(
            "postgres://app:{}@127.0.0.1:{port}/{db}",
            harness::APP_PASSWORD
        )
    };
    let (_child, addr) = spawn_upstream_with(
        &url(harness::primary_port()),
        false,
        &[url(harness::replica_port())],
    );
    let conninfo = format!("postgres://app@{addr}/{db}");
    // The monitor finds the roles within a few checks; poll for the replica.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = psql_url(
            &conninfo,
            Some(harness::APP_PASSWORD),
            "SELECT pg_is_in_recovery()",
        );
        assert!(ok, "read through pgtide: {err}");
        if out == "t" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reads never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out, err) = psql_url(
        &conninfo,
        Some(harness::APP_PASSWORD),
        "INSERT INTO t VALUES (1) RETURNING pg_is_in_recovery()",
    );
    assert!(ok, "write through pgtide: {err}");
    assert_eq!(
        out.lines().next(),
        Some("f"),
        "the write ran on the primary: {out}"
    );
}

/// Server connections PostgreSQL has for database `db`.
fn server_connections(db: &str) -> u32 {
    harness::psql(
        harness::primary_port(),
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ),
    )
    .trim()
    .parse()
    .expect("a count")
}

#[test]
fn sighup_reloads_the_config_file_without_dropping_clients() {
    let db = harness::fresh_database("cli_sighup");
    let mut config = harness::config_for(&db);
    config.pgtide.pool_size = 1;
    config.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgtide.toml");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let listen = free_addr();
    let mut cmd = Command::new(PGTIDE);
    cmd.env_remove("DATABASE_URL")
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg("127.0.0.1:0");
    let mut child = ChildGuard::spawn(cmd, "pgtide --config", false);
    child.wait_accepting(listen);
    let admin = |sql: &str| {
        let url = format!("postgres://app@{listen}/pgtide");
        let (ok, out, err) = psql_url(&url, Some(harness::APP_PASSWORD), sql);
        assert!(ok, "{sql}: {out}\n{err}");
        out
    };
    block_on(async {
        let conn = tcp_connect_string(listen, "app", harness::APP_PASSWORD, &db);
        let kept = tokio::time::timeout(TIMEOUT, harness::connect(&conn))
            .await
            .unwrap()
            .expect("login");
        // Three clients at once: one server with pool_size 1.
        let burst = || async {
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let conn = conn.clone();
                tasks.push(tokio::spawn(async move {
                    let c = harness::connect(&conn).await.expect("login");
                    c.simple_query("SELECT pg_sleep(0.3)").await.expect("sleep");
                }));
            }
            for t in tasks {
                tokio::time::timeout(TIMEOUT, t).await.unwrap().unwrap();
            }
        };
        burst().await;
        assert_eq!(server_connections(&db), 1);
        assert!(admin("SHOW DATABASES").contains(&format!("{db}|127.0.0.1|")));

        config.pgtide.pool_size = 3;
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        child.signal(libc::SIGHUP);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let dbs = admin("SHOW DATABASES");
            // name|host|port|database|force_user|pool_size|...
            let size = dbs
                .lines()
                .find(|l| l.starts_with(&format!("{db}|")))
                .and_then(|l| l.split('|').nth(5).map(str::to_string));
            if size.as_deref() == Some("3") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SIGHUP did not apply pool_size 3: {dbs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        burst().await;
        assert_eq!(server_connections(&db), 3, "pool_size 3 after SIGHUP");
        tokio::time::timeout(TIMEOUT, kept.simple_query("SELECT 1"))
            .await
            .unwrap()
            .expect("the client connected before SIGHUP still works");
    });
    assert!(child.has_exited().is_none(), "SIGHUP must not stop pgtide");
    let log = child.stderr_text();
    assert!(
        log.contains("pool_size: 1 -> 3"),
        "the reload is logged: {log}"
    );
    assert!(
        !log.contains(harness::APP_PASSWORD),
        "a password was logged: {log}"
    );
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(TIMEOUT).is_some());
}

/// `--log-format json` at the most verbose level: every line is a JSON object; logins (with
/// `log_connections`), a failed login and the hosts' state changes are logged; no line
/// holds a password, an md5 hash of one or a SCRAM secret.
#[test]
fn json_logs_show_events_and_never_a_secret() {
    use md5::{Digest, Md5};
    let db = harness::fresh_database("cli_json_logs");
    let listen = free_addr();
    let (p, r) = (harness::primary_port(), harness::replica_port());
    let toml = format!(
        r#"[pgtide]
listen = "{listen}"
metrics_listen = ""
log_connections = true

[databases.{db}]
hosts = [{{ host = "127.0.0.1", port = {p}, role = "primary" }}, {{ host = "127.0.0.1", port = {r}, role = "replica" }}]

[users.{user}]
password = "{password}"
auth_type = "scram-sha-256"

[users.pgtide_md5]
password = "md5pass"
auth_type = "md5"
"#,
        user = harness::APP_USER,
        password = harness::APP_PASSWORD,
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), toml).expect("write the config");
    let mut cmd = Command::new(PGTIDE);
    cmd.arg("--config")
        .arg(file.path())
        .args(["--log-format", "json"])
        .env("PGTIDE_LOG", "trace");
    let mut child = ChildGuard::spawn(cmd, "pgtide --log-format json", false);
    child.wait_accepting(listen);

    let url = |user: &str| format!("postgres://{user}@{listen}/{db}");
    let (ok, out, err) = psql_url(
        &url(harness::APP_USER),
        Some(harness::APP_PASSWORD),
        "SELECT 1",
    );
    assert!(ok && out == "1", "{out}\n{err}");
    let (ok, out, err) = psql_url(&url("pgtide_md5"), Some("md5pass"), "SELECT 1");
    assert!(ok && out == "1", "{out}\n{err}");
    let wrong = "wrong-Secret-4711";
    let (ok, _, err) = psql_url(&url(harness::APP_USER), Some(wrong), "SELECT 1");
    assert!(!ok, "a wrong password is refused");
    assert!(err.contains("password authentication failed"), "{err}");
    // The monitor has seen both hosts once the replica's role is logged.
    let deadline = Instant::now() + TIMEOUT;
    while !child.stderr_text().contains("\"role\":\"replica\"") {
        assert!(
            Instant::now() < deadline,
            "no host state logged:\n{}",
            child.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.signal(libc::SIGTERM);
    assert!(
        child.wait_timeout(TIMEOUT).is_some_and(|s| s.success()),
        "pgtide exits cleanly on SIGTERM"
    );

    let logs = child.stderr_text();
    let mut messages = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    let md5_of = |password: &str, user: &str| {
        let digest = Md5::digest(format!("{password}{user}").as_bytes());
        format!(
            "md5{}",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    };
    for secret in [
        harness::APP_PASSWORD.to_string(),
        "md5pass".to_string(),
        wrong.to_string(),
        md5_of("md5pass", "pgtide_md5"),
        md5_of(harness::APP_PASSWORD, harness::APP_USER),
        "SCRAM-SHA-256$".to_string(),
    ] {
        assert!(
            !logs.contains(&secret),
            "the logs hold a secret ({secret}):\n{logs}"
        );
    }
    let has = |what: &str| messages.iter().any(|m| m.contains(what));
    assert!(
        has("host is up"),
        "host state changes are logged: {messages:?}"
    );
    assert!(
        has("primary found"),
        "the choice of the primary is logged: {messages:?}"
    );
    assert!(has("client logged in"), "log_connections: {messages:?}");
    assert!(
        has("login failed"),
        "the failed login is logged: {messages:?}"
    );
}

#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-cert.pem");
    let file = dir.path().join("tls.toml");
    std::fs::write(
        &file,
        format!(
            "[pgtide]\nclient_tls_sslmode = \"require\"\nclient_tls_cert_file = \"{}\"\n\
             client_tls_key_file = \"{}\"\n[databases.app]\n[users.app]\npassword = \"x\"\n",
            missing.display(),
            missing.display()
        ),
    )
    .unwrap();
    let (status, out) = check_config(&file);
    assert_eq!(
        status.code(),
        Some(1),
        "a missing certificate must exit 1:\n{out}"
    );
    assert!(
        out.contains("client_tls_cert_file") && out.contains("no-such-cert.pem"),
        "{out}"
    );
}

#[test]
fn sighup_reloads_the_tls_certificates_and_keeps_clients() {
    use crate::tls::{connect_tls, one, write, Ca};
    let db = harness::fresh_database("cli_sighup_tls");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca1 = Ca::new("first CA");
    let (c, k) = ca1.issue("pgtide", &["127.0.0.1"], false);
    let cert = write(dir.path(), "server.crt", &c);
    let key = write(dir.path(), "server.key", &k);
    let listen = free_addr();
    let config = format!(
        "[pgtide]\nlisten = \"{listen}\"\nmetrics_listen = \"\"\nclient_tls_sslmode = \"require\"\n\
         client_tls_cert_file = \"{}\"\nclient_tls_key_file = \"{}\"\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.app]\npassword = \"{}\"\n",
        cert.display(),
        key.display(),
        harness::primary_port(),
        harness::APP_PASSWORD
    );
    let file = dir.path().join("pgtide.toml");
    std::fs::write(&file, config).expect("write config");
    let mut cmd = Command::new(PGTIDE);
    cmd.env_remove("DATABASE_URL").arg("--config").arg(&file);
    let mut child = ChildGuard::spawn(cmd, "pgtide --config", false);
    child.wait_accepting(listen);

    block_on(async {
        let conn = format!(
            "{} sslmode=require",
            tcp_connect_string(listen, "app", harness::APP_PASSWORD, &db)
        );
        let before = connect_tls(&conn, &[ca1.der()])
            .await
            .expect("TLS login with the first certificate");
        assert_eq!(one(&before, "SELECT 'before'").await, "before");

        let ca2 = Ca::new("second CA");
        let (c, k) = ca2.issue("pgtide", &["127.0.0.1"], false);
        write(dir.path(), "server.crt", &c);
        write(dir.path(), "server.key", &k);
        child.signal(libc::SIGHUP);
        let deadline = Instant::now() + TIMEOUT;
        let after = loop {
            match connect_tls(&conn, &[ca2.der()]).await {
                Ok(c) => break c,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the new certificate is not served after SIGHUP: {e:?}\n{}",
                    child.stderr_text()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(one(&after, "SELECT 'after'").await, "after");
        assert!(
            connect_tls(&conn, &[ca1.der()]).await.is_err(),
            "the old certificate is still served after SIGHUP"
        );
        // The client connected before SIGHUP keeps its session.
        assert_eq!(one(&before, "SELECT 'still here'").await, "still here");
    });
    assert!(
        child.has_exited().is_none(),
        "pgtide exited on SIGHUP:\n{}",
        child.stderr_text()
    );
}

/// The runtime's worker threads of the running binary (tokio names them).
fn worker_threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

/// `worker_threads` sets how many threads serve clients.
#[test]
fn worker_threads_sets_the_runtime_threads() {
    let db = harness::fresh_database("cli_workers");
    for workers in [1u32, 3] {
        let mut config = harness::config_for(&db);
        config.pgtide.worker_threads = workers;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgtide.toml");
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let listen = free_addr();
        let mut cmd = Command::new(PGTIDE);
        cmd.env_remove("DATABASE_URL")
            .env_remove("TOKIO_WORKER_THREADS")
            .arg("--config")
            .arg(&file)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--metrics-listen")
            .arg("");
        let mut child = ChildGuard::spawn(cmd, "pgtide --config", false);
        child.wait_accepting(listen);
        // Counted before any login: tokio gives its blocking-pool threads (DNS lookups,
        // spawn_blocking) the same name, and they are started on demand. One thread is
        // the current-thread runtime: the main thread runs it, no worker thread.
        let expected = if workers == 1 { 0 } else { workers as usize };
        assert_eq!(
            worker_threads_of(child.child.id()),
            expected,
            "worker_threads = {workers}"
        );
        assert_eq!(
            std::fs::read_dir(format!("/proc/{}/task", child.child.id()))
                .expect("the process's threads")
                .count(),
            expected + 1,
            "worker_threads = {workers}: the main thread and the workers, nothing else"
        );
        let url = format!("postgres://{}@{listen}/{db}", harness::APP_USER);
        let (ok, out, err) = psql_url(&url, Some(harness::APP_PASSWORD), "SELECT 41 + 1");
        assert!(ok && out == "42", "{out}\n{err}");
        child.signal(libc::SIGTERM);
        assert!(child.wait_timeout(TIMEOUT).is_some());
    }
}

// `pgtide route` says what transaction mode does with a statement besides routing: the
// session state that pins, the settings that are replayed.
#[test]
fn route_explains_pinning_and_replayed_settings() {
    let run = |sql: &str| {
        let out = Command::new(PGTIDE)
            .args(["route", sql])
            .output()
            .expect("run pgtide route");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let temp = run("CREATE TEMP TABLE x (a int)");
    assert!(
        temp.contains("creates session state (a temporary table"),
        "{temp}"
    );
    let set = run("SET app.tenant_id = '42'");
    assert!(
        set.contains("changes session settings (app.tenant_id)"),
        "{set}"
    );
    let plain = run("SELECT 1");
    assert!(
        !plain.contains("session state") && !plain.contains("session settings"),
        "{plain}"
    );
}

// A taken metrics address is named as the metrics address (not as the listen address),
// with the option that sets it and the fix.
#[test]
fn a_taken_metrics_port_is_named_with_its_option() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().unwrap();
    let mut cmd = Command::new(PGTIDE);
    cmd.env_remove("DATABASE_URL")
        .arg("--upstream")
        .arg(trust_upstream("postgres"))
        .arg("--listen")
        .arg(free_addr().to_string())
        .arg("--metrics-listen")
        .arg(taken_addr.to_string());
    let mut child = ChildGuard::spawn(cmd, "pgtide with a taken metrics port", false);
    let status = child
        .wait_timeout(Duration::from_secs(20))
        .expect("pgtide exits when it cannot bind");
    assert!(!status.success());
    let err = child.stderr_text();
    assert!(
        err.contains(&taken_addr.to_string()) && err.contains("metrics_listen"),
        "{err}"
    );
    assert!(!err.contains("(listen ="), "{err}");
    drop(taken);
}

// `pgtide route` says first where the work runs (a read-only transaction: a replica), and
// reads a script on standard input with one decision per statement.
#[test]
fn route_says_where_the_work_runs_and_reads_scripts() {
    for begin in [
        "BEGIN READ ONLY",
        "begin transaction read only",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        "BEGIN; SET TRANSACTION READ ONLY",
    ] {
        let out = Command::new(PGTIDE)
            .args(["route", begin])
            .output()
            .expect("run pgtide route");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if begin.starts_with("BEGIN;") {
            // Two statements in one message: pgtide answers the BEGIN and routes by the SET.
            assert!(!text.is_empty(), "{begin}: {text}");
            continue;
        }
        assert!(text.starts_with("replica:"), "{begin}: {text}");
    }
    let mut child = Command::new(PGTIDE)
        .args(["route", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run pgtide route -");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"-- from a log\nSELECT 1;\nINSERT INTO t VALUES (';');\nBEGIN READ ONLY;\n",
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("pgtide route -");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("replica:") || l.starts_with("primary:"))
        .collect();
    assert_eq!(decisions.len(), 3, "{text}");
    assert!(decisions[0].starts_with("replica:") && decisions[1].starts_with("primary:"));
    assert!(decisions[2].starts_with("replica:"), "{text}");
}

// "pgtide is ready" is said only when the upstream answers; otherwise a warning says what
// is missing (and pgtide accepts clients all the same).
#[test]
fn ready_is_logged_only_when_the_upstream_answers() {
    let nothing_there = free_addr();
    let url = format!("postgres://pgtide_trust@{nothing_there}/nowhere");
    let (mut child, _addr) = spawn_upstream(&url, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        let logs = child.stderr_text();
        if logs.contains("not every primary is reachable") || Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(logs.contains("not every primary is reachable"), "{logs}");
    assert!(logs.contains(&nothing_there.to_string()), "{logs}");
    assert!(!logs.contains("pgtide is ready"), "{logs}");
    child.signal(libc::SIGTERM);
    let _ = child.wait_timeout(Duration::from_secs(10));
}

/// systemd's notify protocol (Type=notify): with `NOTIFY_SOCKET` set, pgtide sends
/// `READY=1` once it serves and `STOPPING=1` when a SIGTERM begins its shutdown.
#[test]
fn the_service_manager_is_told_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let db = harness::fresh_database("cli_notify");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let listen = free_addr();
    let mut cmd = zero_config_command(listen);
    cmd.env("NOTIFY_SOCKET", &path)
        .arg("--upstream")
        .arg(trust_upstream(&db));
    let mut child = ChildGuard::spawn(cmd, "pgtide (notify)", false);
    let recv = |what: &str| {
        let mut buf = [0u8; 256];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {what} on the notify socket: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv("READY=1"), "READY=1");
    // Ready means serving.
    let (ok, out, err) = psql_url(
        &format!("postgres://pgtide_trust@{listen}/{db}"),
        None,
        "select 1",
    );
    assert!(ok && out == "1", "{err}");
    child.signal(libc::SIGTERM);
    assert_eq!(recv("STOPPING=1"), "STOPPING=1");
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("pgtide still running 15 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", child.stderr_text());
}

/// `--log-output stdout` (what the container image uses): the log lines, JSON here, go
/// to standard output and nothing to standard error.
#[test]
fn the_log_can_go_to_stdout() {
    let db = harness::fresh_database("cli_log_stdout");
    let listen = free_addr();
    let mut cmd = zero_config_command(listen);
    cmd.args(["--log-format", "json", "--log-output", "stdout"])
        .arg("--upstream")
        .arg(trust_upstream(&db));
    let mut child = ChildGuard::spawn(cmd, "pgtide (log to stdout)", true);
    let stdout = child.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("no log line on stdout:\n{}", child.stderr_text()));
    assert!(
        line.starts_with('{') && line.contains("\"level\""),
        "a JSON log line on stdout: {line}"
    );
    child.wait_accepting(listen);
    child.signal(libc::SIGTERM);
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("pgtide still running 15 s after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(child.stderr_text(), "", "nothing on stderr");
}
