//! Read-your-writes across connections and pgtide processes: a write's WAL position is
//! told to its client (ParameterStatus `pgtide.last_write_lsn`, before the ReadyForQuery
//! that ends it), and any connection that hands it back (`SET pgtide.min_lsn`, or the
//! startup packet) reads only from hosts that have replayed it, on a replica that lags.

use std::time::Duration;

use pgtide::config::{ConfigDuration, ReadYourWrites};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, to, APP_PASSWORD, APP_USER};
use crate::rawpg::RawPg;
use crate::routing::{blocking, own_cluster, routed_own};

/// The rows of a simple query, as text.
async fn rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    to(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Runs the write `sql` and returns the `pgtide.last_write_lsn` that came with its answer,
/// checking that it came before the ReadyForQuery.
async fn write(w: &mut RawPg, sql: &str) -> String {
    w.send(&crate::rawpg::query(sql)).await;
    let msgs = to("write", w.until_ready()).await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{sql} failed");
    msgs.iter()
        .rev()
        .filter(|m| m.tag == b'S')
        .map(|m| m.parameter_status())
        .filter(|(name, _)| name == "pgtide.last_write_lsn")
        .map(|(_, v)| v)
        .next()
        .unwrap_or_else(|| panic!("{sql}: no pgtide.last_write_lsn before ReadyForQuery"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_position_handed_to_other_connections_keeps_their_reads_fresh() {
    let lc = own_cluster().await;
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let l = lc.clone();
    blocking(move || {
        l.psql(
            pport,
            "rt",
            "CREATE TABLE t (id int PRIMARY KEY); GRANT ALL ON t TO PUBLIC",
        )
        .expect("create");
        l.wait_replica_caught_up().expect("caught up");
        // Every commit reaches the replica's data 300 ms late.
        l.psql(
            rport,
            "rt",
            "ALTER SYSTEM SET recovery_min_apply_delay = '300ms'",
        )
        .expect("delay");
        l.psql(rport, "rt", "SELECT pg_reload_conf()")
            .expect("reload");
    })
    .await;
    // No lag limits: the lagging replica stays eligible for reads, so only the position a
    // client hands in keeps a read off it. Two pgtide processes in front of one cluster;
    // the second does not track its own clients' writes (read_your_writes = off), and
    // still honours a position handed in.
    let tweak = |ryw: ReadYourWrites| {
        move |c: &mut pgtide::config::Config| {
            c.pgtide.max_replica_lag_bytes = 0;
            c.pgtide.max_replica_lag = ConfigDuration::secs(0);
            c.pgtide.read_your_writes = ryw;
        }
    };
    let one = routed_own(&lc, tweak(ReadYourWrites::Lsn)).await;
    let two = routed_own(&lc, tweak(ReadYourWrites::Off)).await;
    let connect = |p: &pgtide::Pooler, extra: &str| {
        let s = format!(
            "{}{extra}",
            harness::tcp_connect_string(p.local_addr(), APP_USER, APP_PASSWORD, "rt")
        );
        async move {
            to("connect", harness::connect(&s))
                .await
                .expect("connect through pgtide")
        }
    };
    let mut writer = RawPg::login(one.local_addr(), "pgtide_trust", "rt", &[]).await;
    let readers = [connect(&one, "").await, connect(&two, "").await];
    for r in &readers {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rows(r, "SELECT pg_is_in_recovery()").await[0][0].as_deref() != Some("t") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reads never reached the replica"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Without a position, a read right after another connection's write is stale: the
    // lag is real.
    write(&mut writer, "INSERT INTO t VALUES (0)").await;
    assert_eq!(
        rows(
            &readers[1],
            "SELECT pg_is_in_recovery(), count(*) FROM t WHERE id = 0"
        )
        .await[0],
        [Some("t".to_string()), Some("0".to_string())],
        "a read without a position went to the lagging replica and missed the write"
    );

    let (mut on_replica, mut stale) = (0, Vec::new());
    for i in 1..=1000 {
        let lsn = write(&mut writer, &format!("INSERT INTO t VALUES ({i})")).await;
        let r = &readers[i % 2];
        rows(r, &format!("SET pgtide.min_lsn = '{lsn}'")).await;
        if i % 200 == 0 {
            // Long enough for the replica to replay it and the monitor to see that.
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
        let got = rows(
            r,
            &format!("SELECT pg_is_in_recovery(), count(*) FROM t WHERE id = {i}"),
        )
        .await;
        if got[0][1].as_deref() != Some("1") {
            stale.push((i, got.clone()));
        }
        if got[0][0].as_deref() == Some("t") {
            on_replica += 1;
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale reads of 1000, the first: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    assert!(
        on_replica >= 3,
        "reads whose position the replica has replayed go to the replica ({on_replica} did)"
    );

    // In the startup packet: a new connection's first read sees the write.
    let lsn = write(&mut writer, "INSERT INTO t VALUES (5000)").await;
    let fresh = connect(&two, &format!(" options='-c pgtide.min_lsn={lsn}'")).await;
    assert_eq!(
        rows(&fresh, "SELECT count(*) FROM t WHERE id = 5000").await[0][0].as_deref(),
        Some("1")
    );
    // A value that is not a position asks for everything: the primary.
    rows(&readers[1], "SET pgtide.min_lsn = 'latest'").await;
    assert_eq!(
        rows(&readers[1], "SELECT pg_is_in_recovery()").await[0][0].as_deref(),
        Some("f")
    );
    // RESET: reads go back to the replica.
    rows(&readers[1], "RESET pgtide.min_lsn").await;
    assert_eq!(
        rows(&readers[1], "SELECT pg_is_in_recovery()").await[0][0].as_deref(),
        Some("t")
    );
    drop((one, two));
}
