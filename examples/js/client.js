// A scopestream client in JavaScript (npm package `zeromq`, v6), written from docs/events.md alone.
//
//   node client.js EVENTS_ENDPOINT CONTROL_ENDPOINT [N_TRACK_EVENTS]
//
// Subscribes to `track` (and `welcome`, last, to know the subscription is live), decodes each
// message's header, body and raw arrays (dtype and shape from header.buffers), checks seq for gaps,
// then sends one `act` command (a `mark` naming the frame it reacted to) and prints one JSON line:
// {"tracks": n, "gaps": g, "rows": r, "x_mean": ..., "act": <reply>}.
"use strict";
const zmq = require("zeromq");

const DTYPES = {
  "<f8": Float64Array, "<f4": Float32Array, "<i8": BigInt64Array, "<i4": Int32Array, "<i2": Int16Array,
  "|i1": Int8Array, "<u8": BigUint64Array, "<u4": Uint32Array, "<u2": Uint16Array, "|u1": Uint8Array, "|b1": Uint8Array,
};

function decodeArray(spec, buf) {
  const Type = DTYPES[spec.dtype];
  if (!Type) throw new Error(`unsupported dtype ${spec.dtype} for ${spec.name}`);
  const n = spec.shape.reduce((a, b) => a * b, 1);
  if (buf.length !== n * Type.BYTES_PER_ELEMENT) throw new Error(`buffer ${spec.name}: ${buf.length} bytes for ${n} items`);
  // Copy into an aligned buffer: a received frame may start at any byte offset.
  const aligned = new Uint8Array(buf).buffer;
  return new Type(aligned, 0, n);
}

function decode(frames) {
  const [topicRaw, headerRaw, bodyRaw, ...bufs] = frames;
  const topic = topicRaw.toString("ascii");
  const header = JSON.parse(headerRaw.toString("utf8"));
  if (!String(header.schema_version).startsWith("2.")) throw new Error(`schema ${header.schema_version}`);
  if (header.topic !== topic) throw new Error(`header topic ${header.topic} != ${topic}`);
  const body = JSON.parse(bodyRaw.toString("utf8"));
  if (bufs.length !== header.buffers.length) throw new Error("buffer count differs from header.buffers");
  const arrays = {};
  header.buffers.forEach((spec, i) => { arrays[spec.name] = decodeArray(spec, bufs[i]); });
  return { topic, header, body, arrays };
}

async function main() {
  const [events, control, nArg] = process.argv.slice(2);
  if (!events || !control) {
    console.error("usage: node client.js EVENTS_ENDPOINT CONTROL_ENDPOINT [N_TRACK_EVENTS]");
    process.exit(2);
  }
  const want = Number(nArg || 20);
  const sub = new zmq.Subscriber();
  sub.connect(events);
  sub.subscribe("track");
  sub.subscribe("welcome"); // last: its arrival means `track` is live too
  sub.receiveTimeout = 10000;
  const lastSeq = {};
  let tracks = 0, gaps = 0, rows = 0, xSum = 0, last = null;
  while (tracks < want) {
    const msg = decode(await sub.receive());
    if (msg.topic !== "track") continue; // prefix matching: compare exactly
    const key = msg.header.run_id;
    if (key in lastSeq && msg.header.seq !== lastSeq[key] + 1) gaps += msg.header.seq - lastSeq[key] - 1;
    lastSeq[key] = msg.header.seq;
    const x = msg.arrays.x || new Float64Array(0);
    if (x.length !== msg.body.count) throw new Error(`count ${msg.body.count} but ${x.length} rows`);
    rows += x.length;
    for (const v of x) xSum += v;
    tracks += 1;
    last = msg;
  }
  sub.close();

  const req = new zmq.Request();
  req.receiveTimeout = 5000;
  req.connect(control);
  await req.send(JSON.stringify({
    command: "act", action: "mark", text: `js client saw frame ${last.header.frame_seq}`, client: "js",
    trigger: { topic: "track", seq: last.header.seq, frame_seq: last.header.frame_seq, t_acquired: last.header.t_acquired },
  }));
  const [replyRaw] = await req.receive();
  req.close();
  const reply = JSON.parse(replyRaw.toString("utf8"));
  console.log(JSON.stringify({ tracks, gaps, rows, x_mean: rows ? xSum / rows : null, frame_seq: last.header.frame_seq, act: reply }));
  process.exit(reply.ok ? 0 : 1);
}

main().catch((err) => { console.error(`js client: ${err.message}`); process.exit(1); });
