//! The metrics endpoint: `/metrics` during a pgbench run agrees with pgbench's count,
//! the histograms have samples and the exposition parses; `/healthz`; `/readyz` turns
//! unready when a configured server cannot be reached.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, to};
use crate::pgbench::{init, pgbench};

/// GET `path` from the metrics endpoint: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = to("connect to metrics", TcpStream::connect(addr))
        .await
        .expect("the metrics endpoint accepts connections");
    let req = format!("GET {path} HTTP/1.1\r\nHost: pgtide\r\n\r\n");
    to("send request", s.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut raw = Vec::new();
    to("read response", s.read_to_end(&mut raw))
        .await
        .expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// Parses the Prometheus text format strictly enough to catch a broken exposition:
/// every sample line is `name{labels} value` with a valid number, every metric has a
/// `# TYPE` of a known kind. Returns samples keyed by `name{labels}` as written.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().expect("a name"), it.next().expect("a type"));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "unknown type in {line:?}"
            );
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = key.split('{').next().unwrap_or(key);
        if let Some(labels) = key.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(base), "sample without # TYPE: {line:?}");
        assert!(
            name.starts_with("pgtide_"),
            "metrics are prefixed pgtide_: {line:?}"
        );
        samples.insert(key.to_string(), value);
    }
    samples
}

fn sample(samples: &HashMap<String, f64>, name: &str, db: &str) -> f64 {
    let key = format!("{name}{{database=\"{db}\",user=\"app\"}}");
    *samples.get(&key).unwrap_or_else(|| {
        panic!(
            "no sample {key}; have: {:?}",
            samples.keys().collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_pgbench_and_parse() {
    let (db, pooler, addr) = harness::setup("metrics_pgbench", |c| c.pgtide.pool_size = 4).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    init(addr.port(), &db).await;
    let before = parse_exposition(&get(maddr, "/metrics").await.1);
    let tx_before = sample(&before, "pgtide_transactions_total", &db);

    let (ok, out, err) = pgbench(
        addr.port(),
        &db,
        &["-c", "10", "-j", "2", "-t", "200", "-S", "-n"],
    )
    .await;
    assert!(ok, "pgbench failed:\n{out}\n{err}");
    let processed: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("pgbench output without a count:\n{out}"));
    assert_eq!(processed, 2000.0);

    let (status, body) = get(maddr, "/metrics").await;
    assert_eq!(status, 200);
    let after = parse_exposition(&body);
    let counted = sample(&after, "pgtide_transactions_total", &db) - tx_before;
    // pgbench runs one query of its own (it reads the scale) besides its transactions.
    assert!(
        (processed..=processed + 5.0).contains(&counted),
        "pgtide counted {counted} transactions, pgbench {processed}"
    );
    for h in [
        "pgtide_wait_seconds_count",
        "pgtide_query_seconds_count",
        "pgtide_transaction_seconds_count",
    ] {
        assert!(
            sample(&after, h, &db) >= processed,
            "{h} has too few samples"
        );
    }
    assert!(sample(&after, "pgtide_queries_total", &db) >= processed);
    assert!(sample(&after, "pgtide_bytes_received_total", &db) > 0.0);
    assert!(sample(&after, "pgtide_bytes_sent_total", &db) > 0.0);
    assert!(sample(&after, "pgtide_server_connects_total", &db) >= 1.0);
    assert!(after.keys().any(|k| k.starts_with("pgtide_build_info{")));
    assert!(after.contains_key("pgtide_auth_failures_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz() {
    let (_db, pooler, _addr) = harness::setup("metrics_ready", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    assert_eq!(get(maddr, "/healthz").await.0, 200);
    assert_eq!(get(maddr, "/readyz").await.0, 200, "the primary is up");
    assert_eq!(get(maddr, "/nope").await.0, 404);
    drop(pooler);

    // A configured server that cannot be reached makes pgtide unready, and says which.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_db2, pooler, _addr) = harness::setup("metrics_unready", |c| {
        let mut down = c.databases.values().next().expect("a database").clone();
        down.port = closed.port();
        c.databases.insert("down".to_string(), down);
    })
    .await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let (status, body) = get(maddr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{}", closed.port())),
        "{body}"
    );
    assert_eq!(get(maddr, "/healthz").await.0, 200, "alive all the same");
}
