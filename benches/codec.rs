//! Micro-benchmark of the framing hot path: `pgtide::protocol::Scanner` walking
//! realistic buffers message by message, the way the forwarding loop does.
//!
//! Run with `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgtide::protocol::{tag, Scanner};

/// Appends one message: tag, length (including itself), body.
fn msg(buf: &mut Vec<u8>, tag: u8, body: &[u8]) {
    buf.push(tag);
    buf.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    buf.extend_from_slice(body);
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// The answer to `SELECT aid, bid, abalance, filler FROM pgbench_accounts LIMIT 100`:
/// RowDescription, 100 DataRows, CommandComplete, ReadyForQuery.
fn server_response() -> Vec<u8> {
    let mut out = Vec::new();
    // RowDescription: 4 columns (int4, int4, int4, bpchar(84)).
    let mut rd = Vec::new();
    rd.extend_from_slice(&4i16.to_be_bytes());
    for (name, type_oid, size) in [
        ("aid", 23u32, 4i16),
        ("bid", 23, 4),
        ("abalance", 23, 4),
        ("filler", 1042, -1),
    ] {
        cstr(&mut rd, name);
        rd.extend_from_slice(&16_404u32.to_be_bytes()); // table oid
        rd.extend_from_slice(&1i16.to_be_bytes()); // column number
        rd.extend_from_slice(&type_oid.to_be_bytes());
        rd.extend_from_slice(&size.to_be_bytes());
        rd.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
        rd.extend_from_slice(&0i16.to_be_bytes()); // text format
    }
    msg(&mut out, tag::ROW_DESCRIPTION, &rd);
    // 100 DataRows in text format.
    let filler = " ".repeat(84);
    for i in 1..=100u32 {
        let mut dr = Vec::new();
        dr.extend_from_slice(&4i16.to_be_bytes());
        let aid = i.to_string();
        let bid = "1";
        let abalance = ((i * 37) % 5000).to_string();
        for v in [aid.as_str(), bid, abalance.as_str(), filler.as_str()] {
            dr.extend_from_slice(&(v.len() as i32).to_be_bytes());
            dr.extend_from_slice(v.as_bytes());
        }
        msg(&mut out, tag::DATA_ROW, &dr);
    }
    let mut cc = Vec::new();
    cstr(&mut cc, "SELECT 100");
    msg(&mut out, tag::COMMAND_COMPLETE, &cc);
    msg(&mut out, tag::READY_FOR_QUERY, b"I");
    out
}

/// One pgbench `-M extended` select-only transaction as the client sends it:
/// Parse (unnamed), Bind (one text parameter), Describe (portal), Execute, Sync.
fn client_batch() -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = Vec::new();
    cstr(&mut p, "");
    cstr(
        &mut p,
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    );
    p.extend_from_slice(&0i16.to_be_bytes()); // no parameter types
    msg(&mut out, tag::PARSE, &p);
    let mut b = Vec::new();
    cstr(&mut b, ""); // portal
    cstr(&mut b, ""); // statement
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    b.extend_from_slice(&1i16.to_be_bytes()); // one parameter
    let aid = b"734125";
    b.extend_from_slice(&(aid.len() as i32).to_be_bytes());
    b.extend_from_slice(aid);
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats
    msg(&mut out, tag::BIND, &b);
    let mut d = vec![b'P'];
    cstr(&mut d, "");
    msg(&mut out, tag::DESCRIBE, &d);
    let mut e = Vec::new();
    cstr(&mut e, "");
    e.extend_from_slice(&0i32.to_be_bytes()); // no row limit
    msg(&mut out, tag::EXECUTE, &e);
    msg(&mut out, tag::SYNC, b"");
    out
}

/// Walks `buf` as successive socket reads of `chunk` bytes would deliver it: each read
/// appends to the unconsumed tail (an incomplete inspected message stays), streamed
/// message bodies are skipped across reads. `inspect` selects the tags whose whole body
/// the caller wants. Returns the number of frames and the sum of inspected body
/// lengths, so that nothing is optimized away.
fn scan(buf: &[u8], chunk: usize, inspect: impl Fn(u8) -> bool + Copy) -> (usize, usize) {
    let mut s = Scanner::new(64 * 1024 * 1024);
    let (mut frames, mut inspected) = (0, 0);
    let (mut start, mut read_end) = (0, 0);
    while start < buf.len() {
        read_end = (read_end + chunk).min(buf.len());
        let part = &buf[start..read_end];
        let mut pos = s.resume(part);
        while let Some(f) = s.next(part, &mut pos, inspect).expect("well-formed") {
            frames += 1;
            if let Some(body) = f.body {
                inspected += body.len();
            }
        }
        start += pos;
        assert!(
            start == buf.len() || read_end < buf.len(),
            "truncated buffer"
        );
    }
    (frames, inspected)
}

fn bench_server_response(c: &mut Criterion) {
    let buf = server_response();
    let mut g = c.benchmark_group("scan_server_response");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    // The forwarding loop inspects only ReadyForQuery and ErrorResponse; DataRows stream.
    let rfq = |t: u8| t == tag::READY_FOR_QUERY || t == tag::ERROR_RESPONSE;
    g.bench_function("one_read", |b| {
        b.iter(|| scan(black_box(&buf), buf.len(), rfq))
    });
    g.bench_function("reads_of_1k", |b| {
        b.iter(|| scan(black_box(&buf), 1024, rfq))
    });
    g.finish();
}

fn bench_client_batch(c: &mut Criterion) {
    let buf = client_batch();
    let mut g = c.benchmark_group("scan_client_batch");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    // Parse is inspected (statement names matter to a transaction pooler); the rest streams.
    let parse = |t: u8| t == tag::PARSE;
    g.bench_function("extended_select", |b| {
        b.iter(|| scan(black_box(&buf), buf.len(), parse))
    });
    g.finish();
}

criterion_group!(benches, bench_server_response, bench_client_batch);
criterion_main!(benches);
