#!/usr/bin/env node
// A headrace producer in Node.js: wire protocol v1 (docs/protocol.md) with a plain Redis
// client. It submits requests through the same Redis Function the Python SDK uses
// (FCALL headrace_submit, library client/submit.lua; or a plain XADD with --plain, which
// needs an operator's explicit grant, docs/security.md), then reads its reply stream with
// XREAD BLOCK, decodes the msgpack results, prints one JSON line per sample, and deletes
// the entries it consumed. The --count samples go out in multi-sample entries of --chunk
// samples (docs/protocol.md, "Multi-sample entries"; --chunk 1: one request per sample).
// A partitioned model (workers with partitions = P > 1, docs/protocol.md "Partitions") gets
// each entry on partition crc32(id) % P, with the reply stream of that partition; P is read
// from the live workers' registry records (--partitions N sets it). One Redis (not Cluster):
// the reply streams of all partitions are read with one XREAD.
//
//   npm ci && node producer.js --url redis://127.0.0.1:6379/0 --model affine --count 3
//   node producer.js --model minilm --text "A sentence to embed."
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const zlib = require('node:zlib');
const path = require('node:path');
const { createClient, RESP_TYPES } = require('redis');
const { encode, decode } = require('@msgpack/msgpack');

const PROTOCOL_VERSION = '1';
const GROUP = 'workers';
const LIBRARY = path.resolve(__dirname, '..', '..', 'client', 'submit.lua');
const SUBMIT_FUNCTION = 'headrace_submit';
const MAX_PARTITIONS = 1024; // as validate_partitions in client/keys.py
const ALIVE_MS = 30000; // a worker is live while its registry seen_ms is at most this old
// Replies as Buffers: result bodies are binary msgpack.
const BINARY = { typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } };

const TYPED = {
  bool: Uint8Array, int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array,
  int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
  float32: Float32Array, float64: Float64Array,
};

function parseArgs(argv) {
  const opts = {
    url: process.env.HEADRACE_REDIS_URL || 'redis://127.0.0.1:6379/0',
    namespace: process.env.HEADRACE_NAMESPACE || 'headrace',
    model: 'affine', count: 1, text: null, input: 'x', dtype: 'float32', values: '1,2,3,4',
    plain: false, scalar: false, maxBacklog: 100000, timeoutMs: 30000, deadlineMs: 0, wait: true, chunk: 32, partitions: 0,
  };
  for (let i = 2; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => { if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`); return argv[++i]; };
    switch (arg) {
      case '--url': opts.url = next(); break;
      case '--namespace': opts.namespace = next(); break;
      case '--model': opts.model = next(); break;
      case '--count': opts.count = parseInt(next(), 10); break;
      case '--chunk': opts.chunk = parseInt(next(), 10); break;
      case '--partitions': opts.partitions = parseInt(next(), 10); break;
      case '--text': opts.text = next(); break;
      case '--input': opts.input = next(); break;
      case '--dtype': opts.dtype = next(); break;
      case '--values': opts.values = next(); break;
      case '--plain': opts.plain = true; break;
      case '--scalar': opts.scalar = true; break;
      case '--max-backlog': opts.maxBacklog = parseInt(next(), 10); break;
      case '--timeout-ms': opts.timeoutMs = parseInt(next(), 10); break;
      case '--deadline-ms': opts.deadlineMs = parseInt(next(), 10); break;
      case '--no-wait': opts.wait = false; break;
      case '-h': case '--help':
        console.log('usage: node producer.js [--url URL] [--namespace NS] [--model M] [--count N] [--chunk N] ' +
          '[--partitions N] [--text T | --input NAME --dtype D --values 1,2,3,4 [--scalar]] [--plain] [--max-backlog N] ' +
          '[--deadline-ms MS] [--timeout-ms MS] [--no-wait]');
        process.exit(0);
        break;
      default: throw new Error(`unknown argument ${arg}`);
    }
  }
  if (!(opts.count >= 1)) throw new Error('--count must be >= 1');
  if (!(opts.chunk >= 1)) throw new Error('--chunk must be >= 1');
  if (!(opts.partitions >= 0 && opts.partitions <= MAX_PARTITIONS)) {
    throw new Error(`--partitions must be between 1 and ${MAX_PARTITIONS} (0 or absent: the workers' value)`);
  }
  if (!TYPED[opts.dtype] && opts.dtype !== 'string') {
    throw new Error(`--dtype must be one of ${Object.keys(TYPED).join(', ')}, string`);
  }
  return opts;
}

// A wire tensor: {dtype, shape, data}, data = raw little-endian C-order bytes; a string
// tensor's data is an array of strings instead.
function encodeTensor(dtype, shape, values) {
  if (dtype === 'string') return { dtype, shape, data: values.map(String) };
  if (os.endianness() !== 'LE') throw new Error('this example assumes a little-endian host');
  const Typed = TYPED[dtype];
  const big = Typed === BigInt64Array || Typed === BigUint64Array;
  const arr = Typed.from(values, (v) => (big ? BigInt(v) : Number(v)));
  return { dtype, shape, data: new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength) };
}

function decodeTensor(t) {
  if (t.dtype === 'string') return { dtype: t.dtype, shape: t.shape, data: t.data };
  const Typed = TYPED[t.dtype];
  if (!Typed) return { dtype: t.dtype, shape: t.shape, data: null };
  // Copy into a fresh (aligned) buffer: msgpack bin data may start at any offset.
  const bytes = Uint8Array.from(t.data);
  const arr = new Typed(bytes.buffer, 0, bytes.byteLength / Typed.BYTES_PER_ELEMENT);
  const data = Array.from(arr, (v) => (typeof v === 'bigint' ? Number(v) : v));
  return { dtype: t.dtype, shape: t.shape, data: t.dtype === 'bool' ? data.map(Boolean) : data };
}

function requestFields({ id, replyTo, model, deadlineMs, body, samples }) {
  const fields = [
    'v', PROTOCOL_VERSION, 'id', id, 'reply_to', replyTo, 'model', model,
    'deadline_ms', String(deadlineMs ? Date.now() + deadlineMs : 0), 'ts_ms', String(Date.now()),
    'body', Buffer.from(encode(body)),
  ];
  // n: the sample count of a multi-sample entry (the submit function counts backlog with it).
  if (samples > 1) fields.push('n', String(samples));
  return fields;
}

// The body of samples first..first+size-1: one sample as before, several as one
// multi-sample entry ({texts} or {samples, inputs} with a leading sample dimension).
function requestBody(opts, base, first, size) {
  // sample k sends the values plus k (numbers), or the same strings
  const shift = (v, k) => (opts.dtype === 'string' ? v : v + k);
  // --scalar: each sample is the first value alone (shape []), e.g. one word per request
  const row = opts.scalar ? base.slice(0, 1) : base;
  const dims = opts.scalar ? [] : [row.length];
  if (size === 1) {
    return opts.text !== null ? { text: opts.text }
      : { inputs: { [opts.input]: encodeTensor(opts.dtype, dims, row.map((v) => shift(v, first))) } };
  }
  if (opts.text !== null) return { texts: Array(size).fill(opts.text) };
  const values = [];
  for (let k = first; k < first + size; k++) values.push(...row.map((v) => shift(v, k)));
  return { samples: size, inputs: { [opts.input]: encodeTensor(opts.dtype, [size, ...dims], values) } };
}

// The key prefix of partition p: the model itself is the Redis Cluster hash tag, a
// partition's tag is {<model>~<p>}.
function keyPrefix(opts, p, partitions) {
  return partitions > 1 ? `${opts.namespace}:{${opts.model}~${p}}` : `${opts.namespace}:{${opts.model}}`;
}

// The partition of a request id: CRC-32 (zlib's) of its UTF-8 bytes, modulo P.
function partitionOf(id, partitions) {
  return partitions > 1 ? zlib.crc32(Buffer.from(id, 'utf8')) % partitions : 0;
}

// The partition count the model's live workers read (registry record, docs/protocol.md);
// 1 when none reports one. Workers reporting different counts are a configuration error.
async function workerPartitions(client, opts) {
  const raw = await client.sendCommand(['HGET', `${opts.namespace}:models`, opts.model]);
  if (!raw) return 1;
  const [secs, micros] = (await client.sendCommand(['TIME'])).map(Number);
  const now = secs * 1000 + Math.floor(micros / 1000);
  const counts = new Set();
  for (const w of Object.values(JSON.parse(String(raw)).workers || {})) {
    if (now - Number(w.seen_ms) <= ALIVE_MS) counts.add(Number(w.partitions || 1));
  }
  if (counts.size > 1) {
    throw new Error(`live workers of ${opts.model} read different partition counts (${[...counts].join(', ')}); ` +
      'pass --partitions N');
  }
  return counts.size ? [...counts][0] : 1;
}

// Load the function library; normally a worker or an operator (`headrace functions load`)
// has done so already, and a producer under the documented ACL may not (NOPERM).
async function loadLibrary(client) {
  try {
    await client.sendCommand(['FUNCTION', 'LOAD', fs.readFileSync(LIBRARY, 'utf8')]);
  } catch (e) {
    if (!String(e.message).includes('already exists')) throw e;
  }
}

// A refusal of the function is an error whose first word is the wire code: nothing was added.
function refusal(e) {
  const code = String(e.message).split(' ', 1)[0];
  if (/^[a-z_]+$/.test(code)) e.code = code;
  return e;
}

// FCALL the submit function (validation + atomic backpressure check + append to the model's
// inbox, which the workers relay into the request stream); load the library once when Redis
// does not know the function yet. Returns "inbox", or the entry id in direct mode.
async function submit(client, prefix, fields, opts) {
  const stream = `${prefix}:requests`;
  if (opts.plain) return String(await client.sendCommand(['XADD', stream, '*', ...fields]));
  const args = ['FCALL', SUBMIT_FUNCTION, '3', stream, `${prefix}:limits`, `${prefix}:inbox`, GROUP,
    String(opts.maxBacklog), ...fields];
  let reply;
  try {
    reply = await client.sendCommand(args);
  } catch (e) {
    if (!String(e.message).includes('Function not found')) throw refusal(e);
    await loadLibrary(client);
    try {
      reply = await client.sendCommand(args);
    } catch (again) {
      throw refusal(again);
    }
  }
  if (Number(reply[0]) !== 1) {
    const err = new Error(`${stream} has a backlog of ${reply[1]} (max ${opts.maxBacklog})`);
    err.code = 'queue_full';
    throw err;
  }
  return String(reply[1]);
}

function decodeResult(kv) {
  const f = {};
  for (let i = 0; i < kv.length; i += 2) f[kv[i].toString()] = kv[i + 1];
  const body = f.body && f.body.length ? decode(f.body) : {};
  const outputs = {};
  for (const [name, t] of Object.entries(body.outputs || {})) outputs[name] = decodeTensor(t);
  const res = {
    id: String(f.id), status: String(f.status), code: String(f.code || ''), message: String(f.message || ''),
    model: body.model || '', version: body.version || '', outputs, timings: body.timings || {},
  };
  // A multi-sample entry's result: one slot per sample, each with its own status; the ok
  // slots' outputs are either their own or row i of the entry's "stacked" outputs.
  if (Array.isArray(body.samples)) {
    const stacked = Object.entries(body.stacked || {}).map(([name, t]) => [name, decodeTensor(t)]);
    res.samples = body.samples.map((slot, i) => {
      const outs = {};
      for (const [name, t] of Object.entries(slot.outputs || {})) outs[name] = decodeTensor(t);
      if (slot.status === 'ok' && !slot.outputs) {
        for (const [name, t] of stacked) {
          const shape = t.shape.slice(1);
          const row = shape.reduce((a, b) => a * b, 1);
          outs[name] = { dtype: t.dtype, shape, data: t.data && t.data.slice(i * row, (i + 1) * row) };
        }
      }
      return { status: slot.status, code: slot.code || '', message: slot.message || '', outputs: outs };
    });
  }
  return res;
}

// One line per sample: a multi-sample result becomes one line per slot (with its index),
// an error of the whole entry one line per sample it carried.
function sampleLines(res, size) {
  if (!res.samples) {
    if (size === 1) return [res];
    return Array.from({ length: size }, (_, i) => ({ ...res, sample: i }));
  }
  const { samples, ...rest } = res;
  return samples.map((slot, i) => ({ ...rest, ...slot, sample: i }));
}

// Read the reply streams (one per partition) from 0-0 (a result may land before the first
// XREAD) until every id is answered, deleting consumed entries: this producer is their only
// reader.
async function collect(client, replyTos, ids, timeoutMs) {
  const pending = new Set(ids);
  const results = new Map();
  const giveUp = Date.now() + timeoutMs;
  const cursors = new Map(replyTos.map((r) => [r, '0-0']));
  while (pending.size && Date.now() < giveUp) {
    const block = String(Math.max(1, Math.min(1000, giveUp - Date.now())));
    const reply = await client.sendCommand(['XREAD', 'COUNT', '100', 'BLOCK', block, 'STREAMS',
      ...cursors.keys(), ...cursors.values()], BINARY);
    if (!reply) continue;
    for (const [rawStream, entries] of reply) {
      const stream = rawStream.toString();
      const consumed = [];
      for (const [rawId, kv] of entries) {
        consumed.push(rawId.toString());
        const res = decodeResult(kv);
        if (pending.delete(res.id)) results.set(res.id, res);
      }
      if (consumed.length) {
        cursors.set(stream, consumed[consumed.length - 1]);
        await client.sendCommand(['XDEL', stream, ...consumed]);
      }
    }
  }
  return { results, missing: [...pending] };
}

async function main() {
  const opts = parseArgs(process.argv);
  const client = createClient({ url: opts.url, RESP: 2 });
  client.on('error', (e) => console.error(`redis: ${e.message}`));
  await client.connect();
  try {
    const partitions = opts.partitions || await workerPartitions(client, opts);
    const me = `node-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
    const prefixes = Array.from({ length: partitions }, (_, p) => keyPrefix(opts, p, partitions));
    const replyTos = prefixes.map((prefix) => `${prefix}:reply:${me}`);
    const base = opts.dtype === 'string' ? opts.values.split(',') : opts.values.split(',').map(Number);
    const ids = [];
    const sizes = new Map();
    for (let k = 0; k < opts.count; k += opts.chunk) {
      const id = `node-${crypto.randomUUID()}`;
      const size = Math.min(opts.chunk, opts.count - k);
      const p = partitionOf(id, partitions);
      const entryId = await submit(client, prefixes[p], requestFields({
        id, replyTo: replyTos[p], model: opts.model, deadlineMs: opts.deadlineMs, body: requestBody(opts, base, k, size),
        samples: size,
      }), opts);
      ids.push(id);
      sizes.set(id, size);
      console.error(`submitted ${id} (${size} sample${size > 1 ? 's' : ''}) as ${entryId}`);
    }
    if (!opts.wait) {
      console.log(JSON.stringify({ reply_to: replyTos.length === 1 ? replyTos[0] : replyTos, ids }));
      return;
    }
    const { results, missing } = await collect(client, replyTos, ids, opts.timeoutMs);
    let failed = 0;
    for (const id of ids) {
      if (!results.has(id)) continue;
      for (const line of sampleLines(results.get(id), sizes.get(id))) {
        if (line.status !== 'ok') failed += 1;
        console.log(JSON.stringify(line));
      }
    }
    // exit codes as `headrace submit`: 2 when a sample was answered with an error
    if (failed) process.exitCode = 2;
    if (missing.length) {
      console.error(`no result within ${opts.timeoutMs} ms for ${missing.length} request(s)`);
      process.exitCode = 3;
    }
  } finally {
    await client.quit();
  }
}

main().catch((e) => {
  console.error(`error: ${e.code ? `[${e.code}] ` : ''}${e.message}`);
  process.exit(e.code === 'queue_full' ? 4 : (e.code ? 5 : 1));
});
