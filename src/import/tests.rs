use std::time::Duration;

use super::*;
use crate::config::{AuthType, Config, PoolMode};

fn run(ini: &str, userlist: Option<&str>) -> Imported {
    import(&Input {
        ini,
        ini_name: "pgbouncer.ini",
        userlist: userlist.map(|u| (u, "userlist.txt")),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn load(out: &Imported) -> Config {
    assert!(out.warnings.is_empty(), "{:?}\n{}", out.warnings, out.toml);
    Config::from_toml_str(&out.toml).unwrap_or_else(|e| panic!("{e}\n{}", out.toml))
}

/// The output with comment lines joined, so that a wrapped comment reads as one text.
fn said(out: &Imported) -> String {
    out.toml
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .collect::<Vec<_>>()
        .join(" ")
}

fn error(ini: &str) -> ImportError {
    match import(&Input {
        ini,
        ini_name: "pgbouncer.ini",
        userlist: None,
    }) {
        Ok(out) => panic!("imported:\n{}", out.toml),
        Err(e) => e,
    }
}

const REALISTIC: &str = "\
[databases]
app = host=10.0.0.5 port=5433 dbname=app_production pool_size=30 min_pool_size=2 max_db_connections=50
reports = host=10.0.0.6 dbname=warehouse pool_mode=session auth_user=lookup auth_query='SELECT usename, passwd FROM lookup($1)'
forced = host=10.0.0.5 user=svc password='it''s \"quoted\" \\ here' connect_query='SELECT 1' timezone=UTC
sock = dbname=local reserve_pool_size=3
ring = host=10.0.0.7,10.0.0.8 port=5432 load_balance_hosts=round-robin
* = host=fallback.internal

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6543
pool_mode = transaction
default_pool_size = 10
min_pool_size = 1
max_client_conn = 500
max_db_connections = 80
auth_type = md5
auth_file = /etc/pgbouncer/userlist.txt
admin_users = admin, ops
stats_users = stats
query_wait_timeout = 0
server_connect_timeout = 2.5
server_idle_timeout = 300
server_lifetime = 1800
idle_transaction_timeout = 60
client_idle_timeout = 0
client_login_timeout = 20
server_reset_query = DISCARD ALL
max_prepared_statements = 100
track_extra_parameters = IntervalStyle, search_path, statement_timeout
server_tls_sslmode = require
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
unix_socket_dir = /var/run/postgresql
so_reuseport = 1
reserve_pool_size = 5
server_check_query = select 1
ignore_startup_parameters = extra_float_digits
peer_id = 1

[users]
admin = pool_mode=session pool_size=2
ops = max_user_connections=10 query_timeout=30

[peers]
1 = host=/tmp/pgbouncer-1
2 = host=10.0.0.9 port=6432
";

#[test]
fn a_realistic_file_maps_every_option() {
    let out = run(REALISTIC, None);
    let c = load(&out);
    let g = &c.pgtide;
    assert_eq!(g.listen.to_string(), "0.0.0.0:6543");
    assert_eq!(g.pool_mode, PoolMode::Transaction);
    assert_eq!(g.pool_size, 10);
    assert_eq!(g.min_pool_size, 1);
    assert_eq!(g.max_client_conn, 500);
    assert_eq!(g.max_db_connections, 80);
    assert_eq!(g.auth_type, AuthType::Md5);
    assert_eq!(g.auth_file, "/etc/pgbouncer/userlist.txt");
    assert_eq!(g.admin_users, ["admin", "ops"]);
    assert_eq!(g.query_wait_timeout.0, Duration::from_secs(86400));
    assert_eq!(g.server_connect_timeout.0, Duration::from_millis(2500));
    assert_eq!(g.server_idle_timeout.0, Duration::from_secs(300));
    assert_eq!(g.server_lifetime.0, Duration::from_secs(1800));
    assert_eq!(g.idle_transaction_timeout.0, Duration::from_secs(60));
    assert_eq!(g.client_idle_timeout.0, Duration::ZERO);
    assert_eq!(g.client_login_timeout.0, Duration::from_secs(20));
    assert!(g.auth_failure_delay_max.0 < g.client_login_timeout.0);
    assert_eq!(g.max_prepared_statements, 100);
    assert_eq!(g.track_extra_params, ["statement_timeout"]);
    assert!(g.log_connections);
    assert_eq!(g.server_tls_sslmode.to_string(), "require");

    let app = &c.databases["app"];
    assert_eq!((app.host.as_str(), app.port), ("10.0.0.5", 5433));
    assert_eq!(app.dbname.as_deref(), Some("app_production"));
    assert_eq!(app.pool_size, Some(30));
    assert_eq!(app.min_pool_size, Some(2));
    assert_eq!(app.max_db_connections, Some(50));
    let reports = &c.databases["reports"];
    assert_eq!(reports.pool_mode, Some(PoolMode::Session));
    assert_eq!(reports.port, 5432);
    assert_eq!(reports.auth_user.as_deref(), Some("lookup"));
    assert_eq!(
        reports.auth_query.as_deref(),
        Some("SELECT usename, passwd FROM lookup($1)")
    );
    // The forced user becomes a user with the password, quotes and all.
    assert_eq!(
        c.users["svc"].password.as_deref(),
        Some("it's \"quoted\" \\ here")
    );
    assert_eq!(c.databases["sock"].host, "127.0.0.1");
    assert_eq!(c.databases["sock"].dbname.as_deref(), Some("local"));
    let ring = c.databases["ring"].hosts.as_ref().expect("hosts");
    assert_eq!(ring.len(), 2);
    assert_eq!(ring[1].host, "10.0.0.8");
    assert!(!c.databases.contains_key("*"));
    assert_eq!(c.users["admin"].pool_mode, Some(PoolMode::Session));
    assert_eq!(c.users["admin"].pool_size, Some(2));
    assert!(c.pgtide.so_reuseport);
    assert_eq!(c.pgtide.peer_id, 1);
    assert_eq!(
        c.pgtide.peers.get("2").map(String::as_str),
        Some("10.0.0.9:6432"),
        "a peer with a TCP address carries over; the one on a Unix socket is a comment"
    );
    assert!(!c.pgtide.peers.contains_key("1"));
    assert_eq!(
        c.users["ops"].query_timeout,
        Some(crate::config::ConfigDuration::secs(30)),
        "a user's query_timeout carries over"
    );

    // What has no equivalent is said in comments.
    for text in [
        "logfile = /var/log/pgbouncer/pgbouncer.log (line 32): none in pgtide",
        "pidfile = /var/run/pgbouncer/pgbouncer.pid",
        "unix_socket_dir",
        "tcp_migrate_req",
        "reserve_pool_size = 5",
        "server_check_query",
        "ignore_startup_parameters",
        "stats_users = stats",
        "no read-only role",
        "peer_listen",
        "[peers] 1 = host=/tmp/pgbouncer-1",
        "connect_query=SELECT 1",
        "ALTER DATABASE forced SET timezone = 'UTC'",
        "reserve_pool_size=3",
        "load_balance_hosts=round-robin",
        "max_user_connections=10",
        "PgBouncer's fallback for any database name",
        "Unix socket",
        "clients of this database connect as \"svc\"",
    ] {
        assert!(
            said(&out).contains(text),
            "missing {text:?} in:\n{}",
            out.toml
        );
    }
    // Every comment line is a comment; the password is not in one.
    for line in out.toml.lines() {
        if line.contains("quoted") {
            assert!(line.starts_with("password = "), "{line}");
        }
    }
}

#[test]
fn pgbouncer_defaults_that_differ_are_written_out() {
    let out = run("[databases]\napp = host=db\n[pgbouncer]\n", None);
    let c = load(&out);
    let g = &c.pgtide;
    assert_eq!(g.pool_mode, PoolMode::Session);
    assert_eq!(g.max_client_conn, 100);
    assert_eq!(g.auth_type, AuthType::Md5);
    assert_eq!(g.server_connect_timeout.0, Duration::from_secs(15));
    assert!(g.log_connections);
    assert_eq!(g.listen.to_string(), "127.0.0.1:6432");
    assert!(said(&out).contains("Unix socket only"), "{}", out.toml);
}

#[test]
fn every_option_without_an_equivalent_becomes_a_comment() {
    let mut ini = String::from("[databases]\napp = host=db\n[pgbouncer]\n");
    for (key, _) in NO_EQUIVALENT {
        ini.push_str(&format!("{key} = 1\n"));
    }
    let out = run(&ini, None);
    load(&out);
    for (key, what) in NO_EQUIVALENT {
        let line = ini
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            + 1;
        let value = if *key == "auth_ldap_options" {
            "(value not shown)"
        } else {
            "1"
        };
        let text = format!("{key} = {value} (line {line}): none in pgtide:");
        assert!(said(&out).contains(&text), "{text}\n{}", out.toml);
        let first_words: String = what
            .split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(said(&out).contains(&first_words), "{first_words}");
    }
}

#[test]
fn timeouts_in_seconds_become_durations_and_zero_keeps_its_meaning() {
    let out = run(
        "[databases]\napp = host=db\n[pgbouncer]\nquery_wait_timeout = 0.5\nserver_lifetime = 0\nserver_connect_timeout = 0\nclient_login_timeout = 0\nserver_idle_timeout = 0\n",
        None,
    );
    let c = load(&out);
    let g = &c.pgtide;
    assert_eq!(g.query_wait_timeout.0, Duration::from_millis(500));
    assert_eq!(g.server_lifetime.0, Duration::from_millis(1));
    assert_eq!(g.server_connect_timeout.0, Duration::from_secs(86400));
    assert_eq!(g.client_login_timeout.0, Duration::from_secs(86400));
    assert_eq!(g.server_idle_timeout.0, Duration::ZERO);
    assert!(said(&out).contains("used once and closed"), "{}", out.toml);
}

#[test]
fn a_userlist_becomes_users() {
    let list = "\"alice\" \"secret\"\n\"bob\" \"md545f2603610af569b6155c45067268c6b\"\n\"q\"\"uote\" \"pa\"\"ss\"\n";
    let out = run(
        "[databases]\napp = host=db\n[pgbouncer]\nauth_type = md5\nauth_file = /etc/pgbouncer/userlist.txt\nadmin_users = alice\n",
        Some(list),
    );
    let c = load(&out);
    assert_eq!(c.pgtide.auth_file, "");
    assert_eq!(c.users["alice"].password.as_deref(), Some("secret"));
    assert_eq!(
        c.users["bob"].password.as_deref(),
        Some("md545f2603610af569b6155c45067268c6b")
    );
    assert_eq!(c.users["q\"uote"].password.as_deref(), Some("pa\"ss"));
    assert!(
        said(&out).contains("no auth_file is needed"),
        "{}",
        out.toml
    );

    // Under scram-sha-256 an md5 hash cannot log in: the user is left out, and said so.
    let out = run(
        "[databases]\napp = host=db\n[pgbouncer]\nauth_type = scram-sha-256\n",
        Some(list),
    );
    let c = load(&out);
    assert!(!c.users.contains_key("bob"));
    assert!(
        said(&out).contains("[users.bob] is left out"),
        "{}",
        out.toml
    );
}

#[test]
fn what_pgtide_would_refuse_is_a_warning() {
    let out = run("[pgbouncer]\nlisten_port = 6432\n", None);
    assert!(
        out.warnings.iter().any(|w| w.contains("no database")),
        "{:?}",
        out.warnings
    );
    assert!(said(&out).contains("defines no database"), "{}", out.toml);
    // Still valid TOML.
    out.toml.parse::<toml::Table>().unwrap();
}

#[test]
fn tls_files_with_tls_off_are_left_out() {
    let out = run(
        "[databases]\napp = host=db\n[pgbouncer]\nclient_tls_key_file = /k.pem\nclient_tls_cert_file = /c.pem\nserver_tls_sslmode = verify-full\n",
        None,
    );
    let c = load(&out);
    assert_eq!(c.pgtide.client_tls_key_file, "");
    assert_eq!(
        c.pgtide.server_tls_ca_file,
        "/etc/ssl/certs/ca-certificates.crt"
    );
    assert!(
        said(&out).contains("client_tls_key_file = /k.pem"),
        "{}",
        out.toml
    );
}

#[test]
fn mistakes_are_errors_with_their_line() {
    let e = error("[pgbouncer]\nlisten_port = 6432\nlisten_prot = 1\n");
    assert_eq!(e.line, Some(3));
    assert!(
        e.message
            .contains("unknown PgBouncer option \"listen_prot\""),
        "{e}"
    );
    assert!(e.to_string().starts_with("pgbouncer.ini: line 3: "), "{e}");
    let e = error("[databases]\napp = host=db prot=5432\n");
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("\"prot\""), "{e}");
    let e = error("[databases]\napp = host=db port=x\n");
    assert_eq!(e.line, Some(2));
    let e = error("[databases]\napp = host=db password='unclosed\n");
    assert_eq!(e.line, Some(2));
    assert!(!e.message.contains("unclosed"), "{e}");
    let e = error("[pgbouncer]\n\npool_mode = sometimes\n");
    assert_eq!(e.line, Some(3));
    let e = error("[pgbouncer]\nserver_lifetime = 1h\n");
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("seconds"), "{e}");
    let e = error("[pgbouncer]\nmax_client_conn = -1\n");
    assert_eq!(e.line, Some(2));
    let e = error("[users]\nbob = pool_size=2 max_conn=3\n");
    assert_eq!(e.line, Some(2));
    let e = error("[databases]\npgbouncer = host=db\n");
    assert_eq!(e.line, Some(1 + 1));
    let e = error("[peers]\n1 = host=a bogus=1\n");
    assert_eq!(e.line, Some(2));
    let e = error("[pgbouncer]\nauth_type = kerberos\n");
    assert_eq!(e.line, Some(2));
    let e = error("[admin]\n");
    assert_eq!(e.line, Some(1));
}

#[test]
fn a_later_definition_wins_and_is_noted() {
    let out = run(
        "[databases]\napp = host=a\napp = host=b\n[pgbouncer]\npool_mode = session\npool_mode = transaction\n",
        None,
    );
    let c = load(&out);
    assert_eq!(c.databases["app"].host, "b");
    assert_eq!(c.pgtide.pool_mode, PoolMode::Transaction);
    assert!(
        said(&out).contains("defined again on line 3"),
        "{}",
        out.toml
    );
    assert!(
        said(&out).contains("set on line 5 and again on line 6"),
        "{}",
        out.toml
    );
}

#[test]
fn names_and_values_that_need_quoting_stay_valid_toml() {
    let ini = "\u{feff}[databases]\n'my db' = host=db dbname='their db' connect_query='SELECT ''\x07'''\n\"a\"\"b\" = host=db\n[pgbouncer]\nlogfile = /tmp/a\x0bb\nauth_query = SELECT u, \"p\" FROM f($1) -- 'x' \\ y\n";
    let out = run(ini, None);
    let c = load(&out);
    assert_eq!(c.databases["my db"].dbname.as_deref(), Some("their db"));
    assert!(c.databases.contains_key("a\"b"));
    assert_eq!(
        c.pgtide.auth_query,
        "SELECT u, \"p\" FROM f($1) -- 'x' \\ y"
    );
}
