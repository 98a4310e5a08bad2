"""psycopg 3 through pgtide (transaction mode): many threads, each with its own
connection and psycopg's prepared-statement cache, reusing a few statements across
transactions (and so across server connections), evicting statements (psycopg closes
them with a protocol-level Close), and recovering from an error.

Usage: psycopg_test.py HOST PORT USER PASSWORD DBNAME THRESHOLD
THRESHOLD is "0" (prepare everything at once), "default" (psycopg's default, 5), or
"pipeline" (prepare_threshold=0, and every round also runs in psycopg's pipeline mode,
where libpq ends each pipeline with Sync followed by Flush).
Prints one line starting with "OK psycopg" on success; exits 1 with a message otherwise.
"""

import sys
import threading
import traceback

import psycopg
from psycopg import errors

WORKERS = 24
ROUNDS = 40
# A small cache, so that the rotating statements below make psycopg evict (Close)
# prepared statements now and then.
PREPARED_MAX = 4


class Mismatch(Exception):
    pass


def check(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


def worker(w, args, threshold, pipeline, stats, failures):
    host, port, user, password, dbname = args
    kw = {}
    if threshold is not None:
        kw["prepare_threshold"] = threshold
    try:
        conn = psycopg.connect(
            host=host, port=port, user=user, password=password, dbname=dbname,
            application_name=f"psycopg_w{w}", connect_timeout=30, **kw,
        )
    except Exception as e:  # noqa: BLE001
        failures.append(f"worker {w}: connect: {e!r}")
        return
    # Half the workers run autocommit (each statement its own transaction), half
    # explicit transactions with several statements.
    conn.autocommit = w % 2 == 0
    conn.prepared_max = PREPARED_MAX
    step = "start"
    try:
        with conn:
            cur = conn.cursor()
            for r in range(ROUNDS):
                tag = f"w{w} r{r}"
                n = w * 100_000 + r
                step = f"round {r} main"
                with conn.transaction():
                    cur.execute("SELECT %s::int AS n, %s::text AS t", (n, tag))
                    check(f"{tag} row", cur.fetchall(), [(n, tag)])
                    cur.execute(
                        "SELECT count(*)::int, sum(g)::int FROM generate_series(1, %s::int) g",
                        (r + 1,),
                    )
                    check(f"{tag} series", cur.fetchone(), (r + 1, (r + 1) * (r + 2) // 2))
                # A rotating statement: 6 texts through a cache of 4 evicts (Close).
                step = f"round {r} rotating"
                k = r % 6
                cur.execute(f"SELECT %s::int + {k} AS v /* rot {k} */", (n,))
                check(f"{tag} rotating {k}", cur.fetchone(), (n + k,))
                if not conn.autocommit:
                    conn.commit()
                if r % 5 == 4:
                    step = f"round {r} error"
                    try:
                        cur.execute("SELECT 1/%s::int AS q", (0,))
                        cur.fetchall()
                        raise Mismatch(f"{tag}: SELECT 1/0 did not fail")
                    except errors.DivisionByZero:
                        pass
                    if not conn.autocommit:
                        conn.rollback()
                    step = f"round {r} after error"
                    cur.execute("SELECT 1/%s::int AS q", (1,))
                    check(f"{tag} after error", cur.fetchone(), (1,))
                    if not conn.autocommit:
                        conn.commit()
                if pipeline:
                    step = f"round {r} pipeline"
                    with conn.pipeline():
                        c1 = conn.cursor()
                        c1.execute("SELECT %s::int AS n, %s::text AS t", (n, tag))
                        c2 = conn.cursor()
                        c2.execute("SELECT %s::int * 2 AS d", (n,))
                        check(f"{tag} pipeline 1", c1.fetchone(), (n, tag))
                        check(f"{tag} pipeline 2", c2.fetchone(), (n * 2,))
                    if not conn.autocommit:
                        conn.commit()
                stats[w] = r + 1
            prepared = len(conn._prepared._names)  # noqa: SLF001 - a check, not an API
            if threshold is not None and threshold == 0 and prepared == 0:
                raise Mismatch("psycopg prepared nothing with prepare_threshold=0")
    except Exception as e:  # noqa: BLE001
        failures.append(f"worker {w} at {step}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


def main():
    if len(sys.argv) != 7:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    host, port, user, password, dbname, th = sys.argv[1:]
    threshold = 0 if th in ("0", "pipeline") else None
    pipeline = th == "pipeline"
    stats = [0] * WORKERS
    failures = []
    threads = [
        threading.Thread(
            target=worker, args=(w, (host, port, user, password, dbname), threshold, pipeline, stats, failures),
        )
        for w in range(WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print(f"FAIL psycopg {psycopg.__version__} threshold={th}: {len(failures)} of {WORKERS} workers failed",
              file=sys.stderr)
        for f in failures[:5]:
            print(f, file=sys.stderr)
        sys.exit(1)
    total = sum(stats)
    if total != WORKERS * ROUNDS:
        print(f"FAIL psycopg: {total} rounds done, want {WORKERS * ROUNDS}", file=sys.stderr)
        sys.exit(1)
    print(f"OK psycopg {psycopg.__version__} threshold={th}: {WORKERS} connections x {ROUNDS} rounds")


if __name__ == "__main__":
    main()
