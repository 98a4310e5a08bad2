// pgjdbc through pgtide (transaction mode), prepareThreshold=1: every PreparedStatement
// is a named server statement (S_1, S_2, ...) from its first execution; BEGIN goes
// through the extended protocol. 24 threads, each with its own connection, reuse a few
// statements across many transactions (and so across server connections), keep one
// PreparedStatement open across transactions, close statements (a small statement cache
// makes pgjdbc send Close), and recover from an error.
//
// Usage: java -cp postgresql.jar:DIR PgjdbcTest HOST PORT USER PASSWORD DBNAME
// Prints one line starting with "OK pgjdbc" on success; exits 1 with a message otherwise.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicInteger;

public class PgjdbcTest {
    static final int WORKERS = 24;
    static final int ROUNDS = 40;

    static void check(String what, Object got, Object want) {
        if (!String.valueOf(got).equals(String.valueOf(want))) {
            throw new IllegalStateException(what + ": got " + got + ", want " + want);
        }
    }

    static String one(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) throw new IllegalStateException("no row");
            StringBuilder sb = new StringBuilder();
            for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) {
                if (i > 1) sb.append('|');
                sb.append(rs.getString(i));
            }
            if (rs.next()) throw new IllegalStateException("more than one row");
            return sb.toString();
        }
    }

    static void worker(int w, String url, Properties props, AtomicInteger rounds) throws Exception {
        String step = "connect";
        try (Connection c = DriverManager.getConnection(url, props)) {
            c.setAutoCommit(false);
            step = "prepare long-lived";
            // Prepared (and, with prepareThreshold=1, named on the server) in the first
            // transaction, executed in every later one.
            try (PreparedStatement longLived = c.prepareStatement("SELECT ?::int * 3 AS x, ?::text AS t")) {
                for (int r = 0; r < ROUNDS; r++) {
                    String tag = "w" + w + " r" + r;
                    int n = w * 100000 + r;
                    step = "round " + r + " transaction";
                    try (PreparedStatement ps = c.prepareStatement("SELECT ?::int AS n, ?::text AS t")) {
                        ps.setInt(1, n);
                        ps.setString(2, tag);
                        check(tag + " row", one(ps), n + "|" + tag);
                    }
                    try (PreparedStatement ps = c.prepareStatement(
                            "SELECT count(*)::int, sum(g)::int FROM generate_series(1, ?::int) g")) {
                        ps.setInt(1, r + 1);
                        check(tag + " series", one(ps), (r + 1) + "|" + ((r + 1) * (r + 2) / 2));
                    }
                    longLived.setInt(1, n);
                    longLived.setString(2, tag);
                    check(tag + " long-lived", one(longLived), (n * 3) + "|" + tag);
                    c.commit();
                    // Rotating statements: 6 texts through a statement cache of 3, so
                    // pgjdbc closes (deallocates) evicted server statements.
                    step = "round " + r + " rotating";
                    int k = r % 6;
                    try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + " + k + " /* rot " + k + " */")) {
                        ps.setInt(1, n);
                        check(tag + " rotating " + k, one(ps), n + k);
                    }
                    c.commit();
                    if (r % 5 == 4) {
                        step = "round " + r + " error";
                        try (PreparedStatement ps = c.prepareStatement("SELECT 1/?::int AS q")) {
                            ps.setInt(1, 0);
                            boolean failed = false;
                            try {
                                one(ps);
                            } catch (SQLException e) {
                                if (!"22012".equals(e.getSQLState())) throw e;
                                failed = true;
                            }
                            if (!failed) throw new IllegalStateException(tag + ": SELECT 1/0 did not fail");
                            c.rollback();
                            step = "round " + r + " after error";
                            ps.setInt(1, 1);
                            check(tag + " after error", one(ps), 1);
                            c.commit();
                        }
                    }
                    rounds.incrementAndGet();
                }
            }
            // Autocommit: each statement its own transaction (no BEGIN).
            step = "autocommit";
            c.setAutoCommit(true);
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int AS n, ?::text AS t")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "auto" + w);
                    check("w" + w + " autocommit " + i, one(ps), i + "|auto" + w);
                }
            }
        } catch (Exception e) {
            throw new Exception("worker " + w + " at " + step + ": " + e, e);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 5) {
            System.err.println("usage: PgjdbcTest HOST PORT USER PASSWORD DBNAME");
            System.exit(2);
        }
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[4];
        Properties props = new Properties();
        props.setProperty("user", args[2]);
        props.setProperty("password", args[3]);
        props.setProperty("prepareThreshold", "1");
        props.setProperty("preparedStatementCacheQueries", "3");
        props.setProperty("sslmode", "disable");
        props.setProperty("connectTimeout", "30");
        props.setProperty("socketTimeout", "120");
        props.setProperty("ApplicationName", "pgjdbc");
        AtomicInteger rounds = new AtomicInteger();
        List<String> failures = Collections.synchronizedList(new ArrayList<>());
        List<Thread> threads = new ArrayList<>();
        for (int w = 0; w < WORKERS; w++) {
            final int id = w;
            Thread t = new Thread(() -> {
                try {
                    worker(id, url, props, rounds);
                } catch (Exception e) {
                    failures.add(e.getMessage());
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) t.join();
        String version = org.postgresql.Driver.class.getPackage().getImplementationVersion();
        if (!failures.isEmpty()) {
            System.err.println("FAIL pgjdbc " + version + ": " + failures.size() + " of " + WORKERS + " workers failed");
            for (int i = 0; i < Math.min(5, failures.size()); i++) System.err.println(failures.get(i));
            System.exit(1);
        }
        if (rounds.get() != WORKERS * ROUNDS) {
            System.err.println("FAIL pgjdbc: " + rounds.get() + " rounds done, want " + WORKERS * ROUNDS);
            System.exit(1);
        }
        System.out.println("OK pgjdbc " + version + ": " + WORKERS + " connections x " + ROUNDS + " rounds");
    }
}
