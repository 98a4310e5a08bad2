//! The classifier's table-driven corpus: statements with their expected route and, for
//! the interesting ones, the expected reason.

use super::*;

use Reason::*;
use Route::{Primary as P, Replica as R};

/// (sql, route, reason when it matters)
const CORPUS: &[(&str, Route, Option<Reason>)] = &[
    // ---- plain reads ----
    ("select 1", R, Some(ReadOnlySelect)),
    ("SELECT 1", R, Some(ReadOnlySelect)),
    ("SeLeCt * FrOm t", R, Some(ReadOnlySelect)),
    ("select * from t where id = $1", R, Some(ReadOnlySelect)),
    ("select a, b from t join u on t.id = u.tid where u.x > 3 order by a limit 10", R, None),
    ("select count(*) from t group by a having count(*) > 1", R, None),
    ("select now(), current_user, version()", R, None),
    ("select * from generate_series(1, 10)", R, None),
    ("select pg_is_in_recovery(), inet_server_port()", R, None),
    ("select * from t where x in (select y from u)", R, None),
    ("select exists(select 1 from t)", R, None),
    ("select * from t1 union all select * from t2", R, None),
    ("(select 1) union (select 2)", R, Some(ReadOnlySelect)),
    ("select * from t limit 10 offset 5", R, None),
    ("select * from t fetch first 5 rows only", R, None),
    ("select * from t fetch first 5 rows with ties", R, None),
    ("select substring(name from 1 for 3) from t", R, None),
    ("select overlay('abc' placing 'x' from 2 for 1)", R, None),
    ("select jsonb_build_object('a', 1) ->> 'a'", R, None),
    ("select x::text, y::int[] from t", R, None),
    ("select * from t where name like 'delete%'", R, None),
    ("select * from t tablesample system (10)", R, None),
    ("select pg_sleep(0.1)", R, None),
    ("select currval_like_name from t", R, None),
    ("select nextval from t", R, None),
    ("select * from t for_update", R, None),
    ("select row_number() over (partition by a order by b) from t", R, None),
    ("select array_agg(x order by y) filter (where z) from t", R, None),
    ("select percentile_cont(0.5) within group (order by x) from t", R, None),
    ("select * from t, lateral (select * from u where u.id = t.id) s", R, None),
    ("select 'it''s' as s", R, None),
    ("select txid_current_snapshot()", R, None),
    ("select pg_last_wal_replay_lsn()", R, None),
    ("select lo_get(1234)", R, None),
    ("select loread(lo_open_fd, 10)", R, None),
    ("select pg_advisory from t", R, None),
    ("values (1, 'a'), (2, 'b')", R, Some(Values)),
    ("VALUES (1)", R, Some(Values)),
    ("table t", R, Some(Table)),
    ("TABLE public.t", R, Some(Table)),
    ("show search_path", R, Some(Show)),
    ("SHOW ALL", R, Some(Show)),
    ("show transaction_read_only", R, Some(Show)),
    // quoted identifiers and strings that look like writes
    ("select \"delete\" from t", R, Some(ReadOnlySelect)),
    ("select * from \"update\"", R, Some(ReadOnlySelect)),
    ("select * from \"insert\" i join \"merge\" m on true", R, None),
    ("select \"nextval\" from t", R, None),
    ("select 'delete from t'", R, None),
    ("select 'nextval(''s'')'", R, None),
    ("select E'it\\'s; delete from t'", R, Some(ReadOnlySelect)),
    ("select e'\\\\'; select 2", R, None),
    ("select E'a\\'b', 'c''d; delete'", R, None),
    ("select U&\"d\\0061ta\" from t", R, None),
    ("select $$delete from t$$", R, Some(ReadOnlySelect)),
    ("select $body$ delete from t; drop table t $body$", R, None),
    ("select $a$ $b$ delete $b$ $a$", R, None),
    ("select $1, $2 from t where x = $3", R, None),
    ("select 'for update' from t", R, None),
    ("select * from t where note = 'select into'", R, None),
    // comments
    ("-- delete everything\nselect 1", R, None),
    ("/* delete from t */ select 1", R, Some(ReadOnlySelect)),
    ("/* outer /* nested delete */ still comment; drop table t */ select 1", R, None),
    ("select 1 -- ; delete from t", R, None),
    ("select 1 /* ; insert into t values (1) */", R, None),
    ("/* app=web route=/users */ select * from users", R, None),
    ("select /*+ IndexScan(t) */ * from t", R, None),
    // whitespace and case
    ("   \n\t  select 1", R, Some(ReadOnlySelect)),
    ("\n\nSELECT\n*\nFROM\nt\n", R, None),
    ("select 1;", R, None),
    ("select 1;;;", R, None),
    (";select 1", R, None),
    ("select 1; select 2", R, Some(ReadOnlySelect)),
    ("select 1; show x; values (1)", R, Some(ReadOnlySelect)),
    // read-only WITH
    ("with x as (select 1) select * from x", R, Some(ReadOnlyWith)),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r", R, Some(ReadOnlyWith)),
    ("with a as materialized (select 1), b as not materialized (select 2) select * from a, b", R, None),
    ("with \"delete\" as (select 1) select * from \"delete\"", R, None),
    // EXPLAIN
    ("explain select * from t", R, Some(Explain)),
    ("EXPLAIN VERBOSE SELECT 1", R, Some(Explain)),
    ("explain delete from t", R, Some(Explain)),
    ("explain (costs off) update t set a = 1", R, Some(Explain)),
    ("explain (analyze false) delete from t", R, Some(Explain)),
    ("explain (analyze off, costs off) insert into t values (1)", R, Some(Explain)),
    ("explain analyze select * from t", R, Some(ExplainAnalyzeRead)),
    ("EXPLAIN ANALYSE SELECT 1", R, Some(ExplainAnalyzeRead)),
    ("explain (analyze, buffers) select 1", R, Some(ExplainAnalyzeRead)),
    ("explain (format json, analyze true) with x as (select 1) select * from x", R, Some(ExplainAnalyzeRead)),
    ("explain analyze delete from t", P, Some(ExplainAnalyzeWrite)),
    ("EXPLAIN ANALYZE DELETE FROM t WHERE id = 1", P, Some(ExplainAnalyzeWrite)),
    ("explain analyze verbose update t set a = 1", P, Some(ExplainAnalyzeWrite)),
    ("explain (analyze) insert into t values (1)", P, Some(ExplainAnalyzeWrite)),
    ("explain (analyze 1, verbose) merge into t using u on t.id = u.id when matched then delete", P, Some(ExplainAnalyzeWrite)),
    ("explain (analyze 'on') select nextval('s')", P, Some(ExplainAnalyzeWrite)),
    ("explain analyze select * from t for update", P, Some(ExplainAnalyzeWrite)),
    ("explain analyze create table t2 as select 1", P, Some(ExplainAnalyzeWrite)),
    ("explain analyze with d as (delete from t returning *) select * from d", P, Some(ExplainAnalyzeWrite)),
    ("explain execute p(1)", P, Some(PreparedStatement("EXPLAIN EXECUTE"))),
    ("explain", P, Some(CouldNotClassify)),
    ("explain analyze explain select 1", P, Some(CouldNotClassify)),
    // COPY
    ("copy t to stdout", R, Some(CopyTo)),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)", R, Some(CopyTo)),
    ("copy (select * from t where a > 1) to stdout", R, Some(CopyTo)),
    ("copy (select a from t) to stdout with csv", R, Some(CopyTo)),
    ("copy t from stdin", P, Some(CopyFrom)),
    ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", P, Some(CopyFrom)),
    ("copy t from '/tmp/file.csv'", P, Some(CopyFrom)),
    ("copy (delete from t returning *) to stdout", P, Some(Dml("DELETE"))),
    ("copy (select nextval('s')) to stdout", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("copy (with d as (update t set a = 1 returning *) select * from d) to stdout", P, Some(WritableCte("UPDATE"))),
    ("copy t", P, Some(CouldNotClassify)),
    // session settings
    ("set search_path = app, public", R, Some(SessionSetting)),
    ("SET LOCAL statement_timeout = '5s'", R, Some(SessionSetting)),
    ("set session authorization default", R, Some(SessionSetting)),
    ("set time zone 'UTC'", R, Some(SessionSetting)),
    ("set default_transaction_read_only = on", R, Some(SessionSetting)),
    ("reset all", R, Some(SessionSetting)),
    ("discard all", R, Some(SessionSetting)),
    ("set application_name = 'x'; select 1", R, Some(SessionSetting)),
    // empty
    ("", R, Some(Empty)),
    ("   ;  ; ", R, Some(Empty)),
    ("/* just a comment */", R, Some(Empty)),
    ("-- only a comment", R, Some(Empty)),
    // ---- DML ----
    ("insert into t values (1)", P, Some(Dml("INSERT"))),
    ("INSERT INTO t SELECT * FROM u", P, Some(Dml("INSERT"))),
    ("insert into t values (1) on conflict (id) do update set a = excluded.a", P, Some(Dml("INSERT"))),
    ("update t set a = 1 where id = 2", P, Some(Dml("UPDATE"))),
    ("Update t Set a = a + 1", P, Some(Dml("UPDATE"))),
    ("delete from t", P, Some(Dml("DELETE"))),
    ("DELETE FROM t WHERE id = $1 RETURNING *", P, Some(Dml("DELETE"))),
    ("merge into t using u on t.id = u.id when matched then update set a = u.a", P, Some(Dml("MERGE"))),
    ("upsert into t values (1)", P, Some(Dml("UPSERT"))),
    ("truncate t", P, Some(Dml("TRUNCATE"))),
    ("  \n  insert into t values (1)", P, Some(Dml("INSERT"))),
    ("/* select */ delete from t", P, Some(Dml("DELETE"))),
    ("-- select 1\ndelete from t", P, Some(Dml("DELETE"))),
    ("/* a /* nested */ b */ update t set a = 1", P, Some(Dml("UPDATE"))),
    ("insert into t values ('it''s', E'\\'x', $$y$$)", P, Some(Dml("INSERT"))),
    // ---- multi-statement ----
    ("select 1; delete from t", P, Some(Dml("DELETE"))),
    ("select 1; select 2; insert into t values (1)", P, Some(Dml("INSERT"))),
    ("delete from t; select 1", P, Some(Dml("DELETE"))),
    ("select 'a;b'; update t set a = 1", P, Some(Dml("UPDATE"))),
    ("select $$;$$; drop table t", P, Some(Ddl("DROP"))),
    ("select 1 /* ; */ ; select nextval('s')", P, Some(WriteFunction(FnName::new(b"nextval")))),
    // ---- writable CTEs ----
    ("with d as (delete from t returning *) select * from d", P, Some(WritableCte("DELETE"))),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT count(*) FROM u", P, Some(WritableCte("UPDATE"))),
    ("with i as (insert into t values (1) returning id) select id from i", P, Some(WritableCte("INSERT"))),
    ("with m as (merge into t using u on true when matched then delete returning *) select 1", P, Some(WritableCte("MERGE"))),
    ("with a as (select 1), b as materialized (delete from t returning 1) select * from a", P, Some(WritableCte("DELETE"))),
    ("with x as (select 1) delete from t where id in (select * from x)", P, Some(Dml("DELETE"))),
    ("with x as (select 1) insert into t select * from x", P, Some(Dml("INSERT"))),
    ("with x as (select * from t for update) select * from x", P, Some(LockingRead("FOR UPDATE"))),
    ("with x as (select nextval('s')) select * from x", P, Some(WriteFunction(FnName::new(b"nextval")))),
    // ---- locking reads and SELECT INTO ----
    ("select * from t for update", P, Some(LockingRead("FOR UPDATE"))),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE SKIP LOCKED", P, Some(LockingRead("FOR UPDATE"))),
    ("select * from t for update of t nowait", P, Some(LockingRead("FOR UPDATE"))),
    ("select * from t for share", P, Some(LockingRead("FOR SHARE"))),
    ("select * from t for no key update", P, Some(LockingRead("FOR NO KEY UPDATE"))),
    ("select * from t FOR KEY SHARE", P, Some(LockingRead("FOR KEY SHARE"))),
    ("select * from (select * from t for update) s", P, Some(LockingRead("FOR UPDATE"))),
    ("select * from t\nfor\n  update", P, Some(LockingRead("FOR UPDATE"))),
    ("select * into new_t from t", P, Some(SelectInto)),
    ("SELECT a, b INTO TEMP tmp FROM t", P, Some(SelectInto)),
    ("select * into unlogged x from t where false", P, Some(SelectInto)),
    // ---- functions that write ----
    ("select nextval('s')", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("SELECT NEXTVAL('s')", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("select pg_catalog.nextval('s')", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("select nextval ('s')", P, None),
    ("select \"nextval\"('s')", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("select setval('s', 10)", P, Some(WriteFunction(FnName::new(b"setval")))),
    ("select currval('s')", P, Some(WriteFunction(FnName::new(b"currval")))),
    ("select lastval()", P, Some(WriteFunction(FnName::new(b"lastval")))),
    ("select pg_advisory_lock(1)", P, Some(WriteFunction(FnName::new(b"pg_advisory_lock")))),
    ("select pg_advisory_xact_lock(1, 2)", P, None),
    ("select pg_try_advisory_lock(42)", P, Some(WriteFunction(FnName::new(b"pg_try_advisory_lock")))),
    ("select pg_advisory_unlock_all()", P, None),
    ("select pg_advisory_lock_shared(1)", P, None),
    ("select txid_current()", P, Some(WriteFunction(FnName::new(b"txid_current")))),
    ("select pg_current_xact_id()", P, None),
    ("select set_config('search_path', 'x', false)", P, Some(WriteFunction(FnName::new(b"set_config")))),
    ("select pg_notify('chan', 'payload')", P, Some(WriteFunction(FnName::new(b"pg_notify")))),
    ("select lo_create(0)", P, Some(WriteFunction(FnName::new(b"lo_create")))),
    ("select lo_unlink(1234)", P, None),
    ("select lo_import('/tmp/x')", P, None),
    ("select pg_current_wal_lsn()", P, None),
    ("select * from t where id = nextval('s')", P, None),
    ("select * from nextval('s')", P, None),
    ("values (nextval('s'))", P, Some(WriteFunction(FnName::new(b"nextval")))),
    ("select a, (select setval('s', 1)) from t", P, None),
    ("select coalesce(null, nextval('s'))", P, None),
    ("select 1 from t where pg_try_advisory_xact_lock(t.id)", P, None),
    // ---- DDL ----
    ("create table t (id int)", P, Some(Ddl("CREATE"))),
    ("CREATE TEMP TABLE tmp AS SELECT 1", P, Some(Ddl("CREATE"))),
    ("create index concurrently on t (a)", P, None),
    ("create materialized view mv as select * from t", P, None),
    ("alter table t add column b int", P, Some(Ddl("ALTER"))),
    ("drop table if exists t cascade", P, Some(Ddl("DROP"))),
    ("comment on table t is 'select only'", P, Some(Ddl("COMMENT"))),
    ("grant select on t to reader", P, Some(Ddl("GRANT"))),
    ("revoke all on t from public", P, Some(Ddl("REVOKE"))),
    ("security label on table t is 'x'", P, None),
    ("import foreign schema s from server srv into local_s", P, None),
    ("reassign owned by a to b", P, None),
    ("create function f() returns int language sql as $$ select 1 $$", P, Some(Ddl("CREATE"))),
    // ---- maintenance ----
    ("vacuum", P, Some(Maintenance("VACUUM"))),
    ("VACUUM (VERBOSE, ANALYZE) t", P, Some(Maintenance("VACUUM"))),
    ("analyze t", P, Some(Maintenance("ANALYZE"))),
    ("cluster t using t_pkey", P, Some(Maintenance("CLUSTER"))),
    ("reindex table t", P, Some(Maintenance("REINDEX"))),
    ("checkpoint", P, Some(Maintenance("CHECKPOINT"))),
    // ---- procedures, blocks, locks, matviews ----
    ("call my_proc(1, 2)", P, Some(Call)),
    ("CALL s.p()", P, Some(Call)),
    ("do $$ begin perform 1; end $$", P, Some(Do)),
    ("DO LANGUAGE plpgsql $body$ BEGIN RAISE NOTICE 'x'; END $body$", P, Some(Do)),
    ("lock table t in access exclusive mode", P, Some(Lock)),
    ("LOCK t", P, Some(Lock)),
    ("refresh materialized view mv", P, Some(RefreshMaterializedView)),
    ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", P, Some(RefreshMaterializedView)),
    // ---- LISTEN / NOTIFY ----
    ("listen chan", P, Some(ListenNotify("LISTEN"))),
    ("unlisten *", P, Some(ListenNotify("UNLISTEN"))),
    ("notify chan, 'payload'", P, Some(ListenNotify("NOTIFY"))),
    ("NOTIFY chan", P, Some(ListenNotify("NOTIFY"))),
    // ---- prepared statements, cursors ----
    ("prepare p as select 1", P, Some(PreparedStatement("PREPARE"))),
    ("PREPARE q (int) AS SELECT * FROM t WHERE id = $1", P, Some(PreparedStatement("PREPARE"))),
    ("execute p", P, Some(PreparedStatement("EXECUTE"))),
    ("EXECUTE q(1)", P, Some(PreparedStatement("EXECUTE"))),
    ("deallocate all", P, Some(PreparedStatement("DEALLOCATE"))),
    ("declare c cursor with hold for select * from t", P, Some(Cursor("DECLARE"))),
    ("fetch 10 from c", P, Some(Cursor("FETCH"))),
    ("close c", P, Some(Cursor("CLOSE"))),
    // ---- transaction control ----
    ("begin", P, Some(TransactionControl)),
    ("BEGIN READ ONLY", P, Some(TransactionControl)),
    ("start transaction", P, Some(TransactionControl)),
    ("commit", P, Some(TransactionControl)),
    ("end", P, Some(TransactionControl)),
    ("rollback", P, Some(TransactionControl)),
    ("abort", P, Some(TransactionControl)),
    ("savepoint s1", P, Some(TransactionControl)),
    ("release savepoint s1", P, Some(TransactionControl)),
    ("rollback to savepoint s1", P, Some(TransactionControl)),
    ("set transaction read only", P, Some(TransactionControl)),
    ("prepare transaction 'gid'", P, Some(TransactionControl)),
    ("commit prepared 'gid'", P, Some(TransactionControl)),
    // ---- unknown and malformed ----
    ("frobnicate the database", P, Some(CouldNotClassify)),
    ("load 'auto_explain'", P, Some(CouldNotClassify)),
    ("42", P, Some(CouldNotClassify)),
    ("'select 1'", P, Some(CouldNotClassify)),
    ("select (1", P, Some(CouldNotClassify)),
    ("select 1)", P, Some(CouldNotClassify)),
    ("select 'unterminated", P, Some(Unterminated)),
    ("select \"unterminated", P, Some(Unterminated)),
    ("select $$ unterminated", P, Some(Unterminated)),
    ("select 1 /* unterminated", P, Some(Unterminated)),
    ("select E'unterminated\\'", P, Some(Unterminated)),
    ("select 1; select 'x", P, Some(Unterminated)),
    ("insert into t values ('unterminated", P, Some(Dml("INSERT"))),
    // ---- hints ----
    ("/* pgtide: primary */ select 1", P, Some(HintPrimary)),
    ("/* pgtide: replica */ select * from big_report", R, Some(HintReplica)),
    ("/*pgtide:replica*/select 1", R, Some(HintReplica)),
    ("/*  PGTIDE :  Primary  */ SELECT 1", P, Some(HintPrimary)),
    ("  \n/* app */ /* pgtide: replica */ select 1", R, Some(HintReplica)),
    ("-- pgtide: primary\nselect 1", P, Some(HintPrimary)),
    ("/* pgtide: replica */ select nextval('s')", R, Some(HintReplica)),
    ("/* pgtide: nowhere */ select 1", R, Some(ReadOnlySelect)),
    ("/* pgtide: primary select 1", P, Some(Unterminated)),
    ("select 1 /* pgtide: primary */", R, Some(ReadOnlySelect)),
    ("/* not a hint: pgtide: primary */ select 1", R, Some(ReadOnlySelect)),
];

#[test]
fn corpus() {
    let opts = ClassifyOptions::default();
    let mut failures = Vec::new();
    for &(sql, route, reason) in CORPUS {
        let d = classify(sql.as_bytes(), &opts);
        if d.route != route || reason.is_some_and(|r| r != d.reason) {
            failures.push(format!(
                "{sql:?}: got {d} ({:?}), want {route}{}",
                d.reason,
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
        assert_eq!(
            d.route,
            d.reason.route(),
            "{sql:?}: route and reason disagree"
        );
    }
    assert!(
        CORPUS.len() >= 150,
        "corpus has {} statements",
        CORPUS.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn hints_can_be_turned_off() {
    let opts = ClassifyOptions {
        write_functions: &[],
        hints: false,
    };
    let d = classify(b"/* pgtide: replica */ delete from t", &opts);
    assert_eq!((d.route, d.reason), (P, Dml("DELETE")));
    let d = classify(b"/* pgtide: primary */ select 1", &opts);
    assert_eq!((d.route, d.reason), (R, ReadOnlySelect));
}

#[test]
fn configured_write_functions() {
    let fns = vec!["audit_log".to_string(), "app.bump".to_string()];
    let opts = ClassifyOptions {
        write_functions: &fns,
        hints: true,
    };
    let route = |sql: &str| classify(sql.as_bytes(), &opts).route;
    assert_eq!(route("select audit_log('x')"), P);
    assert_eq!(route("SELECT Audit_Log('x')"), P);
    assert_eq!(route("select public.audit_log('x')"), P);
    assert_eq!(route("select app.bump(1)"), P);
    assert_eq!(route("select APP.BUMP(1)"), P);
    assert_eq!(route("select other.bump(1)"), R);
    assert_eq!(route("select bump(1)"), R);
    assert_eq!(route("select audit_log from t"), R);
    assert_eq!(route("select 'audit_log(1)'"), R);
    // Without the option they read.
    assert_eq!(
        classify(b"select audit_log('x')", &ClassifyOptions::default()).route,
        R
    );
    assert_eq!(
        classify(b"select audit_log('x')", &opts).to_string(),
        "primary: function audit_log writes"
    );
}

#[test]
fn display_says_why() {
    let opts = ClassifyOptions::default();
    let show = |sql: &str| classify(sql.as_bytes(), &opts).to_string();
    assert_eq!(
        show("with d as (delete from t returning *) select * from d"),
        "primary: writable CTE (DELETE inside WITH)"
    );
    assert_eq!(show("select 1"), "replica: read-only SELECT");
    assert_eq!(
        show("select nextval('s')"),
        "primary: function nextval writes"
    );
    assert_eq!(
        show("select 1; delete from t"),
        "primary: multi-statement with a write (statement 2: DML (DELETE))"
    );
    assert_eq!(
        show("select * from t for no key update"),
        "primary: SELECT ... FOR NO KEY UPDATE"
    );
    assert_eq!(
        show("explain analyze delete from t"),
        "primary: EXPLAIN ANALYZE of a write"
    );
    assert_eq!(show("copy t from stdin"), "primary: COPY FROM");
    assert_eq!(show("frob"), "primary: could not classify");
    assert_eq!(
        show("/* pgtide: replica */ select 1"),
        "replica: hint: replica"
    );
    let d = classify(b"select 1; select 2; update t set a = 1", &opts);
    assert_eq!(d.statement, 3);
    assert!(d.is_multi_statement_write());
    assert_eq!(classify(b"select 1; select 2", &opts).statement, 2);
}

#[test]
fn no_state_carries_over() {
    // A parse failure does not keep the previous statement's route.
    let opts = ClassifyOptions::default();
    assert_eq!(classify(b"select 1", &opts).route, R);
    assert_eq!(classify(b"select 'x", &opts).route, P);
    assert_eq!(classify(b"select 1", &opts).route, R);
    assert_eq!(classify(b"insert into t values (1)", &opts).route, P);
    assert_eq!(classify(b"select 1", &opts).route, R);
}

#[test]
fn never_panics_on_odd_input() {
    let opts = ClassifyOptions::default();
    let inputs: &[&[u8]] = &[
        b"(",
        b")",
        b"((((",
        b"$",
        b"$$",
        b"$a",
        b"$1$",
        b"'",
        b"\"",
        b"E'",
        b"e'\\",
        b"/*",
        b"/*/",
        b"*/",
        b"--",
        b"-",
        b";",
        b"select (",
        b"select nextval(",
        b"explain (",
        b"explain (analyze",
        b"explain (analyze,",
        b"copy (",
        b"with",
        b"for",
        b"select for",
        b"select * from t for no",
        b"select * from t for key",
        b"\xff\xfe select",
        b"select \xc3\xa9 from t",
        b"/* pgtide: */",
        b"/* pgtide",
        b"/*",
    ];
    for sql in inputs {
        let d = classify(sql, &opts);
        assert_eq!(d.route, d.reason.route());
        let _ = transaction_mode(sql);
    }
    // Deep nesting and long inputs are fine (no recursion on the input).
    let deep = "(".repeat(100_000) + &")".repeat(100_000);
    let _ = classify(deep.as_bytes(), &opts);
    let many = "explain ".repeat(10_000) + "select 1";
    assert_eq!(classify(many.as_bytes(), &opts).route, P);
}

// ---- transaction_mode ----

fn tx(sql: &str) -> Option<TxStart> {
    transaction_mode(sql.as_bytes())
}

fn ro(sql: &str) -> Option<(bool, Option<bool>)> {
    tx(sql).map(|t| (t.starts_transaction(), t.read_only))
}

#[test]
fn transaction_mode_begin_forms() {
    assert_eq!(ro("begin"), Some((true, None)));
    assert_eq!(ro("BEGIN;"), Some((true, None)));
    assert_eq!(ro("begin work"), Some((true, None)));
    assert_eq!(ro("begin transaction"), Some((true, None)));
    assert_eq!(ro("start transaction"), Some((true, None)));
    assert_eq!(ro("BEGIN READ ONLY"), Some((true, Some(true))));
    assert_eq!(ro("begin read write"), Some((true, Some(false))));
    assert_eq!(ro("START TRANSACTION READ ONLY"), Some((true, Some(true))));
    assert_eq!(
        ro("  /* x */ begin -- y\n read only ;"),
        Some((true, Some(true)))
    );
    assert_eq!(ro("start"), None);
    assert_eq!(ro("begin garbage"), None);
    assert_eq!(ro("begin read"), None);
    assert_eq!(ro("select 1"), None);
    assert_eq!(ro("commit"), None);
    assert_eq!(ro(""), None);
}

#[test]
fn transaction_mode_every_order() {
    let iso = "ISOLATION LEVEL REPEATABLE READ";
    let acc = "READ ONLY";
    let def = "NOT DEFERRABLE";
    let orders = [
        [iso, acc, def],
        [iso, def, acc],
        [acc, iso, def],
        [acc, def, iso],
        [def, iso, acc],
        [def, acc, iso],
    ];
    for order in orders {
        for sep in [" ", ", ", ",", " , "] {
            for start in [
                "BEGIN",
                "begin transaction",
                "START TRANSACTION",
                "begin work",
            ] {
                let sql = format!("{start} {}", order.join(sep));
                let t = tx(&sql).unwrap_or_else(|| panic!("{sql:?} not recognized"));
                assert!(t.starts_transaction(), "{sql}");
                assert_eq!(t.read_only, Some(true), "{sql}");
                assert_eq!(t.isolation, Some(Isolation::RepeatableRead), "{sql}");
                assert_eq!(t.deferrable, Some(false), "{sql}");
                assert!(t.replica_ok(false), "{sql}");
            }
        }
    }
    let t = tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").unwrap();
    assert_eq!(
        (t.read_only, t.isolation),
        (Some(true), Some(Isolation::RepeatableRead))
    );
    let t = tx("begin isolation level serializable, read only, deferrable").unwrap();
    assert_eq!(t.isolation, Some(Isolation::Serializable));
    assert_eq!(t.deferrable, Some(true));
    assert!(t.is_read_only(false));
    assert!(!t.replica_ok(false), "a hot standby refuses SERIALIZABLE");
    let t = tx("begin isolation level read committed read write").unwrap();
    assert_eq!(
        (t.read_only, t.isolation),
        (Some(false), Some(Isolation::ReadCommitted))
    );
    assert!(!t.replica_ok(true));
    let t = tx("begin isolation level read uncommitted").unwrap();
    assert_eq!(
        (t.read_only, t.isolation),
        (None, Some(Isolation::ReadUncommitted))
    );
    assert!(t.replica_ok(true) && !t.replica_ok(false));
    // The last mode wins, as in PostgreSQL.
    assert_eq!(ro("begin read only, read write"), Some((true, Some(false))));
    assert_eq!(tx("begin isolation level"), None);
    assert_eq!(tx("begin isolation level repeatable"), None);
    assert_eq!(tx("begin not"), None);
}

#[test]
fn transaction_mode_set_forms() {
    let t = tx("SET TRANSACTION READ ONLY").unwrap();
    assert_eq!((t.kind, t.read_only), (TxKind::SetTransaction, Some(true)));
    assert!(!t.starts_transaction());
    let t = tx("set transaction isolation level serializable, read only").unwrap();
    assert_eq!(t.isolation, Some(Isolation::Serializable));
    let t = tx("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").unwrap();
    assert_eq!(
        (t.kind, t.read_only),
        (TxKind::SetSessionDefault, Some(true))
    );
    let t = tx("set session characteristics as transaction read write").unwrap();
    assert_eq!(t.read_only, Some(false));
    for v in ["on", "true", "1", "'on'", "'true'", "yes", "ON", "t", "'1'"] {
        for op in ["=", "TO", " = ", "to"] {
            let sql = format!("SET default_transaction_read_only {op} {v}");
            let t = tx(&sql).unwrap_or_else(|| panic!("{sql:?}"));
            assert_eq!(
                (t.kind, t.read_only),
                (TxKind::SetSessionDefault, Some(true)),
                "{sql}"
            );
        }
    }
    for v in ["off", "false", "0", "'off'", "no", "f"] {
        let sql = format!("set default_transaction_read_only = {v}");
        assert_eq!(tx(&sql).unwrap().read_only, Some(false), "{sql}");
    }
    let t = tx("set session default_transaction_read_only = on").unwrap();
    assert_eq!(
        (t.kind, t.read_only),
        (TxKind::SetSessionDefault, Some(true))
    );
    let t = tx("set transaction_read_only = on").unwrap();
    assert_eq!((t.kind, t.read_only), (TxKind::SetTransaction, Some(true)));
    let t = tx("set default_transaction_isolation = 'repeatable read'").unwrap();
    assert_eq!(t.isolation, Some(Isolation::RepeatableRead));
    let t = tx("set default_transaction_deferrable to on").unwrap();
    assert_eq!(t.deferrable, Some(true));
    assert_eq!(
        tx("set default_transaction_read_only to default").map(|t| t.kind),
        Some(TxKind::ResetSessionDefault)
    );
    assert_eq!(
        tx("reset default_transaction_read_only").map(|t| t.kind),
        Some(TxKind::ResetSessionDefault)
    );
    assert_eq!(
        tx("RESET ALL").map(|t| t.kind),
        Some(TxKind::ResetSessionDefault)
    );
    assert_eq!(
        tx("discard all").map(|t| t.kind),
        Some(TxKind::ResetSessionDefault)
    );
    assert_eq!(tx("set default_transaction_read_only = maybe"), None);
    assert_eq!(tx("set default_transaction_read_only = o"), None);
    assert_eq!(tx("set search_path = x"), None);
    assert_eq!(tx("reset search_path"), None);
    assert_eq!(tx("set transaction snapshot '0001'"), None);
    assert_eq!(tx("set transaction_isolation_x = 1"), None);
}

#[test]
fn transaction_mode_begin_then_set_transaction() {
    let t = tx("BEGIN; SET TRANSACTION READ ONLY; SELECT 1").unwrap();
    assert!(t.starts_transaction());
    assert_eq!(t.read_only, Some(true));
    let t = tx("begin isolation level repeatable read; set transaction read only").unwrap();
    assert_eq!(
        (t.read_only, t.isolation),
        (Some(true), Some(Isolation::RepeatableRead))
    );
    let t = tx("begin; select 1; set transaction read only").unwrap();
    assert_eq!(
        t.read_only, None,
        "only a SET TRANSACTION right after BEGIN counts"
    );
    let t = tx("begin read only; set search_path = x").unwrap();
    assert_eq!(t.read_only, Some(true));
}
