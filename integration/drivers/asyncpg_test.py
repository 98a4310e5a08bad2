"""asyncpg through pgtide (transaction mode): many asyncio tasks, each with its own
connection and asyncpg's statement cache (Parse/Describe/Flush, then Bind/Execute/Sync),
explicit conn.prepare() statements used across transactions, a small cache so that
asyncpg closes evicted statements, and recovery from an error.

Usage: asyncpg_test.py HOST PORT USER PASSWORD DBNAME
Prints one line starting with "OK asyncpg" on success; exits 1 with a message otherwise.
"""

import asyncio
import sys
import traceback

import asyncpg

WORKERS = 24
ROUNDS = 40
CACHE = 4  # small, so that the rotating statements below are evicted and closed


class Mismatch(Exception):
    pass


def check(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


async def worker(w, args, stats, failures):
    host, port, user, password, dbname = args
    step = "connect"
    try:
        conn = await asyncpg.connect(
            host=host, port=int(port), user=user, password=password, database=dbname,
            statement_cache_size=CACHE, timeout=30,
            server_settings={"application_name": f"asyncpg_w{w}"},
        )
    except Exception as e:  # noqa: BLE001
        failures.append(f"worker {w}: connect: {e!r}")
        return
    try:
        # Prepared explicitly in one transaction, executed in later ones.
        step = "prepare"
        explicit = await conn.prepare("SELECT $1::int * 3 AS x, $2::text AS t")
        for r in range(ROUNDS):
            tag = f"w{w} r{r}"
            n = w * 100_000 + r
            step = f"round {r} transaction"
            async with conn.transaction():
                row = await conn.fetchrow("SELECT $1::int AS n, $2::text AS t", n, tag)
                check(f"{tag} row", tuple(row), (n, tag))
                got = await conn.fetchval(
                    "SELECT sum(g)::int FROM generate_series(1, $1::int) g", r + 1
                )
                check(f"{tag} series", got, (r + 1) * (r + 2) // 2)
                row = await explicit.fetchrow(n, tag)
                check(f"{tag} explicit in tx", tuple(row), (n * 3, tag))
            step = f"round {r} outside"
            # Outside a transaction: each statement is its own transaction.
            row = await explicit.fetchrow(n + 1, tag)
            check(f"{tag} explicit", tuple(row), ((n + 1) * 3, tag))
            k = r % 6
            got = await conn.fetchval(f"SELECT $1::int + {k} /* rot {k} */", n)
            check(f"{tag} rotating {k}", got, n + k)
            if r % 5 == 4:
                step = f"round {r} error"
                try:
                    await conn.fetchval("SELECT 1/$1::int", 0)
                    raise Mismatch(f"{tag}: SELECT 1/0 did not fail")
                except asyncpg.exceptions.DivisionByZeroError:
                    pass
                step = f"round {r} after error"
                check(f"{tag} after error", await conn.fetchval("SELECT 1/$1::int", 1), 1)
                # An error inside a transaction, then the transaction is rolled back.
                try:
                    async with conn.transaction():
                        await conn.fetchval("SELECT 1/$1::int", 0)
                    raise Mismatch(f"{tag}: SELECT 1/0 in a transaction did not fail")
                except asyncpg.exceptions.DivisionByZeroError:
                    pass
                row = await explicit.fetchrow(n, tag)
                check(f"{tag} explicit after error", tuple(row), (n * 3, tag))
            if r % 10 == 9:
                # A short-lived explicit statement: asyncpg closes it once it is dropped.
                step = f"round {r} short-lived"
                tmp = await conn.prepare(f"SELECT $1::text || '-{r}' AS s")
                check(f"{tag} short-lived", await tmp.fetchval(tag), f"{tag}-{r}")
                del tmp
            stats[w] = r + 1
        step = "close"
        await conn.close(timeout=30)
    except Exception as e:  # noqa: BLE001
        failures.append(f"worker {w} at {step}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        conn.terminate()


async def main():
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    args = tuple(sys.argv[1:])
    stats = [0] * WORKERS
    failures = []
    await asyncio.gather(*(worker(w, args, stats, failures) for w in range(WORKERS)))
    if failures:
        print(f"FAIL asyncpg {asyncpg.__version__}: {len(failures)} of {WORKERS} workers failed",
              file=sys.stderr)
        for f in failures[:5]:
            print(f, file=sys.stderr)
        sys.exit(1)
    total = sum(stats)
    if total != WORKERS * ROUNDS:
        print(f"FAIL asyncpg: {total} rounds done, want {WORKERS * ROUNDS}", file=sys.stderr)
        sys.exit(1)
    print(f"OK asyncpg {asyncpg.__version__}: {WORKERS} connections x {ROUNDS} rounds")


if __name__ == "__main__":
    asyncio.run(main())
