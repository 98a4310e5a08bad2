//! One health check of one host: the [`Probe`] trait (pluggable, so the monitor can be
//! tested without servers), the real [`PgProbe`], WAL positions ([`Lsn`]) and the lag
//! arithmetic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{SaltedPasswordCache, StoredCredential};
use crate::server::{ServerConn, ServerTarget};

/// The query of every check: whether the host is in recovery, its WAL position (replayed
/// for a standby, current for a primary), for a standby the age of the last transaction
/// it replayed, in seconds, for a primary its timeline (the first 8 hex digits of the
/// name of the WAL file it writes), the cluster's system identifier, and when the server
/// started (with the system identifier, what tells two servers apart). Every function in
/// it is open to any user.
pub const HEALTH_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     CASE WHEN pg_is_in_recovery() THEN extract(epoch from now() - pg_last_xact_replay_timestamp()) END, \
     CASE WHEN NOT pg_is_in_recovery() THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
     (SELECT system_identifier FROM pg_control_system()), \
     extract(epoch from pg_postmaster_start_time())";

/// A WAL position (`pg_lsn`), as a byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's text form, `16/B374D848`.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// What one successful check found.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Replay position of a standby; current WAL position of a primary. `None` for a
    /// standby that has replayed nothing yet.
    pub lsn: Option<Lsn>,
    /// Seconds since the last transaction a standby replayed was committed on the
    /// primary; `None` on a primary or when the standby has replayed none.
    pub replay_age: Option<f64>,
    /// Which server answered; `None` when it did not say.
    pub server: Option<ServerIdentity>,
}

/// What tells servers apart, and primaries of one cluster in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system()`'s `system_identifier`: the same for a primary and every
    /// standby made from it (and for a standby promoted later), different for a cluster
    /// made by another `initdb`.
    pub system_id: u64,
    /// A primary's timeline; `None` on a standby. Every promotion starts a higher one.
    pub timeline: Option<u32>,
    /// `pg_postmaster_start_time()` as text: two host entries naming one server (an alias,
    /// another address) have the same system identifier and start time.
    pub started: String,
}

impl ProbeResult {
    /// Reads the one row of [`HEALTH_QUERY`].
    pub fn from_row(row: &[Option<String>]) -> Result<ProbeResult, String> {
        let in_recovery = match row.first().and_then(|v| v.as_deref()) {
            Some("t") => true,
            Some("f") => false,
            other => return Err(format!("pg_is_in_recovery() returned {other:?}")),
        };
        let lsn = match row.get(1).and_then(|v| v.as_deref()) {
            None => None,
            Some(s) => Some(Lsn::parse(s).ok_or_else(|| format!("{s:?} is not an LSN"))?),
        };
        let replay_age = match row.get(2).and_then(|v| v.as_deref()) {
            None => None,
            Some(s) => Some(
                s.parse::<f64>()
                    .map_err(|_| format!("{s:?} is not a number of seconds"))?,
            ),
        };
        let timeline = match row.get(3).and_then(|v| v.as_deref()) {
            None => None,
            Some(s) => Some(
                u32::from_str_radix(s, 16)
                    .ok()
                    .filter(|_| s.len() == 8)
                    .ok_or_else(|| format!("{s:?} is not a timeline"))?,
            ),
        };
        let system_id = match row.get(4).and_then(|v| v.as_deref()) {
            None => None,
            Some(s) => Some(
                s.parse::<u64>()
                    .map_err(|_| format!("{s:?} is not a system identifier"))?,
            ),
        };
        let started = row.get(5).and_then(|v| v.clone());
        let server = match (system_id, started) {
            (Some(system_id), Some(started)) => Some(ServerIdentity {
                system_id,
                timeline,
                started,
            }),
            _ => None,
        };
        Ok(ProbeResult {
            in_recovery,
            lsn,
            replay_age,
            server,
        })
    }
}

/// The future of one check.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<ProbeResult, String>> + Send + 'a>>;

/// One host's health check. The monitor calls `probe` once per tick and never twice at
/// once; an implementation may keep a connection between calls. The error is a message
/// for the log (never containing a password).
pub trait Probe: Send + 'static {
    /// Runs one check, within `timeout`.
    fn probe(&mut self, timeout: Duration) -> ProbeFuture<'_>;
}

/// A probe from a closure, for tests and tools.
pub struct FnProbe<F>(pub F);

impl<F> Probe for FnProbe<F>
where
    F: FnMut() -> Result<ProbeResult, String> + Send + 'static,
{
    fn probe(&mut self, _timeout: Duration) -> ProbeFuture<'_> {
        let r = (self.0)();
        Box::pin(async move { r })
    }
}

/// As whom the monitor logs in to every host of a database.
#[derive(Clone)]
pub struct MonitorLogin {
    /// Database name on the servers.
    pub dbname: String,
    pub user: String,
    /// The user's configured credential; only a plain password or an md5 hash can log
    /// in to a server that asks for one.
    pub secret: Option<Arc<StoredCredential>>,
    pub salted: Arc<SaltedPasswordCache>,
    /// Largest message accepted from the server.
    pub max_message: u32,
    /// How to use TLS to the hosts (`server_tls_*` of the database).
    pub tls: Arc<crate::tls::ServerTls>,
}

/// The real check: a monitoring connection (opened on first use and kept open between
/// checks; closed and reopened after any failure) that runs [`HEALTH_QUERY`]. Connect,
/// login and query together run under the check's timeout.
pub struct PgProbe {
    target: ServerTarget,
    salted: Arc<SaltedPasswordCache>,
    max_message: u32,
    conn: Option<ServerConn>,
}

impl PgProbe {
    pub fn new(host: &str, port: u16, login: &MonitorLogin) -> Self {
        PgProbe {
            target: ServerTarget {
                host: host.to_string(),
                port,
                dbname: login.dbname.clone(),
                user: login.user.clone(),
                secret: crate::auth::ServerSecret::new(login.secret.clone()),
                tls: login.tls.clone(),
            },
            salted: login.salted.clone(),
            max_message: login.max_message,
            conn: None,
        }
    }

    async fn check(&mut self, timeout: Duration) -> Result<ProbeResult, String> {
        let kept = self.conn.take().and_then(|mut c| c.is_quiet().then_some(c));
        let mut conn = match kept {
            Some(c) => c,
            None => {
                ServerConn::connect(&self.target, &self.salted, self.max_message)
                    .await
                    .map_err(|e| format!("cannot connect: {e}"))?
                    .0
            }
        };
        let result = conn
            .run_internal(HEALTH_QUERY, timeout)
            .await
            .map_err(|e| format!("health query failed: {e}"))?;
        if let Some((code, message)) = result.error {
            return Err(format!("health query failed: {message} (SQLSTATE {code})"));
        }
        let row = result.rows.first().ok_or("health query returned no row")?;
        let probe = ProbeResult::from_row(row)?;
        self.conn = Some(conn);
        Ok(probe)
    }
}

impl Probe for PgProbe {
    fn probe(&mut self, timeout: Duration) -> ProbeFuture<'_> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.check(timeout)).await {
                Ok(r) => r,
                Err(_) => {
                    self.conn = None;
                    Err(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    ))
                }
            }
        })
    }
}

/// The lag of a standby whose replay position is `replay` and whose last replayed
/// transaction is `replay_age` seconds old, against the primary's latest known WAL
/// position: (bytes, seconds). A standby that has replayed everything the primary has
/// is not lagging, whatever its replay age (an idle primary commits nothing, so the age
/// keeps growing). Unknown values are `None`.
pub fn replica_lag(
    replay: Option<Lsn>,
    primary: Option<Lsn>,
    replay_age: Option<f64>,
) -> (Option<u64>, Option<f64>) {
    let bytes = match (replay, primary) {
        (Some(r), Some(p)) => Some(p.0.saturating_sub(r.0)),
        _ => None,
    };
    let seconds = if bytes == Some(0) {
        Some(0.0)
    } else {
        replay_age.map(|s| s.max(0.0))
    };
    (bytes, seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_form() {
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("16/B374D848"), Some(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("FFFFFFFF/FFFFFFFF"), Some(Lsn(u64::MAX)));
        for bad in ["", "16", "x/1", "1/", "100000000/0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn rows_of_the_health_query() {
        let s = |v: &str| Some(v.to_string());
        let sysid = s("7715282495757495335");
        let started = s("1796354190.436766");
        let primary = ProbeResult::from_row(&[
            s("f"),
            s("0/3000060"),
            None,
            s("0000000A"),
            sysid.clone(),
            started.clone(),
        ])
        .unwrap();
        assert_eq!(
            primary,
            ProbeResult {
                in_recovery: false,
                lsn: Some(Lsn(0x300_0060)),
                replay_age: None,
                server: Some(ServerIdentity {
                    system_id: 7_715_282_495_757_495_335,
                    timeline: Some(10),
                    started: "1796354190.436766".to_string(),
                }),
            }
        );
        let replica = ProbeResult::from_row(&[
            s("t"),
            s("0/3000000"),
            s("1.25"),
            None,
            sysid.clone(),
            started.clone(),
        ])
        .unwrap();
        assert!(replica.in_recovery);
        assert_eq!(replica.replay_age, Some(1.25));
        assert_eq!(replica.server.unwrap().timeline, None);
        // A server that does not say who it is (a short row): no identity.
        let short = ProbeResult::from_row(&[s("f"), s("0/1"), None]).unwrap();
        assert_eq!(short.server, None);
        assert!(ProbeResult::from_row(&[s("maybe"), None, None]).is_err());
        assert!(ProbeResult::from_row(&[s("t"), s("nope"), None]).is_err());
        assert!(ProbeResult::from_row(&[s("t"), s("0/1"), s("soon")]).is_err());
        assert!(ProbeResult::from_row(&[s("f"), s("0/1"), None, s("1"), None, None]).is_err());
        assert!(
            ProbeResult::from_row(&[s("f"), s("0/1"), None, s("0000000G"), None, None]).is_err()
        );
        assert!(ProbeResult::from_row(&[s("f"), s("0/1"), None, None, s("x"), None]).is_err());
        assert!(ProbeResult::from_row(&[]).is_err());
    }

    #[test]
    fn lag_in_bytes_and_seconds() {
        let l = |r: u64, p: u64, age: Option<f64>| replica_lag(Some(Lsn(r)), Some(Lsn(p)), age);
        // Behind: bytes from the positions, seconds from the replay age.
        assert_eq!(l(100, 1100, Some(3.5)), (Some(1000), Some(3.5)));
        // Caught up (or ahead of the primary's last check): no lag at all, even with an
        // old replay timestamp (an idle primary).
        assert_eq!(l(1100, 1100, Some(600.0)), (Some(0), Some(0.0)));
        assert_eq!(l(1200, 1100, Some(600.0)), (Some(0), Some(0.0)));
        // Behind, nothing replayed yet: seconds unknown.
        assert_eq!(l(100, 1100, None), (Some(1000), None));
        // No primary known: bytes unknown, seconds from the replay age.
        assert_eq!(
            replica_lag(Some(Lsn(1)), None, Some(2.0)),
            (None, Some(2.0))
        );
        assert_eq!(replica_lag(None, Some(Lsn(1)), None), (None, None));
        // Clock skew can make the age negative.
        assert_eq!(l(100, 200, Some(-0.2)), (Some(100), Some(0.0)));
    }
}
