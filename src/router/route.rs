//! The routing policy: where one transaction of a database with several hosts runs.
//!
//! Pure code over what the session knows ([`Facts`], the SQL texts of the messages that
//! start the transaction), the database's [`RoutingSettings`] and a snapshot of its hosts
//! ([`HostView`], published by the health monitor). It borrows everything, allocates
//! nothing and touches no socket, so every rule is unit-tested here:
//!
//! - a session-mode client, a forced retry, a `pgtide.route` / `route = "primary"`
//!   override, and anything that may write go to the primary;
//! - an explicit transaction goes where its start says (`BEGIN READ ONLY` and friends to a
//!   replica, unless SERIALIZABLE); a `BEGIN` pgtide answered itself goes where the
//!   `SET TRANSACTION` that follows it says;
//! - an autocommit batch goes to a replica only when it is complete (ends in Query or
//!   Sync) and every statement of it reads;
//! - replicas are those up, in recovery, within both lag limits and (read-your-writes)
//!   past the client's last write; the primary joins them with `primary_reads`; with none
//!   left, `replica_fallback` decides;
//! - among the candidates, `load_balance` picks.

use super::classify::{classify, transaction_mode, ClassifyOptions, Reason, Route, TxKind};
use crate::config::{
    LoadBalance, ReadYourWrites, ReplicaFallback, Route as Override, RoutingSettings,
};

/// One host as the router sees it, from the monitor's last checks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostView {
    /// Up and in recovery: a replica that may serve reads (lag permitting).
    pub replica: bool,
    /// For a replica: bytes of WAL behind the primary's latest known position.
    pub lag_bytes: Option<u64>,
    /// For a replica: seconds behind (0 when caught up).
    pub lag_seconds: Option<f64>,
    /// Replay position of a replica (an LSN as a number).
    pub replay_lsn: Option<u64>,
    /// `weight` as configured (at least 1 when used).
    pub weight: u32,
}

/// The hosts of a database: their views in configuration order, and the one that takes
/// writes now (`None` while a failover is under way).
#[derive(Clone, Copy, Debug)]
pub struct Hosts<'a> {
    pub views: &'a [HostView],
    pub primary: Option<usize>,
}

/// What the session knows when a transaction starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts<'a> {
    /// The client is in session mode: everything runs on the primary.
    pub session_mode: bool,
    /// A replica refused the request as a write (25006): it runs again on the primary.
    pub force_primary: bool,
    /// pgtide answered the client's plain `BEGIN` itself: its first statement decides.
    pub deferred_begin: bool,
    /// The client's `pgtide.route` setting.
    pub route_setting: Option<&'a str>,
    /// The client's `default_transaction_read_only` is on.
    pub default_read_only: bool,
    /// The messages waiting end in a Query or Sync: the batch is whole.
    pub complete: bool,
    /// read_your_writes: the WAL position of the client's last write.
    pub written_lsn: Option<u64>,
}

/// Where a transaction goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The host that takes writes (whichever it is when the server is checked out).
    Primary,
    /// Host number `n` (a replica, or the primary chosen as a reader).
    Host(usize),
}

/// A routing decision, as the `pgtide_routing_decisions_total` counter names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Primary,
    Replica,
    Fallback,
    Hint,
    RetriedPrimary,
}

impl Outcome {
    /// The counter's `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Primary => "primary",
            Outcome::Replica => "replica",
            Outcome::Fallback => "fallback",
            Outcome::Hint => "hint",
            Outcome::RetriedPrimary => "retried_primary",
        }
    }
}

/// The router's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    /// The target is a replica (not the primary).
    pub replica: bool,
    /// An explicit read-only transaction (or a forced route) on a replica: everything up
    /// to its end goes there.
    pub replica_tx: bool,
    /// The primary was chosen because the transaction may write.
    pub write: bool,
    pub outcome: Outcome,
    /// Read-your-writes left out a replica that had not replayed the client's last write.
    pub read_your_writes_filtered: bool,
}

impl Decision {
    fn primary(outcome: Outcome, write: bool) -> Decision {
        Decision {
            target: Target::Primary,
            replica: false,
            replica_tx: false,
            write,
            outcome,
            read_your_writes_filtered: false,
        }
    }
}

/// No replica may take a read and `replica_fallback = "error"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoReplica;

/// How to break ties: the caller's turn counter and a random number (for
/// `load_balance = "random"`), and the load of a host (connections in use or waited for,
/// for `"least_outstanding"`).
pub struct Pick<'a> {
    pub turn: usize,
    pub random: u32,
    pub load: &'a dyn Fn(usize) -> usize,
}

fn is_on(v: Option<&str>) -> bool {
    matches!(v, Some("on" | "true" | "1" | "yes"))
}

/// Whether `default_transaction_read_only`'s value means on.
pub fn read_only_value(v: Option<&str>) -> bool {
    is_on(v)
}

/// Where the transaction whose messages' SQL texts are `texts` runs.
pub fn route<'t>(
    facts: &Facts,
    mut texts: impl Iterator<Item = &'t [u8]>,
    settings: &RoutingSettings,
    hosts: Hosts,
    pick: &Pick,
) -> Result<Decision, NoReplica> {
    if facts.force_primary {
        return Ok(Decision::primary(Outcome::RetriedPrimary, true));
    }
    if facts.session_mode {
        return Ok(Decision::primary(Outcome::Primary, false));
    }
    let mut explicit = false;
    // Routed by a hint: a pgtide: comment, the pgtide.route setting, a route override.
    let mut hinted = settings.route != Override::Auto
        || matches!(facts.route_setting, Some("primary" | "replica"));
    let route = if facts.deferred_begin {
        // The transaction pgtide began: read-only if its first statement says so.
        explicit = true;
        let read_only = texts.next().and_then(transaction_mode).is_some_and(|tx| {
            tx.kind == TxKind::SetTransaction && tx.read_only == Some(true) && tx.replica_ok(false)
        });
        if !read_only {
            return Ok(Decision::primary(Outcome::Primary, true));
        }
        Route::Replica
    } else {
        match (settings.route, facts.route_setting) {
            (_, Some("primary")) | (Override::Primary, _) => Route::Primary,
            (_, Some("replica")) | (Override::Replica, _) => {
                // Everything goes to a replica, writes too (they fail there): nothing is
                // held back for the primary.
                explicit = true;
                Route::Replica
            }
            _ => classify_batch(facts, texts, settings, &mut explicit, &mut hinted),
        }
    };
    let outcome = |o: Outcome| if hinted { Outcome::Hint } else { o };
    if route == Route::Primary {
        return Ok(Decision::primary(outcome(Outcome::Primary), true));
    }
    let within = |v: &HostView| {
        let bytes_ok = settings.max_replica_lag_bytes == 0
            || v.lag_bytes
                .is_some_and(|b| b <= settings.max_replica_lag_bytes);
        let time_ok = settings.max_replica_lag.is_zero()
            || v.lag_seconds
                .is_some_and(|s| s <= settings.max_replica_lag.as_secs_f64());
        v.replica && bytes_ok && time_ok
    };
    let replayed = |v: &HostView| match facts.written_lsn {
        Some(lsn) => v.replay_lsn.is_some_and(|r| r >= lsn),
        None => true,
    };
    let usable = |i: usize, v: &HostView| Some(i) != hosts.primary && within(v) && replayed(v);
    // Candidates, in order: the usable replicas in host order, then the primary when it
    // serves reads too.
    let primary_reads = settings.primary_reads.then_some(hosts.primary).flatten();
    let candidates = || {
        hosts
            .views
            .iter()
            .enumerate()
            .filter(|(i, v)| usable(*i, v))
            .map(|(i, _)| i)
            .chain(primary_reads)
    };
    let filtered = facts.written_lsn.is_some()
        && hosts
            .views
            .iter()
            .enumerate()
            .any(|(i, v)| Some(i) != hosts.primary && within(v) && !replayed(v));
    let count = candidates().count();
    if count == 0 {
        return match settings.replica_fallback {
            ReplicaFallback::Primary => Ok(Decision {
                read_your_writes_filtered: filtered,
                ..Decision::primary(outcome(Outcome::Fallback), false)
            }),
            ReplicaFallback::Error => Err(NoReplica),
        };
    }
    let weight = |i: usize| hosts.views.get(i).map_or(1, |v| v.weight.max(1));
    let chosen = match settings.load_balance {
        LoadBalance::Random => {
            // In proportion to weight.
            let total: u32 = candidates().map(weight).sum();
            let mut n = pick.random % total.max(1);
            let mut chosen = candidates().next().unwrap_or(0);
            for i in candidates() {
                if n < weight(i) {
                    chosen = i;
                    break;
                }
                n -= weight(i);
            }
            chosen
        }
        LoadBalance::RoundRobin => candidates().nth(pick.turn % count).unwrap_or(0),
        LoadBalance::LeastOutstanding => {
            // Fewest connections in use or waited for, per unit of weight; ties go in
            // turn.
            let load = |i: usize| (pick.load)(i) as f64 / f64::from(weight(i));
            let start = pick.turn % count;
            let mut best = None;
            for k in 0..count {
                let Some(i) = candidates().nth((start + k) % count) else {
                    continue;
                };
                let l = load(i);
                if best.is_none_or(|(_, b)| l < b) {
                    best = Some((i, l));
                }
            }
            best.map_or(0, |(i, _)| i)
        }
    };
    let replica = Some(chosen) != hosts.primary;
    Ok(Decision {
        target: Target::Host(chosen),
        replica,
        replica_tx: replica && explicit,
        write: false,
        outcome: outcome(if replica {
            Outcome::Replica
        } else {
            Outcome::Primary
        }),
        read_your_writes_filtered: filtered,
    })
}

/// Reads or writes, by the texts of an autocommit batch (or the start of an explicit
/// transaction).
fn classify_batch<'t>(
    facts: &Facts,
    texts: impl Iterator<Item = &'t [u8]>,
    settings: &RoutingSettings,
    explicit: &mut bool,
    hinted: &mut bool,
) -> Route {
    let opts = ClassifyOptions {
        write_functions: &settings.write_functions,
        hints: settings.routing_hints,
    };
    let mut route = Route::Primary;
    for (i, sql) in texts.enumerate() {
        if i == 0 {
            if !facts.complete {
                // Not all of it is here: it may write.
                return Route::Primary;
            }
            route = Route::Replica;
            if let Some(tx) = transaction_mode(sql) {
                if tx.starts_transaction() {
                    // An explicit transaction: all of it goes where its start says.
                    *explicit = true;
                    return if tx.replica_ok(facts.default_read_only) {
                        Route::Replica
                    } else {
                        Route::Primary
                    };
                }
            }
        }
        let decision = classify(sql, &opts);
        if matches!(decision.reason, Reason::HintPrimary | Reason::HintReplica) {
            *hinted = true;
        }
        if decision.route == Route::Primary {
            return Route::Primary;
        }
    }
    route
}

/// Whether a client's lone plain `BEGIN` (no access mode, one statement) may be answered
/// by pgtide, so that the transaction is routed by the statement that follows it: on a
/// routed database, in transaction mode, routed by text, for a session that is not
/// read-only by default.
pub fn may_defer_begin(sql: &[u8], facts: &Facts, settings: &RoutingSettings) -> bool {
    if facts.session_mode || settings.route != Override::Auto || facts.route_setting.is_some() {
        return false;
    }
    transaction_mode(sql).is_some_and(|tx| {
        tx.kind == TxKind::Begin && tx.read_only.is_none() && !facts.default_read_only
    }) && super::lexer::Lexer::new(sql)
        .filter(|t| matches!(t, super::lexer::Token::Semicolon))
        .count()
        <= 1
}

/// Whether a statement must run on the primary.
pub fn writes(sql: &[u8], settings: &RoutingSettings) -> bool {
    let opts = ClassifyOptions {
        write_functions: &settings.write_functions,
        hints: settings.routing_hints,
    };
    classify(sql, &opts).route == Route::Primary
}

/// Whether read-your-writes tracks the commit positions of this database's writes.
pub fn tracks_writes(settings: &RoutingSettings) -> bool {
    settings.read_your_writes == ReadYourWrites::Lsn
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> RoutingSettings {
        RoutingSettings {
            route: Override::Auto,
            load_balance: LoadBalance::RoundRobin,
            max_replica_lag_bytes: 0,
            max_replica_lag: Duration::ZERO,
            replica_fallback: ReplicaFallback::Primary,
            read_your_writes: ReadYourWrites::Off,
            primary_reads: false,
            routing_hints: true,
            write_functions: Vec::new(),
            primary_wait_timeout: Duration::from_secs(1),
        }
    }

    fn replica(lsn: u64) -> HostView {
        HostView {
            replica: true,
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            replay_lsn: Some(lsn),
            weight: 1,
        }
    }

    const PRIMARY: HostView = HostView {
        replica: false,
        lag_bytes: None,
        lag_seconds: None,
        replay_lsn: None,
        weight: 1,
    };

    fn facts() -> Facts<'static> {
        Facts {
            complete: true,
            ..Facts::default()
        }
    }

    fn no_load(_: usize) -> usize {
        0
    }

    fn go(
        facts: &Facts,
        sql: &[&str],
        s: &RoutingSettings,
        views: &[HostView],
        turn: usize,
    ) -> Result<Decision, NoReplica> {
        let pick = Pick {
            turn,
            random: 0,
            load: &no_load,
        };
        let hosts = Hosts {
            views,
            primary: Some(0),
        };
        route(facts, sql.iter().map(|s| s.as_bytes()), s, hosts, &pick)
    }

    /// Counts this thread's allocations (the lib's test binary only), so that a test can
    /// show that routing allocates nothing.
    struct Counting;
    std::thread_local! {
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn routing_allocates_nothing() {
        let hosts = [PRIMARY, replica(10), replica(5)];
        let mut s = settings();
        s.read_your_writes = ReadYourWrites::Lsn;
        s.max_replica_lag_bytes = 100;
        let written = Facts {
            written_lsn: Some(7),
            ..facts()
        };
        let batches: [&[&str]; 5] = [
            &["SELECT 1"],
            &["/* pgtide.route=replica */ SELECT * FROM t WHERE a = 'x'"],
            &["BEGIN READ ONLY", "SELECT 1"],
            &["SELECT 1", "INSERT INTO t VALUES (1)"],
            &["WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"],
        ];
        let before = ALLOCATIONS.with(|n| n.get());
        let mut decided = 0;
        for turn in 0..4 {
            for sql in batches {
                for f in [&facts(), &written] {
                    decided += usize::from(go(f, sql, &s, &hosts, turn).is_ok());
                }
            }
        }
        let after = ALLOCATIONS.with(|n| n.get());
        assert_eq!(decided, 40);
        assert_eq!(after - before, 0, "router::route allocated");
    }

    #[test]
    fn reads_go_to_replicas_and_writes_to_the_primary() {
        let hosts = [PRIMARY, replica(10), replica(10)];
        let s = settings();
        let read = go(&facts(), &["SELECT 1"], &s, &hosts, 0).unwrap();
        assert_eq!(read.target, Target::Host(1));
        assert!(read.replica && !read.replica_tx && !read.write);
        assert_eq!(read.outcome, Outcome::Replica);
        // In turn.
        assert_eq!(
            go(&facts(), &["SELECT 1"], &s, &hosts, 1).unwrap().target,
            Target::Host(2)
        );
        let write = go(
            &facts(),
            &["SELECT 1", "INSERT INTO t VALUES (1)"],
            &s,
            &hosts,
            0,
        )
        .unwrap();
        assert_eq!(write.target, Target::Primary);
        assert!(write.write);
        // A batch not yet complete may still write.
        let partial = Facts {
            complete: false,
            ..facts()
        };
        assert_eq!(
            go(&partial, &["SELECT 1"], &s, &hosts, 0).unwrap().target,
            Target::Primary
        );
        // Nothing to read: the primary.
        assert_eq!(
            go(&facts(), &[], &s, &hosts, 0).unwrap().target,
            Target::Primary
        );
    }

    #[test]
    fn explicit_transactions_go_where_their_start_says() {
        let hosts = [PRIMARY, replica(10)];
        let s = settings();
        let ro = go(&facts(), &["BEGIN READ ONLY"], &s, &hosts, 0).unwrap();
        assert_eq!(ro.target, Target::Host(1));
        assert!(ro.replica_tx);
        let rw = go(&facts(), &["BEGIN"], &s, &hosts, 0).unwrap();
        assert_eq!(rw.target, Target::Primary);
        let ser = go(
            &facts(),
            &["BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"],
            &s,
            &hosts,
            0,
        )
        .unwrap();
        assert_eq!(ser.target, Target::Primary);
        // default_transaction_read_only makes a plain BEGIN read-only.
        let ro_session = Facts {
            default_read_only: true,
            ..facts()
        };
        assert!(
            go(&ro_session, &["BEGIN"], &s, &hosts, 0)
                .unwrap()
                .replica_tx
        );
        // A BEGIN pgtide answered: the SET TRANSACTION after it decides.
        let deferred = Facts {
            deferred_begin: true,
            ..facts()
        };
        assert!(
            go(&deferred, &["SET TRANSACTION READ ONLY"], &s, &hosts, 0)
                .unwrap()
                .replica_tx
        );
        let d = go(&deferred, &["SELECT 1"], &s, &hosts, 0).unwrap();
        assert!(d.target == Target::Primary && d.write);
    }

    #[test]
    fn overrides_hints_session_mode_and_retries() {
        let hosts = [PRIMARY, replica(10)];
        let s = settings();
        let hint = go(&facts(), &["/* pgtide: primary */ SELECT 1"], &s, &hosts, 0).unwrap();
        assert_eq!(
            (hint.target, hint.outcome),
            (Target::Primary, Outcome::Hint)
        );
        let hint = go(&facts(), &["/* pgtide: replica */ SELECT 1"], &s, &hosts, 0).unwrap();
        assert_eq!(
            (hint.target, hint.outcome),
            (Target::Host(1), Outcome::Hint)
        );
        let to_replica = Facts {
            route_setting: Some("replica"),
            ..facts()
        };
        let d = go(&to_replica, &["INSERT INTO t VALUES (1)"], &s, &hosts, 0).unwrap();
        assert!(d.replica_tx && d.outcome == Outcome::Hint);
        let to_primary = RoutingSettings {
            route: Override::Primary,
            ..settings()
        };
        assert_eq!(
            go(&facts(), &["SELECT 1"], &to_primary, &hosts, 0)
                .unwrap()
                .target,
            Target::Primary
        );
        let session = Facts {
            session_mode: true,
            ..facts()
        };
        assert_eq!(
            go(&session, &["SELECT 1"], &s, &hosts, 0).unwrap().target,
            Target::Primary
        );
        let retry = Facts {
            force_primary: true,
            ..facts()
        };
        let d = go(&retry, &["SELECT 1"], &s, &hosts, 0).unwrap();
        assert_eq!(
            (d.target, d.outcome, d.write),
            (Target::Primary, Outcome::RetriedPrimary, true)
        );
    }

    #[test]
    fn lag_read_your_writes_and_fallback() {
        let lagging = HostView {
            lag_bytes: Some(5000),
            lag_seconds: Some(9.0),
            ..replica(10)
        };
        let hosts = [PRIMARY, lagging, replica(20)];
        let s = RoutingSettings {
            max_replica_lag_bytes: 1000,
            ..settings()
        };
        for turn in 0..4 {
            assert_eq!(
                go(&facts(), &["SELECT 1"], &s, &hosts, turn)
                    .unwrap()
                    .target,
                Target::Host(2)
            );
        }
        // Read your writes: host 2 has replayed 20, not 30.
        let after_write = Facts {
            written_lsn: Some(30),
            ..facts()
        };
        let d = go(&after_write, &["SELECT 1"], &s, &hosts, 0).unwrap();
        assert_eq!((d.target, d.outcome), (Target::Primary, Outcome::Fallback));
        assert!(d.read_your_writes_filtered);
        let error = RoutingSettings {
            replica_fallback: ReplicaFallback::Error,
            ..s.clone()
        };
        assert_eq!(
            go(&after_write, &["SELECT 1"], &error, &hosts, 0),
            Err(NoReplica)
        );
        // primary_reads: the primary takes its turn among the readers.
        let with_primary = RoutingSettings {
            primary_reads: true,
            ..settings()
        };
        let hosts = [PRIMARY, replica(10)];
        let picks: Vec<Target> = (0..2)
            .map(|t| {
                go(&facts(), &["SELECT 1"], &with_primary, &hosts, t)
                    .unwrap()
                    .target
            })
            .collect();
        assert_eq!(picks, [Target::Host(1), Target::Host(0)]);
        let d = go(&facts(), &["SELECT 1"], &with_primary, &hosts, 1).unwrap();
        assert!(!d.replica && d.outcome == Outcome::Primary);
        // A down replica is not a candidate.
        let down = HostView {
            replica: false,
            ..replica(10)
        };
        let d = go(&facts(), &["SELECT 1"], &settings(), &[PRIMARY, down], 0).unwrap();
        assert_eq!(d.outcome, Outcome::Fallback);
    }

    #[test]
    fn load_balancing_by_weight_and_load() {
        let heavy = HostView {
            weight: 3,
            ..replica(10)
        };
        let hosts = [PRIMARY, replica(10), heavy];
        let random = RoutingSettings {
            load_balance: LoadBalance::Random,
            ..settings()
        };
        // Weights 1 and 3: random numbers 0 -> host 1, 1..=3 -> host 2.
        let pick = |n: u32| {
            let p = Pick {
                turn: 0,
                random: n,
                load: &no_load,
            };
            let h = Hosts {
                views: &hosts,
                primary: Some(0),
            };
            route(
                &facts(),
                [b"SELECT 1".as_slice()].into_iter(),
                &random,
                h,
                &p,
            )
            .unwrap()
            .target
        };
        assert_eq!(pick(0), Target::Host(1));
        assert_eq!(pick(1), Target::Host(2));
        assert_eq!(pick(3), Target::Host(2));
        assert_eq!(pick(4), Target::Host(1));
        let least = RoutingSettings {
            load_balance: LoadBalance::LeastOutstanding,
            ..settings()
        };
        // Host 1 has 2 busy, host 2 has 3 busy over weight 3: host 2 is less loaded.
        let load = |i: usize| if i == 1 { 2 } else { 3 };
        let p = Pick {
            turn: 0,
            random: 0,
            load: &load,
        };
        let h = Hosts {
            views: &hosts,
            primary: Some(0),
        };
        let d = route(
            &facts(),
            [b"SELECT 1".as_slice()].into_iter(),
            &least,
            h,
            &p,
        )
        .unwrap();
        assert_eq!(d.target, Target::Host(2));
    }

    #[test]
    fn a_plain_begin_may_wait_for_its_first_statement() {
        let s = settings();
        let f = facts();
        assert!(may_defer_begin(b"BEGIN", &f, &s));
        assert!(may_defer_begin(b"begin;", &f, &s));
        assert!(!may_defer_begin(b"BEGIN READ ONLY", &f, &s));
        assert!(!may_defer_begin(b"BEGIN; SELECT 1;", &f, &s));
        assert!(!may_defer_begin(b"SELECT 1", &f, &s));
        let ro = Facts {
            default_read_only: true,
            ..facts()
        };
        assert!(!may_defer_begin(b"BEGIN", &ro, &s));
        let routed = Facts {
            route_setting: Some("primary"),
            ..facts()
        };
        assert!(!may_defer_begin(b"BEGIN", &routed, &s));
    }
}
