//! `pgtide import`: PgBouncer configurations translated into pooler.toml files that
//! `pgtide check-config` accepts and that serve the same databases.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cli::{check_config, free_addr, ChildGuard};
use crate::harness::{self, tcp_connect_string};

const PGTIDE: &str = env!("CARGO_BIN_EXE_pgtide");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("integration/fixtures")
        .join(name)
}

/// `pgtide import INI [--userlist FILE]`: (success, stdout, stderr).
fn import(ini: &Path, userlist: Option<&Path>) -> (bool, String, String) {
    let mut cmd = Command::new(PGTIDE);
    cmd.arg("import").arg(ini);
    if let Some(u) = userlist {
        cmd.arg("--userlist").arg(u);
    }
    let out = cmd.output().expect("run pgtide import");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Imports, writes the result next to the input and checks it with `check-config`.
fn import_and_check(ini: &Path, userlist: Option<&Path>, out: &Path) -> String {
    let (ok, toml, err) = import(ini, userlist);
    assert!(ok, "pgtide import {}: {err}", ini.display());
    assert!(
        err.is_empty(),
        "pgtide import {} warns:\n{err}\n{toml}",
        ini.display()
    );
    std::fs::write(out, &toml).unwrap();
    let (status, text) = check_config(out);
    assert!(status.success(), "check-config: {text}\n{toml}");
    toml
}

/// PgBouncer's sample with the example lines it has commented out enabled (`;name =
/// ...`, `; name = ...`), except the `<system default>` placeholders.
fn sample_with_examples_enabled() -> String {
    let text = std::fs::read_to_string(fixture("pgbouncer-1.25.2-sample.ini")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let body = line
            .strip_prefix(';')
            .map(|b| b.strip_prefix(' ').unwrap_or(b));
        let setting = body.filter(|b| {
            !line.starts_with(";;")
                && !b.contains("<system default>")
                && b.split_once('=').is_some_and(|(k, _)| {
                    let k = k.trim();
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_*".contains(c))
                })
        });
        out.push_str(setting.unwrap_or(line));
        out.push('\n');
    }
    out
}

#[test]
fn pgbouncer_sample_config_imports() {
    let dir = tempfile::tempdir().unwrap();
    let userlist = fixture("pgbouncer-sample-userlist.txt");

    // As shipped, the sample defines no database: the import says so, and check-config
    // names exactly that.
    let (ok, toml, err) = import(&fixture("pgbouncer-1.25.2-sample.ini"), Some(&userlist));
    assert!(ok, "{err}");
    assert!(err.contains("no database is configured"), "{err}");
    toml.parse::<toml::Table>().expect("valid TOML");
    for said in [
        "logfile = /var/log/pgbouncer/pgbouncer.log",
        "pidfile = ",
        "defines no database",
    ] {
        assert!(toml.contains(said), "{said:?} missing in:\n{toml}");
    }
    let file = dir.path().join("sample.toml");
    std::fs::write(&file, &toml).unwrap();
    let (status, text) = check_config(&file);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("1 problem(s)") && text.contains("no database"),
        "{text}"
    );

    // With its example lines enabled (every option of the sample, its databases, the
    // `*` fallback and the [users] example), the result passes check-config.
    let all = dir.path().join("all.ini");
    std::fs::write(&all, sample_with_examples_enabled()).unwrap();
    let toml = import_and_check(&all, Some(&userlist), &dir.path().join("all.toml"));
    let config = pgtide::config::Config::from_toml_str(&toml).unwrap();
    assert_eq!(
        config.databases.keys().collect::<Vec<_>>(),
        ["bardb", "foodb", "forcedb", "nondefaultdb"]
    );
    assert_eq!(config.databases["forcedb"].port, 300);
    assert_eq!(config.databases["nondefaultdb"].pool_size, Some(50));
    assert_eq!(config.users["baz"].password.as_deref(), Some("foo"));
    assert_eq!(config.users["user1"].pool_size, Some(5));
    assert_eq!(
        config.pgtide.admin_users,
        ["user2", "someadmin", "otheradmin"]
    );
    let flat: String = toml
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .collect::<Vec<_>>()
        .join(" ");
    for said in [
        "stats_users = stats, root",
        "no read-only role",
        "PgBouncer's fallback for any database name",
        "reserve_pool_size=10",
        "connect_query=SELECT 1",
    ] {
        assert!(flat.contains(said), "{said:?} missing in:\n{toml}");
    }
}

/// A pgbouncer.ini with every section, pointed at the test cluster.
fn realistic_ini(dir: &Path, listen: SocketAddr, db: &str, other: &str) -> PathBuf {
    let port = harness::primary_port();
    let userlist = dir.join("userlist.txt");
    std::fs::write(
        &userlist,
        format!(
            ";; PgBouncer's users\n\"{}\" \"{}\"\n\"pgtide_md5\" \"md5{}\"\n",
            harness::APP_USER,
            harness::APP_PASSWORD,
            pgtide::auth::md5::password_hash("md5pass", "pgtide_md5")
        ),
    )
    .unwrap();
    let ini = format!(
        ";;; PgBouncer in front of the test cluster
[databases]
appdb = host=127.0.0.1 port={port} dbname={db}
other = host=localhost port={port} dbname={other} pool_size=3 pool_mode=transaction reserve_pool_size=2
forced = host=127.0.0.1 port={port} dbname={db} user=pgtide_md5 password='md5pass' connect_query='SELECT 1'
* = host=127.0.0.1 port={port}

[pgbouncer]
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
listen_addr = {ip}
listen_port = {lport}
unix_socket_dir = {dir}
auth_type = md5
auth_file = {userlist}
admin_users = {app}
stats_users = pgtide_md5
pool_mode = transaction
default_pool_size = 5
min_pool_size = 0
max_client_conn = 50
max_db_connections = 20
reserve_pool_size = 1
server_reset_query = DISCARD ALL
server_check_query = select 1
server_lifetime = 3600
server_idle_timeout = 60
server_connect_timeout = 5
query_wait_timeout = 10
client_login_timeout = 60
idle_transaction_timeout = 0
client_tls_sslmode = disable
server_tls_sslmode = prefer
max_prepared_statements = 100
ignore_startup_parameters = extra_float_digits
so_reuseport = 0
tcp_keepalive = 1

[users]
{app} = pool_mode=session pool_size=4

[peers]
1 = host=127.0.0.1 port=7432
",
        dir = dir.display(),
        ip = listen.ip(),
        lport = listen.port(),
        userlist = userlist.display(),
        app = harness::APP_USER,
    );
    let file = dir.join("pgbouncer.ini");
    std::fs::write(&file, ini).unwrap();
    file
}

#[test]
fn a_realistic_pgbouncer_ini_serves_the_same_databases() {
    let db = harness::fresh_database("import_app");
    let other = harness::fresh_database("import_other");
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let ini = realistic_ini(dir.path(), listen, &db, &other);
    let userlist = dir.path().join("userlist.txt");

    // Both ways: users written into the file, or auth_file kept.
    let inlined = import_and_check(&ini, Some(&userlist), &dir.path().join("inlined.toml"));
    assert!(!inlined.contains("\nauth_file = "), "{inlined}");
    let kept = import_and_check(&ini, None, &dir.path().join("kept.toml"));
    assert!(kept.contains("\nauth_file = "), "{kept}");
    assert!(
        kept.contains("[peers] is listed but peer_id is 0 or not set"),
        "peers without a peer_id are left out, and the file says so: {kept}"
    );

    for name in ["inlined.toml", "kept.toml"] {
        let file = dir.path().join(name);
        let mut cmd = Command::new(PGTIDE);
        cmd.env_remove("DATABASE_URL")
            .arg("--config")
            .arg(&file)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0");
        let mut child = ChildGuard::spawn(cmd, "pgtide --config (imported)", false);
        child.wait_accepting(listen);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let query = |user: &'static str, password: &'static str, database: &'static str| {
                let conn = tcp_connect_string(listen, user, password, database);
                async move {
                    let c = harness::to("login", harness::connect(&conn))
                        .await
                        .unwrap_or_else(|e| panic!("{user}@{database}: {e:?}"));
                    let row = harness::to(
                        "query",
                        c.query_one("SELECT current_database()::text, current_user::text", &[]),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{user}@{database}: {e:?}"));
                    (row.get::<_, String>(0), row.get::<_, String>(1))
                }
            };
            assert_eq!(
                query(harness::APP_USER, harness::APP_PASSWORD, "appdb").await,
                (db.clone(), harness::APP_USER.to_string())
            );
            assert_eq!(
                query(harness::APP_USER, harness::APP_PASSWORD, "other").await,
                (other.clone(), harness::APP_USER.to_string())
            );
            // The forced user of `forced`: clients now log in as that user.
            assert_eq!(
                query("pgtide_md5", "md5pass", "forced").await,
                (db.clone(), "pgtide_md5".to_string())
            );
            // The `*` fallback is not served: only the listed databases are.
            let conn =
                tcp_connect_string(listen, harness::APP_USER, harness::APP_PASSWORD, "postgres");
            assert!(harness::connect(&conn).await.is_err());
            // admin_users reach the console under PgBouncer's name for it.
            let conn = tcp_connect_string(
                listen,
                harness::APP_USER,
                harness::APP_PASSWORD,
                "pgbouncer",
            );
            let admin = harness::to("console login", harness::connect(&conn))
                .await
                .expect("console login");
            let rows = harness::to("SHOW DATABASES", admin.simple_query("SHOW DATABASES"))
                .await
                .expect("SHOW DATABASES");
            let shown = format!("{rows:?}");
            for name in ["appdb", "other", "forced"] {
                assert!(
                    shown.contains(name),
                    "{name} not in SHOW DATABASES: {shown}"
                );
            }
        });
        drop(child);
    }
}

#[test]
fn mistakes_in_the_ini_fail_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    for (text, line, what) in [
        (
            "[pgbouncer]\nlisten_port = 6432\n[pgbouncers]\n",
            3,
            "unknown section [pgbouncers]",
        ),
        (
            "[databases]\n\napp = host=db prot=5432\n",
            3,
            "unknown connection parameter \"prot\"",
        ),
        ("[pgbouncer]\nlisten_port 6432\n", 2, "expected `=`"),
        ("[pgbouncer]\nserver_lifetime = 1h\n", 2, "seconds"),
        ("[pgbouncer]\n%include other.ini\n", 2, "%include"),
    ] {
        let file = dir.path().join("bad.ini");
        std::fs::write(&file, text).unwrap();
        let (ok, out, err) = import(&file, None);
        assert!(!ok, "{text:?} imported:\n{out}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains(&format!("bad.ini: line {line}: ")) && err.contains(what),
            "{text:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = import(&dir.path().join("missing.ini"), None);
    assert!(!ok);
    assert!(err.contains("cannot read"), "{err}");
}
