// The graphile-worker peer of `unhidra-bench jobs`: one graphile-worker node (a runner with a
// no-op task) on the PostgreSQL database a URL names, driven through lines on stdin and
// answering on stdout, in the same line protocol as the bench's own Unhidra node
// (crates/bench/src/jobs_node.rs). Usage: node node.js URL CONCURRENCY [perftest|defaults]
//
// stdin:  prefill N BATCH | go | quiet | latency SAMPLES GAP_MS | stop
// stdout: ready | prefilled N SECONDS | running T_US | progress N T_US | started SEQ LATENCY_US
//         | latency-done | stopped | error MESSAGE
//
// A latency job that the bench enqueued itself (with two or more nodes) carries `t`, the wall
// clock in µs just before its add_job; any node may start it.
//
// `perftest` (the default) runs with the configuration of graphile-worker's own perfTest
// (perfTest/graphile.config.js): a local queue of 500 jobs with a 10 ms refetch delay, and job
// completions batched. `defaults` leaves both off, as graphile-worker does unless told: each
// worker fetches one job at a time and completes it alone.
"use strict";

const readline = require("node:readline");
const { Pool } = require("pg");
const { Logger, makeWorkerUtils, run, runMigrations } = require("graphile-worker");

const [url, concurrencyArg, config = "perftest"] = process.argv.slice(2);
const concurrency = Number.parseInt(concurrencyArg, 10);
if (!url || !Number.isInteger(concurrency) || concurrency < 1 || !["perftest", "defaults"].includes(config)) {
  process.stderr.write("usage: node node.js URL CONCURRENCY [perftest|defaults]\n");
  process.exit(2);
}

const say = (line) => process.stdout.write(`${line}\n`);
const fail = (error) => {
  say(`error ${String(error && error.stack ? error.stack : error).replace(/\n/g, " | ")}`);
  process.exit(1);
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// Microseconds since the Unix epoch, as the bench reads its own clock.
const wallMicros = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

// Warnings and errors go to stderr; stdout carries the protocol only.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    process.stderr.write(`graphile-worker ${level}: ${message}\n`);
  }
});

const batching =
  config === "perftest"
    ? {
        localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      }
    : {};
const preset = {
  worker: {
    concurrentJobs: concurrency,
    maxPoolSize: concurrency + 1,
    ...batching,
  },
};

const pgPool = new Pool({ connectionString: url, max: concurrency + 1 });
const poolError = (error) => process.stderr.write(`pg pool: ${error}\n`);
pgPool.on("error", poolError);
pgPool.on("connect", (client) => client.on("error", poolError));

let ran = 0;
// SEQ → process.hrtime.bigint() just before its add_job; and what waits for its start.
const enqueuedAt = new Map();
const waiting = new Map();

const taskList = {
  noop: async () => {
    ran += 1;
  },
  latency: async (payload) => {
    const now = process.hrtime.bigint();
    const seq = payload.seq;
    const at = enqueuedAt.get(seq);
    if (at !== undefined) {
      say(`started ${seq} ${Number((now - at) / 1000n)}`);
      enqueuedAt.delete(seq);
    } else if (typeof payload.t === "number") {
      // Enqueued by the bench, stamped with the wall clock.
      say(`started ${seq} ${Math.max(0, wallMicros() - payload.t)}`);
    }
    const resolve = waiting.get(seq);
    if (resolve) {
      waiting.delete(seq);
      resolve();
    }
  },
};

let runner = null;
let reporter = null;

async function prefill(count, batch) {
  const utils = await makeWorkerUtils({ pgPool, preset, logger });
  const began = process.hrtime.bigint();
  try {
    for (let from = 0; from < count; from += batch) {
      const specs = [];
      for (let i = from; i < Math.min(count, from + batch); i += 1) {
        specs.push({ identifier: "noop", payload: { id: i } });
      }
      await utils.addJobs(specs);
    }
  } finally {
    await utils.release();
  }
  const seconds = Number(process.hrtime.bigint() - began) / 1e9;
  say(`prefilled ${count} ${seconds}`);
}

async function go() {
  runner = await run({ pgPool, taskList, preset, logger, noHandleSignals: true });
  say(`running ${wallMicros()}`);
  let reported = -1;
  reporter = setInterval(() => {
    if (ran !== reported) {
      reported = ran;
      say(`progress ${ran} ${wallMicros()}`);
    }
  }, 2);
}

// One job at a time, as graphile-worker's perfTest/latencyTest.js: add_job on a client of
// its own, wait until the task starts, then wait `gap` ms before the next.
async function latency(samples, gap) {
  const client = await pgPool.connect();
  try {
    for (let seq = 0; seq < samples; seq += 1) {
      let timer;
      const started = new Promise((resolve, reject) => {
        waiting.set(seq, resolve);
        timer = setTimeout(() => reject(new Error(`job ${seq} did not start within 10 s`)), 10000);
      });
      enqueuedAt.set(seq, process.hrtime.bigint());
      await client.query(
        "select graphile_worker.add_job('latency', json_build_object('seq', $1::int))",
        [seq],
      );
      try {
        await started;
      } finally {
        clearTimeout(timer);
      }
      await sleep(gap);
    }
  } finally {
    client.release();
  }
  say("latency-done");
}

async function stop() {
  if (reporter) clearInterval(reporter);
  if (runner) await runner.stop();
  await pgPool.end();
  say("stopped");
  process.exit(0);
}

async function main() {
  await runMigrations({ pgPool, preset, logger });
  say("ready");
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, ...args] = line.trim().split(/\s+/);
    const n = args.map((a) => Number.parseInt(a, 10));
    switch (command) {
      case "prefill":
        await prefill(n[0], n[1]);
        break;
      case "go":
        await go();
        break;
      case "quiet":
        if (reporter) clearInterval(reporter);
        reporter = null;
        break;
      case "latency":
        await latency(n[0], n[1]);
        break;
      case "stop":
        await stop();
        return;
      default:
        throw new Error(`unknown command ${JSON.stringify(line)}`);
    }
  }
  // stdin closed: the bench is gone.
  await stop();
}

main().catch(fail);
