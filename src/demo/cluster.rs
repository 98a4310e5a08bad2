//! [`LocalCluster`]: a throwaway PostgreSQL primary, optionally with a streaming
//! hot-standby replica, in a temporary directory on free loopback ports. Used by
//! `pgtide demo` and by the integration tests.
//!
//! Everything here is synchronous (`std::process`), so it works inside and outside a
//! tokio runtime (inside one, call it from `spawn_blocking`).
//!
//! # Finding PostgreSQL
//! The server binaries are looked up in `$PGTIDE_PG_BINDIR`, then `pg_config --bindir`,
//! then the directory of `initdb` on `PATH` (symlinks resolved), then the newest
//! `/usr/lib/postgresql/*/bin`. A directory counts only if it holds `initdb`, `pg_ctl`,
//! `postgres` and `pg_basebackup`.
//!
//! # Running as root
//! PostgreSQL refuses to run as root. When `geteuid() == 0`, `initdb`, `pg_ctl`,
//! `postgres` and `pg_basebackup` run as the `postgres` OS user and the temporary
//! directory is chowned to it. `psql` runs as the calling user (over the unix socket,
//! trust authentication).
//!
//! # Cleanup
//! [`LocalCluster::stop`] (also run by `Drop`) stops the servers with `pg_ctl stop -m fast`
//! and removes the directory. Clusters that are never dropped (the integration tests keep
//! one in a `static`) are cleaned up in two more ways:
//!
//! 1. A `libc::atexit` handler, registered when the first cluster starts, stops every
//!    cluster still running in this process (`pg_ctl stop -m immediate`) and removes its
//!    directory. It runs on normal exit and on `std::process::exit` (which is how the test
//!    harness exits, also when tests fail).
//! 2. A watchdog per cluster, for deaths that skip `atexit` (SIGKILL, an unhandled signal,
//!    an abort): a tiny `sh` in its own process group (so a terminal Ctrl-C does not kill
//!    it first) whose stdin is a pipe from this process. The write end is close-on-exec
//!    and held only here, so the kernel closes it when this process dies however it dies;
//!    `read` then sees end-of-file and the watchdog stops the servers and removes the
//!    directory. A normal stop writes `done` to the pipe and the watchdog exits without
//!    doing anything. Unlike `PR_SET_PDEATHSIG` (which fires when the spawning *thread*
//!    exits) or polling a PID (which can be reused), this has no false alarms.

use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::router::quote::{quote_ident, quote_literal};

/// How long a server may take to start, and a replica to catch up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Binaries a directory must hold to count as PostgreSQL's server bindir.
const REQUIRED_BINARIES: [&str; 4] = ["initdb", "pg_ctl", "postgres", "pg_basebackup"];

/// Attempts to start a server on a fresh port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// What to create in a new cluster besides the built-in roles.
///
/// The built-in roles are always created: `pgtide_trust` (no password, trust over TCP),
/// `pgtide_md5` / `md5pass` (stored as md5, md5 over TCP) and `pgtide_scram` /
/// `scrampass` (SCRAM). `postgres` is the superuser (trust).
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra login roles as (name, password, superuser); passwords stored as SCRAM, and
    /// such roles authenticate with scram-sha-256 over TCP.
    pub users: Vec<(String, String, bool)>,
    /// Databases to create, owned by the first of `users` (or `postgres` if none).
    pub databases: Vec<String>,
    /// Also start a streaming hot-standby replica of the primary.
    pub with_replica: bool,
}

/// A running throwaway cluster. Stopped and removed by [`LocalCluster::stop`], `Drop`,
/// or at process exit (see the module documentation).
#[derive(Debug)]
pub struct LocalCluster {
    /// TCP port of the primary on 127.0.0.1.
    pub primary_port: u16,
    /// TCP port of the hot-standby replica on 127.0.0.1, when started.
    pub replica_port: Option<u16>,
    /// The temporary directory: `primary/`, `replica/`, their logs and unix sockets.
    pub dir: PathBuf,
    bindir: PathBuf,
    psql: PathBuf,
    run_as: Option<RunAs>,
    id: u64,
}

/// The OS user the servers run as when we are root.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// What it takes to clean up a cluster without its `LocalCluster` (at exit).
struct Tracked {
    id: u64,
    bindir: PathBuf,
    dir: PathBuf,
    run_as: Option<RunAs>,
    watchdog: Option<Child>,
}

/// Every cluster of this process that has not been stopped yet.
static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static ATEXIT: Once = Once::new();

/// The watchdog (see the module documentation). `$1` = bindir, `$2` = cluster dir.
const WATCHDOG_SCRIPT: &str = r#"read -r line
if [ "$line" = done ]; then exit 0; fi
for d in "$2/replica" "$2/primary"; do
  if [ -f "$d/postmaster.pid" ]; then "$1/pg_ctl" stop -D "$d" -m immediate -w -t 30; fi
done
rm -rf "$2"
"#;

impl LocalCluster {
    /// Creates, starts and sets up a cluster; on any failure everything created so far is
    /// stopped and removed, and the error says what failed (with the server log's tail).
    pub fn start(opts: &ClusterOptions) -> Result<LocalCluster, String> {
        let bindir = find_bindir()?;
        let psql = find_psql(&bindir)?;
        let run_as = server_user()?;
        let dir = make_temp_dir(run_as)?;
        register_atexit();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let watchdog = spawn_watchdog(&bindir, &dir, run_as);
        lock_tracked().push(Tracked {
            id,
            bindir: bindir.clone(),
            dir: dir.clone(),
            run_as,
            watchdog,
        });
        // From here on, dropping `cluster` (e.g. through `?`) cleans up.
        let mut cluster = LocalCluster {
            primary_port: 0,
            replica_port: None,
            dir,
            bindir,
            psql,
            run_as,
            id,
        };
        cluster.start_primary()?;
        cluster.create_roles_and_databases(opts)?;
        if opts.with_replica {
            cluster.start_replica()?;
        }
        Ok(cluster)
    }

    /// The directory holding the PostgreSQL server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server log of the primary (`replica == false`) or the replica.
    pub fn log_path(&self, replica: bool) -> PathBuf {
        self.dir.join(if replica {
            "replica.log"
        } else {
            "primary.log"
        })
    }

    /// Runs `sql` (one or more statements, each sent on its own) with `psql -X -At` as the
    /// superuser `postgres` over the unix socket, stopping at the first error. Returns
    /// stdout without its trailing newline, or `Err` with stderr.
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = self.command(&self.psql, false);
        cmd.args(["-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(&self.dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg(db)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.psql.display()))?;
        // Feed stdin from another thread so a large output cannot deadlock us.
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_string();
            std::thread::spawn(move || {
                let _ = stdin.write_all(sql.as_bytes());
            })
        });
        let out = child.wait_with_output().map_err(|e| format!("psql: {e}"))?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if out.status.success() {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            while s.ends_with('\n') {
                s.pop();
            }
            Ok(s)
        } else {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(if err.is_empty() {
                format!("psql exited with {}", out.status)
            } else {
                err
            })
        }
    }

    /// Waits until the replica has replayed everything written on the primary so far
    /// (the end of a WAL record written now, see the comment inside); no-op without a
    /// replica.
    pub fn wait_replica_caught_up(&self) -> Result<(), String> {
        let Some(replica) = self.replica_port else {
            return Ok(());
        };
        // pg_current_wal_insert_lsn() is no good target: right after a WAL segment switch
        // (pg_basebackup ends with one) it points past the switch record, and nothing may
        // be replayed beyond that until the next record is written (up to 15 s later, the
        // background writer's running-xacts record). So write a record of our own; the
        // function returns its end, which is what pg_last_wal_replay_lsn() reports.
        let target = self.psql(
            self.primary_port,
            "postgres",
            "SELECT pg_logical_emit_message(false, 'pgtide', 'replica catch-up')",
        )?;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = self.psql(replica, "postgres", &sql);
            if matches!(last.as_deref(), Ok("t")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the replica did not replay up to {target} within {}s (last answer: {last:?}); replica log:\n{}",
                    READY_TIMEOUT.as_secs(),
                    log_tail(&self.log_path(true))
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the servers (`pg_ctl stop -m fast`) and removes the directory. Idempotent.
    pub fn stop(&mut self) {
        let tracked = {
            let mut list = lock_tracked();
            list.iter()
                .position(|t| t.id == self.id)
                .map(|i| list.swap_remove(i))
        };
        if let Some(t) = tracked {
            cleanup(t, "fast");
        }
    }

    fn start_primary(&mut self) -> Result<(), String> {
        let data = self.dir.join("primary");
        let mut initdb = self.command(self.bindir.join("initdb"), true);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        run(initdb, "initdb")?;
        std::fs::write(data.join("pg_hba.conf"), PG_HBA)
            .map_err(|e| format!("cannot write pg_hba.conf: {e}"))?;
        let conf = format!(
            "\n# pgtide LocalCluster\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             hot_standby = on\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = 128MB\n\
             wal_keep_size = 256MB\n\
             wal_writer_delay = 10ms\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            self.dir.display().to_string().replace('\'', "''")
        );
        append(&data.join("postgresql.conf"), &conf)?;
        self.primary_port = self.start_server("primary")?;
        Ok(())
    }

    fn create_roles_and_databases(&self, opts: &ClusterOptions) -> Result<(), String> {
        let mut sql = String::from(
            "CREATE ROLE pgtide_trust LOGIN;\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE pgtide_md5 LOGIN PASSWORD 'md5pass';\n\
             SET password_encryption = 'scram-sha-256';\n\
             CREATE ROLE pgtide_scram LOGIN PASSWORD 'scrampass';\n",
        );
        for (name, password, superuser) in &opts.users {
            sql.push_str(&format!(
                "CREATE ROLE {} LOGIN{} PASSWORD {};\n",
                quote_ident(name),
                if *superuser { " SUPERUSER" } else { "" },
                quote_literal(password)
            ));
        }
        let owner = opts
            .users
            .first()
            .map(|u| u.0.as_str())
            .unwrap_or("postgres");
        for db in &opts.databases {
            sql.push_str(&format!(
                "CREATE DATABASE {} OWNER {};\n",
                quote_ident(db),
                quote_ident(owner)
            ));
        }
        self.psql(self.primary_port, "postgres", &sql)
            .map(drop)
            .map_err(|e| format!("setting up roles and databases failed: {e}"))
    }

    fn start_replica(&mut self) -> Result<(), String> {
        let data = self.dir.join("replica");
        let mut basebackup = self.command(self.bindir.join("pg_basebackup"), true);
        basebackup
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.primary_port.to_string());
        run(basebackup, "pg_basebackup")?;
        let port = self.start_server("replica")?;
        self.replica_port = Some(port);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = self.psql(port, "postgres", "SELECT pg_is_in_recovery()");
            if matches!(last.as_deref(), Ok("t")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the replica is not a hot standby after {}s (last answer: {last:?}); replica log:\n{}",
                    READY_TIMEOUT.as_secs(),
                    log_tail(&self.log_path(true))
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_replica_caught_up()
    }

    /// Starts the server in `<dir>/<name>` on a free port with `pg_ctl start -w`, retrying
    /// on another port if the chosen one got taken in the meantime. Returns the port.
    fn start_server(&self, name: &str) -> Result<u16, String> {
        let data = self.dir.join(name);
        let log = self.dir.join(format!("{name}.log"));
        let mut last_err = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            append(&data.join("postgresql.conf"), &format!("port = {port}\n"))?;
            let log_len_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut pg_ctl = self.command(self.bindir.join("pg_ctl"), true);
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t"])
                .arg(READY_TIMEOUT.as_secs().to_string())
                .arg("start");
            match run(pg_ctl, &format!("pg_ctl start ({name})")) {
                Ok(_) => return Ok(port),
                Err(e) => {
                    let text = std::fs::read(&log).unwrap_or_default();
                    let start = usize::try_from(log_len_before).unwrap_or(0).min(text.len());
                    let new = String::from_utf8_lossy(&text[start..]);
                    last_err = format!("{e}\n{name} server log:\n{}", log_tail(&log));
                    if !(new.contains("could not bind") || new.contains("already in use")) {
                        return Err(last_err);
                    }
                }
            }
        }
        Err(last_err)
    }

    /// A command with a clean environment (no `PG*` variables), run in the cluster
    /// directory, as the `postgres` user when `as_server` and we are root.
    fn command(&self, program: impl AsRef<OsStr>, as_server: bool) -> Command {
        let mut cmd = Command::new(program);
        clean_env(&mut cmd);
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        if as_server {
            if let Some(r) = self.run_as {
                cmd.uid(r.uid).gid(r.gid).env("HOME", &self.dir);
            }
        }
        cmd
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

const PG_HBA: &str = "local all all trust
host replication all 127.0.0.1/32 trust
host all postgres 127.0.0.1/32 trust
host all pgtide_trust 127.0.0.1/32 trust
host all pgtide_md5 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
";

/// Stops the servers of `t` (with `mode`, falling back to `immediate` and then SIGKILL of
/// the postmaster we started), dismisses its watchdog and removes its directory.
fn cleanup(mut t: Tracked, mode: &str) {
    for name in ["replica", "primary"] {
        let data = t.dir.join(name);
        let pid_file = data.join("postmaster.pid");
        if !pid_file.exists() {
            continue;
        }
        let stop = |mode: &str| {
            let mut cmd = Command::new(t.bindir.join("pg_ctl"));
            clean_env(&mut cmd);
            cmd.current_dir(&t.dir)
                .arg("-D")
                .arg(&data)
                .args(["-m", mode, "-w", "-t", "30", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(r) = t.run_as {
                cmd.uid(r.uid).gid(r.gid).env("HOME", &t.dir);
            }
            cmd.status().map(|s| s.success()).unwrap_or(false)
        };
        if !stop(mode) && !stop("immediate") {
            // Last resort: the postmaster's PID is the first line of postmaster.pid.
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if let Some(pid) = pid.filter(|p| *p > 0) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    if let Some(mut w) = t.watchdog.take() {
        if let Some(mut stdin) = w.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let _ = w.wait();
    }
    let _ = std::fs::remove_dir_all(&t.dir);
}

fn lock_tracked() -> std::sync::MutexGuard<'static, Vec<Tracked>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

fn register_atexit() {
    ATEXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn` without captured state.
        unsafe {
            libc::atexit(stop_all_at_exit);
        }
    });
}

extern "C" fn stop_all_at_exit() {
    // Never block exit on a lock another (still running) thread holds: the watchdogs
    // clean up in that case.
    let list = match TRACKED.try_lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(std::sync::TryLockError::Poisoned(p)) => std::mem::take(&mut *p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let _ = std::panic::catch_unwind(move || {
        for t in list {
            cleanup(t, "immediate");
        }
    });
}

fn spawn_watchdog(bindir: &Path, dir: &Path, run_as: Option<RunAs>) -> Option<Child> {
    let mut cmd = Command::new("/bin/sh");
    clean_env(&mut cmd);
    cmd.arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("pgtide-cluster-watchdog")
        .arg(bindir)
        .arg(dir)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if let Some(r) = run_as {
        cmd.uid(r.uid).gid(r.gid).env("HOME", dir);
    }
    // Without a watchdog the atexit handler and Drop still clean up; not fatal.
    cmd.spawn().ok()
}

/// Removes every `PG*` variable (PGHOST, PGPORT, PGDATA, PGOPTIONS, ...) so the caller's
/// environment cannot redirect or alter our commands.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
}

fn run(mut cmd: Command, what: &str) -> Result<Output, String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot append to {}: {e}", path.display()))
}

/// The last 40 lines of a log file, or a note that it cannot be read.
fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

fn make_temp_dir(run_as: Option<RunAs>) -> Result<PathBuf, String> {
    // Unix socket paths are limited to ~107 bytes: fall back to /tmp for a long TMPDIR.
    let mut base = std::env::temp_dir();
    if base.as_os_str().len() > 60 {
        base = PathBuf::from("/tmp");
    }
    let dir = tempfile::Builder::new()
        .prefix("pgtide-cluster-")
        .tempdir_in(&base)
        .map_err(|e| {
            format!(
                "cannot create a temporary directory in {}: {e}",
                base.display()
            )
        })?
        .keep();
    if let Some(r) = run_as {
        if let Err(e) = std::os::unix::fs::chown(&dir, Some(r.uid), Some(r.gid)) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("cannot chown {} to postgres: {e}", dir.display()));
        }
    }
    Ok(dir)
}

/// `None` when not root; the `postgres` user when root; an error if root without it.
fn server_user() -> Result<Option<RunAs>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or_else(|| {
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
         OS user to run the servers as; create one (e.g. `useradd --system postgres`, which \
         `apt-get install postgresql` does) or run as a non-root user"
            .to_string()
    })
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `pwd` is plain old data that getpwnam_r fills in; `buf` outlives the call and
    // its length is passed; `result` is checked before `pwd` is read.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES.iter().all(|b| dir.join(b).is_file())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds the PostgreSQL server bindir (see the module documentation for the order).
pub fn find_bindir() -> Result<PathBuf, String> {
    let mut searched = Vec::new();

    match std::env::var_os("PGTIDE_PG_BINDIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if has_server_binaries(&d) {
                return Ok(d);
            }
            searched.push(format!(
                "$PGTIDE_PG_BINDIR={} (lacks server binaries)",
                d.display()
            ));
        }
        None => searched.push("$PGTIDE_PG_BINDIR (unset)".to_string()),
    }

    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&d) {
                return Ok(d);
            }
            searched.push(format!(
                "`pg_config --bindir` = {} (lacks server binaries)",
                d.display()
            ));
        }
        Ok(out) => searched.push(format!("`pg_config --bindir` (failed: {})", out.status)),
        Err(_) => searched.push("`pg_config --bindir` (pg_config not on PATH)".to_string()),
    }

    match which("initdb") {
        Some(p) => {
            let real = std::fs::canonicalize(&p).unwrap_or(p.clone());
            if let Some(d) = real.parent().filter(|d| has_server_binaries(d)) {
                return Ok(d.to_path_buf());
            }
            searched.push(format!(
                "initdb on PATH = {} (its directory lacks the other server binaries)",
                real.display()
            ));
        }
        None => searched.push("initdb on PATH (not found)".to_string()),
    }

    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server_binaries(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    searched.push("/usr/lib/postgresql/*/bin (none with server binaries)".to_string());

    Err(format!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup) not found; \
         install PostgreSQL server binaries, e.g. `apt-get install postgresql` (Debian/Ubuntu), \
         `dnf install postgresql-server` (Fedora) or `brew install postgresql` (macOS), \
         or set PGTIDE_PG_BINDIR. Searched: {}",
        searched.join("; ")
    ))
}

fn find_psql(bindir: &Path) -> Result<PathBuf, String> {
    let p = bindir.join("psql");
    if p.is_file() {
        return Ok(p);
    }
    which("psql").ok_or_else(|| {
        format!(
            "psql not found in {} nor on PATH; install the PostgreSQL client, e.g. \
             `apt-get install postgresql-client`",
            bindir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
