//! The result sets of the admin console's `SHOW` commands, with PgBouncer's column names
//! (and meanings) where PgBouncer has the command.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use crate::registry::{now_us, ClientState};
use crate::shared::Shared;

/// A column's type as RowDescription announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Text,
    Int8,
}

impl Type {
    pub fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int8 => 20,
        }
    }
}

/// Rows to send, every value as text (`None` = NULL).
pub struct ResultSet {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    fn new(columns: &[(&'static str, Type)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

use Type::{Int8 as I, Text as T};

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// `2026-11-28 22:56:39 UTC`, as PgBouncer writes timestamps.
fn timestamp(us: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// Which SHOW commands exist, for errors and `SHOW HELP`.
pub const SHOW_COMMANDS: &[&str] = &[
    "CLIENTS",
    "CONFIG",
    "DATABASES",
    "HELP",
    "HOSTS",
    "LISTS",
    "POOLS",
    "SERVERS",
    "STATS",
    "STATS_TOTALS",
    "VERSION",
];

/// Runs `SHOW what`; `None` when there is no such SHOW command.
pub fn show(shared: &Shared, what: &str) -> Option<ResultSet> {
    Some(match what {
        "POOLS" => pools(shared),
        "STATS" => stats(shared),
        "STATS_TOTALS" => stats_totals(shared),
        "SERVERS" => servers(shared),
        "CLIENTS" => clients(shared),
        "DATABASES" => databases(shared),
        "CONFIG" => config(shared),
        "VERSION" => version(),
        "LISTS" => lists(shared),
        "HOSTS" => hosts(shared),
        "HELP" => help(),
        _ => return None,
    })
}

fn help() -> ResultSet {
    let mut r = ResultSet::new(&[("command", T)]);
    for c in SHOW_COMMANDS {
        r.push(vec![s(format!("SHOW {c}"))]);
    }
    for c in [
        "PAUSE [db]",
        "RESUME [db]",
        "RECONNECT [db]",
        "KILL db",
        "RELOAD",
        "SHUTDOWN",
    ] {
        r.push(vec![s(c)]);
    }
    r
}

fn version() -> ResultSet {
    let mut r = ResultSet::new(&[("version", T)]);
    r.push(vec![s(format!("pgtide {}", env!("CARGO_PKG_VERSION")))]);
    r
}

#[derive(Default)]
struct PoolRow {
    cl_active: u64,
    cl_waiting: u64,
    sv_idle: u64,
    sv_login: u64,
    maxwait_us: u64,
    mode: String,
}

fn pools(shared: &Shared) -> ResultSet {
    let mut rows: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    let config = shared.config();
    // Servers linked to a client, per (database, user).
    let mut linked: HashMap<(String, String), u64> = HashMap::new();
    for (_, e) in shared.servers().snapshot() {
        if e.link.load(Ordering::Relaxed) != 0 {
            *linked
                .entry((e.database.clone(), e.user.clone()))
                .or_default() += 1;
        }
    }
    for pool in shared.pools() {
        let key = (pool.database.clone(), pool.user.clone());
        let (total, idle, _) = pool.counts();
        let row = rows.entry(key).or_default();
        row.sv_idle += idle as u64;
        row.sv_login += u64::from(total).saturating_sub(idle as u64);
        row.mode = pool.settings().pool_mode.to_string();
    }
    let now = now_us();
    for (_, c) in shared.clients().snapshot() {
        if super::is_admin_database(&c.database) {
            continue;
        }
        let row = rows
            .entry((c.database.clone(), c.user.clone()))
            .or_insert_with(|| PoolRow {
                mode: config
                    .pool_settings(&c.database, &c.user)
                    .pool_mode
                    .to_string(),
                ..PoolRow::default()
            });
        match c.state() {
            ClientState::Waiting => {
                row.cl_waiting += 1;
                row.maxwait_us = row.maxwait_us.max(c.waiting_us(now));
            }
            _ => row.cl_active += 1,
        }
    }
    let mut r = ResultSet::new(&[
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
    ]);
    for ((db, user), row) in rows {
        let active = linked
            .get(&(db.clone(), user.clone()))
            .copied()
            .unwrap_or(0);
        // Busy connections not linked to a client are being opened (or about to be).
        let login = row.sv_login.saturating_sub(active);
        r.push(vec![
            s(&db),
            s(&user),
            s(row.cl_active),
            s(row.cl_waiting),
            s(0),
            s(0),
            s(active),
            s(0),
            s(0),
            s(row.sv_idle),
            s(0),
            s(0),
            s(login),
            s(row.maxwait_us / 1_000_000),
            s(row.maxwait_us % 1_000_000),
            s(row.mode),
        ]);
    }
    r
}

fn all_databases(shared: &Shared) -> Vec<String> {
    let mut dbs: Vec<String> = shared.config().databases.keys().cloned().collect();
    for p in shared.pools() {
        if !dbs.contains(&p.database) {
            dbs.push(p.database.clone());
        }
    }
    dbs.sort();
    dbs
}

/// The seven totals of one database, in the order SHOW STATS and SHOW STATS_TOTALS give
/// them (transactions, queries, bytes received and sent, transaction, query and wait time).
fn total_cells(t: &crate::metrics::stats::Totals) -> [Option<String>; 7] {
    [
        s(t.xact_count),
        s(t.query_count),
        s(t.received),
        s(t.sent),
        s(t.xact_time),
        s(t.query_time),
        s(t.wait_time),
    ]
}

fn stats(shared: &Shared) -> ResultSet {
    let totals = shared.totals();
    let avgs = shared.averages();
    let mut r = ResultSet::new(&[
        ("database", T),
        ("total_xact_count", I),
        ("total_query_count", I),
        ("total_received", I),
        ("total_sent", I),
        ("total_xact_time", I),
        ("total_query_time", I),
        ("total_wait_time", I),
        ("avg_xact_count", I),
        ("avg_query_count", I),
        ("avg_recv", I),
        ("avg_sent", I),
        ("avg_xact_time", I),
        ("avg_query_time", I),
        ("avg_wait_time", I),
    ]);
    for db in all_databases(shared) {
        let t = totals.get(&db).copied().unwrap_or_default();
        let a = avgs.get(&db).copied().unwrap_or_default();
        let mut row = vec![s(&db)];
        row.extend(total_cells(&t));
        row.extend([
            s(a.xact_count),
            s(a.query_count),
            s(a.recv),
            s(a.sent),
            s(a.xact_time),
            s(a.query_time),
            s(a.wait_time),
        ]);
        r.push(row);
    }
    r
}

fn stats_totals(shared: &Shared) -> ResultSet {
    let totals = shared.totals();
    let mut r = ResultSet::new(&[
        ("database", T),
        ("xact_count", I),
        ("query_count", I),
        ("bytes_received", I),
        ("bytes_sent", I),
        ("xact_time", I),
        ("query_time", I),
        ("wait_time", I),
    ]);
    for db in all_databases(shared) {
        let t = totals.get(&db).copied().unwrap_or_default();
        let mut row = vec![s(&db)];
        row.extend(total_cells(&t));
        r.push(row);
    }
    r
}

const CONNECTION_COLUMNS: &[(&str, Type)] = &[
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
];

fn ptr(id: u64) -> Option<String> {
    if id == 0 {
        Some(String::new())
    } else {
        s(format!("0x{id:x}"))
    }
}

fn servers(shared: &Shared) -> ResultSet {
    let mut r = ResultSet::new(CONNECTION_COLUMNS);
    for (id, e) in shared.servers().snapshot() {
        let link = e.link.load(Ordering::Relaxed);
        let client = (link != 0).then(|| shared.clients().get(link)).flatten();
        r.push(vec![
            s("S"),
            s(&e.user),
            s(&e.database),
            s(if link != 0 { "active" } else { "idle" }),
            s(&e.host),
            s(e.port),
            e.local.map(|a| a.ip().to_string()),
            e.local.map(|a| a.port().to_string()),
            s(timestamp(e.connect_time_us)),
            s(timestamp(
                client
                    .as_ref()
                    .map_or(e.connect_time_us, |c| c.request_time_us()),
            )),
            s(0),
            s(0),
            s(u8::from(e.close_needed.load(Ordering::Relaxed))),
            ptr(id),
            ptr(link),
            s(e.remote_pid),
            s(""),
            s(client.map_or(String::new(), |c| c.application_name.clone())),
        ]);
    }
    r
}

fn clients(shared: &Shared) -> ResultSet {
    // PgBouncer's columns, then what pinned a transaction-mode client to its server
    // (empty: nothing did).
    let columns: Vec<(&str, Type)> = CONNECTION_COLUMNS
        .iter()
        .cloned()
        .chain([("pinned", T)])
        .collect();
    let mut r = ResultSet::new(&columns);
    let now = now_us();
    for (id, c) in shared.clients().snapshot() {
        let wait = c.waiting_us(now);
        let state = match c.state() {
            ClientState::Waiting => "waiting",
            _ => "active",
        };
        r.push(vec![
            s("C"),
            s(&c.user),
            s(&c.database),
            s(state),
            c.addr.map(|a| a.ip().to_string()),
            c.addr.map(|a| a.port().to_string()),
            c.local.map(|a| a.ip().to_string()),
            c.local.map(|a| a.port().to_string()),
            s(timestamp(c.connect_time_us)),
            s(timestamp(c.request_time_us())),
            s(wait / 1_000_000),
            s(wait % 1_000_000),
            s(0),
            ptr(id),
            ptr(c.link.load(Ordering::Relaxed)),
            s(0),
            s(""),
            s(&c.application_name),
            s(c.pinned().unwrap_or("")),
        ]);
    }
    r
}

fn databases(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let gate = shared.gate();
    let mut r = ResultSet::new(&[
        ("name", T),
        ("host", T),
        ("port", I),
        ("database", T),
        ("force_user", T),
        ("pool_size", I),
        ("min_pool_size", I),
        ("reserve_pool", I),
        ("pool_mode", T),
        ("max_connections", I),
        ("current_connections", I),
        ("paused", I),
        ("disabled", I),
    ]);
    for (name, d) in &config.databases {
        let hosts = d.host_list();
        let primary = shared.primary_host(name);
        let (host, port) = hosts
            .get(primary)
            .map_or((d.host.clone(), d.port), |h| (h.host.clone(), h.port));
        let settings = config.pool_settings(name, "");
        let current: u32 = shared
            .pools()
            .iter()
            .filter(|p| &p.database == name)
            .map(|p| p.counts().0)
            .sum();
        r.push(vec![
            s(name),
            s(host),
            s(port),
            s(d.dbname.clone().unwrap_or_else(|| name.clone())),
            s(""),
            s(settings.pool_size),
            s(settings.min_pool_size),
            s(0),
            d.pool_mode.map(|m| m.to_string()),
            s(settings.max_db_connections),
            s(current),
            s(u8::from(gate.is_paused(name))),
            s(0),
        ]);
    }
    r
}

fn config_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn config(shared: &Shared) -> ResultSet {
    use crate::config::keys::{as_table, reload_of, Reload};
    let now = as_table(&shared.config().pgtide);
    let default = as_table(&crate::config::General::default());
    let mut r = ResultSet::new(&[("key", T), ("value", T), ("default", T), ("changeable", T)]);
    let mut keys: Vec<&String> = now.keys().chain(default.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        r.push(vec![
            s(k),
            s(now.get(k).map(config_value).unwrap_or_default()),
            s(default.get(k).map(config_value).unwrap_or_default()),
            s(if reload_of(k) == Some(Reload::Restart) {
                "no"
            } else {
                "yes"
            }),
        ]);
    }
    r
}

fn lists(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let pools = shared.pools();
    let (mut free, mut used) = (0u64, 0u64);
    for p in &pools {
        let (total, idle, _) = p.counts();
        free += idle as u64;
        used += u64::from(total).saturating_sub(idle as u64);
    }
    let mut r = ResultSet::new(&[("list", T), ("items", I)]);
    for (name, n) in [
        ("databases", config.databases.len() as u64),
        ("users", config.users.len() as u64),
        ("pools", pools.len() as u64),
        ("free_clients", 0),
        ("used_clients", shared.clients().len() as u64),
        ("login_clients", 0),
        ("free_servers", free),
        ("used_servers", used),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        r.push(vec![s(name), s(n)]);
    }
    r
}

fn hosts(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let clusters = shared.clusters();
    let mut r = ResultSet::new(&[
        ("database", T),
        ("host", T),
        ("port", I),
        ("configured_role", T),
        ("role", T),
        ("weight", I),
        ("health", T),
        ("breaker", T),
        ("consecutive_failures", I),
        ("lag_bytes", I),
        ("lag_seconds", T),
        ("replay_lsn", T),
        ("last_check_ms_ago", I),
        ("last_error", T),
        ("timeline", I),
        ("writes_refused", T),
    ]);
    for (name, d) in &config.databases {
        let hosts = d.host_list();
        match clusters.get(name) {
            Some(cluster) => {
                for st in cluster.snapshot() {
                    let Some(h) = hosts.get(st.id.0) else {
                        continue;
                    };
                    let (health, breaker) = match st.health {
                        crate::cluster::Health::Up => ("up", "closed"),
                        crate::cluster::Health::Down => ("down", "open"),
                        crate::cluster::Health::Unknown => ("unknown", "closed"),
                    };
                    r.push(vec![
                        s(name),
                        s(&h.host),
                        s(h.port),
                        s(st.configured_role),
                        s(st.current_role),
                        s(st.weight),
                        s(health),
                        s(breaker),
                        s(st.consecutive_failures),
                        st.lag_bytes.map(|v| v.to_string()),
                        st.lag_seconds.map(|v| format!("{v:.3}")),
                        st.replay_lsn.map(|v| v.to_string()),
                        st.last_check.map(|t| t.elapsed().as_millis().to_string()),
                        st.last_error.clone(),
                        st.timeline.map(|t| t.to_string()),
                        st.passed_over.clone(),
                    ]);
                }
            }
            None => {
                // One host, not monitored: it is the primary by configuration.
                let (host, port) = hosts
                    .first()
                    .map_or((d.host.clone(), d.port), |h| (h.host.clone(), h.port));
                r.push(vec![
                    s(name),
                    s(host),
                    s(port),
                    s("primary"),
                    s("primary"),
                    s(1),
                    s("unmonitored"),
                    s("closed"),
                    s(0),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                ]);
            }
        }
    }
    r
}
