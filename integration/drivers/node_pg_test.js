// node-postgres (pg) through pgtide (transaction mode): a pg.Pool of 24 clients, 24
// concurrent workers using named queries ({ name, text, values }), which pg prepares
// once per connection and then only binds, across many transactions (and so across
// server connections), and recovery from an error.
//
// Usage: node node_pg_test.js HOST PORT USER PASSWORD DBNAME
// Prints one line starting with "OK node-pg" on success; exits 1 with a message otherwise.
'use strict';

const pg = require('pg');

const WORKERS = 24;
const ROUNDS = 40;

function check(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, want ${w}`);
}

async function worker(pool, w, stats) {
  let step = 'connect';
  const client = await pool.connect();
  let broken;
  try {
    for (let r = 0; r < ROUNDS; r++) {
      const tag = `w${w} r${r}`;
      const n = w * 100000 + r;
      step = `round ${r} transaction`;
      await client.query('BEGIN');
      let res = await client.query({ name: 'q1', text: 'SELECT $1::int AS n', values: [n] });
      check(`${tag} q1`, res.rows, [{ n }]);
      res = await client.query({
        name: 'q2',
        text: 'SELECT $1::text AS t, $2::int * 2 AS d',
        values: [tag, n],
      });
      check(`${tag} q2`, res.rows, [{ t: tag, d: n * 2 }]);
      await client.query('COMMIT');
      // Outside a transaction: each named query is its own transaction.
      step = `round ${r} outside`;
      res = await client.query({
        name: 'series',
        text: 'SELECT count(*)::int AS c, sum(g)::int AS s FROM generate_series(1, $1::int) g',
        values: [r + 1],
      });
      check(`${tag} series`, res.rows, [{ c: r + 1, s: ((r + 1) * (r + 2)) / 2 }]);
      // pool.query: whichever pooled client is free, with the same statement names.
      res = await pool.query({ name: 'q1', text: 'SELECT $1::int AS n', values: [n + 7] });
      check(`${tag} pool.query q1`, res.rows, [{ n: n + 7 }]);
      if (r % 5 === 4) {
        step = `round ${r} error`;
        let failed = false;
        try {
          await client.query({ name: 'div', text: 'SELECT 1/$1::int AS q', values: [0] });
        } catch (e) {
          if (e.code !== '22012') throw e;
          failed = true;
        }
        if (!failed) throw new Error(`${tag}: SELECT 1/0 did not fail`);
        step = `round ${r} after error`;
        res = await client.query({ name: 'div', text: 'SELECT 1/$1::int AS q', values: [1] });
        check(`${tag} after error`, res.rows, [{ q: 1 }]);
        // An error inside a transaction, then ROLLBACK.
        await client.query('BEGIN');
        failed = false;
        try {
          await client.query({ name: 'div', text: 'SELECT 1/$1::int AS q', values: [0] });
        } catch (e) {
          if (e.code !== '22012') throw e;
          failed = true;
        }
        if (!failed) throw new Error(`${tag}: SELECT 1/0 in a transaction did not fail`);
        await client.query('ROLLBACK');
        res = await client.query({ name: 'q1', text: 'SELECT $1::int AS n', values: [n] });
        check(`${tag} q1 after rollback`, res.rows, [{ n }]);
      }
      stats[w] = r + 1;
    }
  } catch (e) {
    broken = e;
    throw new Error(`worker ${w} at ${step}: ${e.code ? e.code + ' ' : ''}${e.message}`);
  } finally {
    client.release(broken);
  }
}

async function main() {
  const [host, port, user, password, database] = process.argv.slice(2);
  if (!database) {
    console.error('usage: node node_pg_test.js HOST PORT USER PASSWORD DBNAME');
    process.exit(2);
  }
  const pool = new pg.Pool({
    host, port: Number(port), user, password, database,
    max: WORKERS + 4,
    connectionTimeoutMillis: 30000,
    application_name: 'node_pg',
  });
  let poolError;
  pool.on('error', (e) => { poolError = e; });
  const stats = new Array(WORKERS).fill(0);
  const results = await Promise.allSettled(
    Array.from({ length: WORKERS }, (_, w) => worker(pool, w, stats)),
  );
  await pool.end();
  const failures = results.filter((r) => r.status === 'rejected').map((r) => r.reason.message);
  const version = require('pg/package.json').version;
  if (failures.length || poolError) {
    console.error(`FAIL node-pg ${version}: ${failures.length} of ${WORKERS} workers failed`);
    for (const f of failures.slice(0, 5)) console.error(f);
    if (poolError) console.error(`pool error: ${poolError.message}`);
    process.exit(1);
  }
  const total = stats.reduce((a, b) => a + b, 0);
  if (total !== WORKERS * ROUNDS) {
    console.error(`FAIL node-pg: ${total} rounds done, want ${WORKERS * ROUNDS}`);
    process.exit(1);
  }
  console.log(`OK node-pg ${version}: ${WORKERS} connections x ${ROUNDS} rounds`);
}

main().catch((e) => {
  console.error(`FAIL node-pg: ${e.stack || e}`);
  process.exit(1);
});
