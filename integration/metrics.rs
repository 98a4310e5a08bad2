//! The metrics endpoint: `/metrics` during and after a pgbench run agrees with pgbench's
//! count, the histograms have samples and the exposition parses (our parser, and
//! `promtool check metrics`); `/healthz`; `/readyz` turns unready when a primary cannot be
//! reached and ready again when it is back; the Grafana dashboard uses only metrics that
//! a real scrape has. The endpoint's HTTP on the wire: keep-alive, `HEAD`, a request in
//! small pieces, an oversized head, other methods (the header read timeout, the
//! connection limit and stopping are tested in `src/metrics/http.rs`, with shorter
//! bounds).

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, to};
use crate::pgbench::{init, pgbench};

/// GET `path` from the metrics endpoint on a connection of its own: (status code, body).
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = to("connect to metrics", TcpStream::connect(addr))
        .await
        .expect("the metrics endpoint accepts connections");
    // `Connection: close`: the server closes after the response, which ends the read.
    let req = format!("GET {path} HTTP/1.1\r\nHost: pgtide\r\nConnection: close\r\n\r\n");
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
pub(crate) fn parse_exposition(text: &str) -> HashMap<String, f64> {
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

/// GET /metrics and parse it.
pub(crate) async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

/// `promtool check metrics` (Debian's prometheus package, installed by scripts/deps.sh)
/// on an exposition: it must report neither a parse error nor a lint problem.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/deps.sh does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

    let port = addr.port();
    let db2 = db.clone();
    let run = tokio::spawn(async move {
        pgbench(
            port,
            &db2,
            &["-c", "10", "-j", "2", "-t", "200", "-S", "-n"],
        )
        .await
    });
    // Scrapes while pgbench runs: each parses, and the transaction counter only grows.
    let mut during = Vec::new();
    while !run.is_finished() {
        let (status, body) = get(maddr, "/metrics").await;
        assert_eq!(status, 200);
        let s = parse_exposition(&body);
        during.push(sample(&s, "pgtide_transactions_total", &db));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        during.windows(2).all(|w| w[0] <= w[1]),
        "the transaction counter went down: {during:?}"
    );
    let (ok, out, err) = run.await.expect("the pgbench task");
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
    promtool_check(&body);
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
    // pgbench has left: every client and server of the pool is idle again, once pgtide has
    // seen the clients go and the servers' resets (the `used` state) have run.
    let state = |s: &HashMap<String, f64>, name: &str, labels: &str| {
        s.iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("{name}{{"))
                    && k.contains(&format!("database=\"{db}\""))
                    && k.contains(labels)
            })
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    until("the pool is quiet", || async {
        let s = scrape(maddr).await;
        ["active", "waiting"]
            .iter()
            .all(|st| state(&s, "pgtide_clients", &format!("state=\"{st}\"")) == 0.0)
            && ["active", "used", "login"]
                .iter()
                .all(|st| state(&s, "pgtide_servers", &format!("state=\"{st}\"")) == 0.0)
    })
    .await;
    let after = scrape(maddr).await;
    let idle = state(&after, "pgtide_servers", "state=\"idle\"");
    assert!(
        (1.0..=4.0).contains(&idle),
        "pool_size 4: {idle} idle servers"
    );
    assert!(
        state(&after, "pgtide_longest_wait_seconds", "") == 0.0,
        "nobody waits"
    );
}

/// Checks that `text` is a Grafana dashboard whose panels query a Prometheus datasource
/// chosen by a variable, and returns every `pgtide_` metric name its queries use.
fn dashboard_metric_names(text: &str) -> Result<std::collections::BTreeSet<String>, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let vars = v["templating"]["list"]
        .as_array()
        .ok_or("no templating.list")?;
    let ds = vars
        .iter()
        .find(|t| t["type"] == "datasource" && t["query"] == "prometheus")
        .ok_or("no datasource variable of type prometheus")?;
    let ds_ref = format!("${{{}}}", ds["name"].as_str().ok_or("a nameless variable")?);
    if v["title"].as_str().is_none_or(str::is_empty) {
        return Err("no title".into());
    }
    let mut panels: Vec<&Value> = Vec::new();
    let mut stack: Vec<&Value> = v["panels"].as_array().ok_or("no panels")?.iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        if p["type"] != "row" {
            panels.push(p);
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        if p["datasource"]["uid"].as_str() != Some(ds_ref.as_str()) {
            return Err(format!(
                "panel {title:?} does not use the datasource variable"
            ));
        }
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .ok_or(format!("panel {title:?} has no queries"))?;
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .ok_or(format!("panel {title:?}: a query without expr"))?;
            let mut rest = expr;
            while let Some(i) = rest.find("pgtide_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                names.insert(name);
            }
        }
    }
    Ok(names)
}

/// Every `pgtide_` metric the Grafana dashboard queries exists in a real scrape, and the
/// dashboard is Grafana JSON with a Prometheus datasource variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_uses_only_metrics_pgtide_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/pgtide.json");
    let text = std::fs::read_to_string(path).expect("dashboards/pgtide.json");
    let names =
        dashboard_metric_names(&text).unwrap_or_else(|e| panic!("dashboards/pgtide.json: {e}"));
    assert!(names.len() >= 10, "the dashboard queries {names:?}");

    // A routed database, so that the host and routing metrics have samples too.
    let (db, pooler, addr) = harness::setup("metrics_dashboard", |c| {
        let d = c.databases.values_mut().next().expect("a database");
        d.hosts = Some(vec![
            pgtide::config::HostConfig {
                host: "127.0.0.1".into(),
                port: harness::primary_port(),
                role: pgtide::config::HostRole::Primary,
                weight: 1,
            },
            pgtide::config::HostConfig {
                host: "127.0.0.1".into(),
                port: harness::replica_port(),
                role: pgtide::config::HostRole::Replica,
                weight: 1,
            },
        ]);
    })
    .await;
    let s = harness::tcp_connect_string(addr, harness::APP_USER, harness::APP_PASSWORD, &db);
    let c = to("connect", harness::connect(&s)).await.expect("connect");
    // Waits for the monitor to see both hosts, with a query now and then so that the
    // latency and routing series exist.
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let mut have = HashMap::new();
    let err = to("error", c.simple_query("SELECT 1/0"))
        .await
        .expect_err("division by zero");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    for _ in 0..100 {
        to("select", c.simple_query("SELECT 1"))
            .await
            .expect("select");
        have = scrape(maddr).await;
        if have
            .iter()
            .any(|(k, v)| k.starts_with("pgtide_host_replay_lag_bytes{") && *v >= 0.0)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let exported: std::collections::HashSet<&str> = have
        .keys()
        .map(|k| k.split('{').next().unwrap_or(k))
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics a scrape does not have: {missing:?}"
    );
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

/// `/readyz` is about the primary: a stopped replica leaves pgtide ready, a stopped
/// primary makes it unready (503) until the primary is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_primary() {
    use crate::routing::{blocking, own_cluster, routed_own};
    let lc = own_cluster().await;
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let pooler = routed_own(&lc, |c| {
        c.pgtide.health_check_failures = 2;
        c.pgtide.health_check_backoff_max =
            pgtide::config::ConfigDuration(std::time::Duration::from_millis(500));
    })
    .await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let host_up = |s: &HashMap<String, f64>, port: u16| {
        s.get(&format!(
            "pgtide_host_up{{database=\"rt\",host=\"127.0.0.1:{port}\"}}"
        ))
        .copied()
    };
    until("ready at start", || async {
        get(maddr, "/readyz").await.0 == 200
    })
    .await;

    // The replica stops: still ready (the primary is what counts).
    let l = lc.clone();
    blocking(move || crate::cluster::pg_ctl(&l, "replica", &["-m", "fast", "-w", "stop"])).await;
    until("the replica is marked down", || async {
        host_up(&scrape(maddr).await, rport) == Some(0.0)
    })
    .await;
    let (status, body) = get(maddr, "/readyz").await;
    assert_eq!(status, 200, "a replica outage leaves pgtide ready: {body}");

    // The primary stops: unready, and it says why.
    let l = lc.clone();
    blocking(move || crate::cluster::pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"])).await;
    until("unready", || async { get(maddr, "/readyz").await.0 == 503 }).await;
    let (_, body) = get(maddr, "/readyz").await;
    assert!(body.contains("\"rt\""), "names the database: {body}");
    assert_eq!(host_up(&scrape(maddr).await, pport), Some(0.0));
    assert_eq!(get(maddr, "/healthz").await.0, 200, "alive all the same");

    // The primary is back: ready again.
    let l = lc.clone();
    blocking(move || {
        crate::cluster::pg_ctl_start(&l, "primary");
    })
    .await;
    until("ready again", || async {
        get(maddr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(host_up(&scrape(maddr).await, pport), Some(1.0));
}

/// Polls every 100 ms for up to 60 s until `done` holds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// `collect_metrics = false`: the endpoint still answers, the sessions count nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_metrics_off_counts_nothing() {
    let (db, pooler, addr) =
        harness::setup("metrics_off", |c| c.pgtide.collect_metrics = false).await;
    let s = harness::tcp_connect_string(addr, harness::APP_USER, harness::APP_PASSWORD, &db);
    let c = to("connect", harness::connect(&s)).await.expect("connect");
    for _ in 0..5 {
        to("select", c.simple_query("SELECT 1"))
            .await
            .expect("select");
    }
    let _ = to("error", c.simple_query("SELECT 1/0")).await;
    drop(c);
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let after = scrape(maddr).await;
    for name in [
        "pgtide_transactions_total",
        "pgtide_queries_total",
        "pgtide_query_seconds_count",
        "pgtide_wait_seconds_count",
        "pgtide_bytes_received_total",
    ] {
        assert_eq!(sample(&after, name, &db), 0.0, "{name}");
    }
    assert!(
        !after.keys().any(|k| k.starts_with("pgtide_errors_total{")),
        "no error counted"
    );
    // Scrape-time gauges still work: the server connection is there, idle once the reset
    // that follows the client's departure has run (it is `used` until then).
    until("the server connection is idle", || async {
        scrape(maddr).await.iter().any(|(k, v)| {
            k.starts_with("pgtide_servers{") && k.contains("state=\"idle\"") && *v >= 1.0
        })
    })
    .await;
}

/// Reads one HTTP response from `s`: its head (status line and headers, without the
/// blank line) and a body of its `Content-Length`.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = to("read a response head", s.read(&mut byte))
            .await
            .expect("read");
        assert_eq!(
            n,
            1,
            "the connection closed inside a response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    head.truncate(head.len() - 4);
    let head = String::from_utf8(head).expect("an ASCII head");
    let len = header(&head, "content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
        .parse()
        .expect("a number");
    let mut body = vec![0; len];
    to("read a response body", s.read_exact(&mut body))
        .await
        .expect("the whole body");
    (head, body)
}

/// The value of header `name` (any case) in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads until the server closes `s` (it must, within a few seconds); returns the bytes
/// that came first.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .expect("read");
    rest
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = to("connect to metrics", TcpStream::connect(addr))
        .await
        .expect("the metrics endpoint accepts connections");
    s.set_nodelay(true).expect("TCP_NODELAY");
    s
}

async fn send(s: &mut TcpStream, bytes: &[u8]) {
    to("send a request", s.write_all(bytes))
        .await
        .expect("write");
}

/// Keep-alive: requests on one connection are answered one after the other, pipelined
/// ones too, without `Connection: close` until the client asks for it; HTTP/1.0 without
/// keep-alive gets its response and the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_keep_alive_answers_several_requests() {
    let (_db, pooler, _addr) = harness::setup("metrics_keepalive", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let mut s = connect(maddr).await;

    send(&mut s, b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n").await;
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/plain"), "{head}");
    assert_eq!(header(&head, "connection"), None, "kept alive: {head}");
    assert_eq!(body, b"ok\n");

    // The same connection, a query string (ignored).
    send(
        &mut s,
        b"GET /metrics?since=now HTTP/1.1\r\nHost: pgtide\r\n\r\n",
    )
    .await;
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        header(&head, "content-type"),
        Some("text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(header(&head, "connection"), None, "kept alive: {head}");
    let samples = parse_exposition(std::str::from_utf8(&body).expect("UTF-8"));
    assert!(samples.keys().any(|k| k.starts_with("pgtide_build_info{")));

    // Two pipelined in one write; the second asks to close.
    send(
        &mut s,
        b"GET /readyz HTTP/1.1\r\nHost: pgtide\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: pgtide\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"ready\n");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    assert_eq!(body, b"try /metrics, /healthz or /readyz\n");
    assert!(
        read_to_close(&mut s).await.is_empty(),
        "nothing after the last response"
    );

    // HTTP/1.0 without keep-alive: the response, then the close.
    let mut s = connect(maddr).await;
    send(&mut s, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert_eq!(body, b"ok\n");
    assert!(read_to_close(&mut s).await.is_empty());
}

/// `HEAD`: the status and headers of the `GET`, `Content-Length` included, and no body
/// (what comes before the server closes is the head alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_head_has_the_headers_and_no_body() {
    let (_db, pooler, _addr) = harness::setup("metrics_head", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let head_of = |path: &'static str| async move {
        let mut s = connect(maddr).await;
        let req = format!("HEAD {path} HTTP/1.1\r\nHost: pgtide\r\nConnection: close\r\n\r\n");
        send(&mut s, req.as_bytes()).await;
        let raw = String::from_utf8(read_to_close(&mut s).await).expect("ASCII");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("a response head: {raw:?}"));
        assert_eq!(body, "", "HEAD {path} has no body");
        head.to_string()
    };

    let head = head_of("/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/plain"), "{head}");
    assert_eq!(header(&head, "content-length"), Some("3"), "{head}");

    let head = head_of("/nope").await;
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    let not_found = "try /metrics, /healthz or /readyz\n".len().to_string();
    assert_eq!(
        header(&head, "content-length"),
        Some(not_found.as_str()),
        "{head}"
    );

    let head = head_of("/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        header(&head, "content-type"),
        Some("text/plain; version=0.0.4"),
        "{head}"
    );
    let len: usize = header(&head, "content-length")
        .expect("a Content-Length")
        .parse()
        .expect("a number");
    let (status, body) = get(maddr, "/metrics").await;
    assert_eq!(status, 200);
    // Scrape-time values may differ between the two, the size only by a little.
    assert!(
        len.abs_diff(body.len()) < body.len() / 10,
        "HEAD says {len} bytes, GET sent {}",
        body.len()
    );
}

/// A request head that arrives one byte at a time is answered; clients that leave in
/// the middle of a request leave the endpoint as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_in_small_pieces_is_answered() {
    let (_db, pooler, _addr) = harness::setup("metrics_pieces", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let mut s = connect(maddr).await;
    for b in b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\nConnection: close\r\n\r\n" {
        send(&mut s, &[*b]).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"ok\n");
    assert!(read_to_close(&mut s).await.is_empty());

    // Gone inside a request line, inside the headers, inside a declared body, and
    // after a request without reading its response.
    for partial in [
        &b"GET /metr"[..],
        b"GET /metrics HTTP/1.1\r\nHost: pg",
        b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\nContent-Length: 100\r\n\r\nabc",
        b"GET /metrics HTTP/1.1\r\nHost: pgtide\r\n\r\n",
    ] {
        let mut s = connect(maddr).await;
        send(&mut s, partial).await;
        drop(s);
    }
    let (status, body) = get(maddr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(!scrape(maddr).await.is_empty());
}

/// A head over the bound (16 KiB, or more than 100 headers) is answered 431 and the
/// connection closed; the endpoint goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_oversized_head_gets_431() {
    let (_db, pooler, _addr) = harness::setup("metrics_431", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let long = format!(
        "GET /metrics HTTP/1.1\r\nHost: pgtide\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let many = format!(
        "GET /metrics HTTP/1.1\r\nHost: pgtide\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-H{i}: {i}\r\n"))
            .collect::<String>()
    );
    for req in [long, many] {
        let mut s = connect(maddr).await;
        // The server may close before it has read it all.
        let _ = s.write_all(req.as_bytes()).await;
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .expect("the server closes the connection");
        let raw = String::from_utf8(raw).expect("ASCII");
        assert!(
            raw.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{raw:?}"
        );
        assert_eq!(header(&raw, "connection"), Some("close"), "{raw:?}");
    }
    let (status, body) = get(maddr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = get(maddr, "/metrics").await;
    assert_eq!(status, 200);
}

/// Methods other than GET and HEAD get 405 with `Allow: GET, HEAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_other_methods_get_405() {
    let (_db, pooler, _addr) = harness::setup("metrics_405", |_| {}).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    for req in [
        &b"POST /metrics HTTP/1.1\r\nHost: pgtide\r\nContent-Length: 0\r\n\r\n"[..],
        b"DELETE /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n",
        b"PUT /nope HTTP/1.1\r\nHost: pgtide\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        let mut s = connect(maddr).await;
        send(&mut s, req).await;
        let (head, body) = read_response(&mut s).await;
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{head}"
        );
        assert_eq!(header(&head, "allow"), Some("GET, HEAD"), "{head}");
        assert_eq!(body, b"use GET or HEAD\n");
    }
}
