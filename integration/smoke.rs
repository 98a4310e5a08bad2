//! The harness itself works: the cluster is up, the replica is a hot standby that refuses
//! writes and streams what the primary writes.

use crate::harness::{self, connect, direct_addr, tcp_connect_string};

#[tokio::test]
async fn cluster_starts() {
    let c = harness::cluster();
    let primary = harness::primary_port();
    let replica = harness::replica_port();
    assert_ne!(primary, replica);
    assert_eq!(
        harness::psql(primary, "postgres", "SELECT pg_is_in_recovery()"),
        "f"
    );
    assert_eq!(
        harness::psql(replica, "postgres", "SELECT pg_is_in_recovery()"),
        "t"
    );
    assert!(c.dir.is_dir());

    // The configured roles log in over TCP with their own methods.
    let db = harness::fresh_database("smoke");
    for (user, password) in [
        ("app", "apppass"),
        ("pgtide_md5", "md5pass"),
        ("pgtide_scram", "scrampass"),
        ("pgtide_trust", ""),
    ] {
        let client = connect(&tcp_connect_string(
            direct_addr(primary),
            user,
            password,
            &db,
        ))
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in to the primary: {e}"));
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
    }
    let wrong = connect(&tcp_connect_string(
        direct_addr(primary),
        "pgtide_md5",
        "nope",
        &db,
    ))
    .await;
    assert!(wrong.is_err(), "a wrong md5 password must be refused");

    // A write on the replica fails with 25006 (read_only_sql_transaction).
    let on_replica = connect(&tcp_connect_string(
        direct_addr(replica),
        "postgres",
        "",
        &db,
    ))
    .await
    .expect("connect to the replica");
    let err = on_replica
        .batch_execute("CREATE TABLE not_here (id int)")
        .await
        .expect_err("a write on the hot standby must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // A table created on the primary shows up on the replica.
    let on_primary = connect(&tcp_connect_string(
        direct_addr(primary),
        "app",
        "apppass",
        &db,
    ))
    .await
    .expect("connect to the primary");
    on_primary
        .batch_execute("CREATE TABLE streamed (id int); INSERT INTO streamed VALUES (1), (2), (3)")
        .await
        .expect("write on the primary");
    harness::wait_replica_caught_up();
    let row = on_replica
        .query_one("SELECT count(*) FROM streamed", &[])
        .await
        .expect("the replica has the table");
    assert_eq!(row.get::<_, i64>(0), 3);
}
