#!/usr/bin/env node
// Soak: drives a real `dsinfer serve` for a set time with a hostile mix of traffic, checks every
// answer, and at the end checks that the server is healthy, idle, with every KV block free and
// its resident memory back near its level after warm-up (docs/reliability.md).
//
//   node tests/soak/soak.js --dsinfer build/dsinfer --model DIR [--duration 120] [--clients 16]
//        [--max-num-seqs 8] [--max-model-len 256] [--seed 1] [--json FILE] [--max-rss-growth 5|off]
//
// The traffic, drawn from a seeded generator:
//  - request templates (completions and chat) over short prompts and prompts measured with
//    /tokenize up to --max-model-len; greedy ones and seeded ones (any 64-bit seed, negative
//    and extreme ones included) have a reference answer, taken from a run of each alone before
//    the load: under load every such request, streamed or not, must give exactly that text;
//  - random sampling parameters (temperature, top_p, top_k, min_p, penalties, logit_bias),
//    n = 1..3, stop strings, max_tokens, unseeded: checked for shape only;
//  - ~10% of requests are abandoned by the client at a random point (before or while
//    streaming), ~5% are malformed or hostile (bad JSON, wrong types, out-of-range values,
//    prompt + max_tokens over --max-model-len): they must get a 4xx JSON error;
//  - bursts: every 10 s, for 3 s, twice the clients, well above --max-num-seqs.
// Every request must end with an answer or the client's own abort within 120 s: a request that
// hangs is a lost request. Exit 0 when nothing failed, 1 otherwise (2 for usage errors).
'use strict';

const { spawn } = require('child_process');
const fs = require('fs');
const net = require('net');

const KNOWN = {
    dsinfer: 'value',
    model: 'value',
    duration: 'value',
    clients: 'value',
    'max-num-seqs': 'value',
    'max-model-len': 'value',
    seed: 'value',
    json: 'value',
    'max-rss-growth': 'value',
};

function parseArgs(argv) {
    const o = {};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (!a.startsWith('--') || !(a.slice(2) in KNOWN) || i + 1 >= argv.length) {
            console.error(`usage: soak.js --dsinfer BIN --model DIR [--duration S] [--clients N] ` +
                `[--max-num-seqs N] [--max-model-len N] [--seed N] [--json FILE] [--max-rss-growth PCT|off] ` +
                `(bad: ${a})`);
            process.exit(2);
        }
        o[a.slice(2)] = argv[++i];
    }
    if (!o.dsinfer || !o.model) {
        console.error('soak.js: --dsinfer and --model are required');
        process.exit(2);
    }
    return o;
}

const opts = parseArgs(process.argv.slice(2));
const DURATION = Number(opts.duration || 120) * 1000;
const CLIENTS = Number(opts.clients || 16);
const MAX_SEQS = Number(opts['max-num-seqs'] || 8);
// percent; 'off' for sanitizer builds, whose allocator keeps freed memory in quarantine (there
// LeakSanitizer at the server's exit is the leak check)
const RSS_GROWTH = opts['max-rss-growth'] === 'off' ? null : Number(opts['max-rss-growth'] || 5);
if (RSS_GROWTH !== null && !(RSS_GROWTH >= 0)) {
    console.error(`soak.js: --max-rss-growth must be a percentage or 'off', got '${opts['max-rss-growth']}'`);
    process.exit(2);
}
const MAX_LEN = Number(opts['max-model-len'] || 256);
const REQUEST_TIMEOUT = 120000;

// xorshift64*: the whole run is a function of --seed
let rs = BigInt(opts.seed || 1) | 1n;
function rnd() {
    rs ^= rs >> 12n;
    rs ^= (rs << 25n) & 0xffffffffffffffffn;
    rs ^= rs >> 27n;
    return Number(((rs * 0x2545f4914f6cdd1dn) & 0xffffffffffffffffn) >> 11n) / 2 ** 53;
}
const pick = (a) => a[Math.floor(rnd() * a.length)];
const irand = (lo, hi) => lo + Math.floor(rnd() * (hi - lo + 1));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- the server ----

function startServer() {
    return new Promise((resolve, reject) => {
        const args = ['serve', opts.model, '--port', '0', '--disable-log-requests', '--max-num-seqs',
            String(MAX_SEQS), '--max-model-len', String(MAX_LEN), '--log-stats-interval', '30'];
        const proc = spawn(opts.dsinfer, args, { stdio: ['ignore', 'ignore', 'pipe'] });
        proc.log = '';
        const timer = setTimeout(() => reject(new Error('no port after 120 s:\n' + proc.log)), 120000);
        proc.stderr.on('data', (d) => {
            proc.log = (proc.log + d.toString()).slice(-20000);
            const m = proc.log.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
            if (m && !proc.port) {
                proc.port = Number(m[1]);
                clearTimeout(timer);
                resolve(proc);
            }
        });
        proc.on('exit', (code, sig) => {
            proc.exited = `exit ${code} signal ${sig}`;
            reject(new Error(`dsinfer serve ended (${proc.exited}):\n${proc.log}`));
        });
    });
}

function rssBytes(pid) {
    const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
    return m ? Number(m[1]) * 1024 : 0;
}

async function metrics(base) {
    const t = await (await fetch(`${base}/metrics`)).text();
    const get = (name) => {
        const m = t.match(new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.e+-]+)$`, 'm'));
        return m ? Number(m[1]) : NaN;
    };
    return {
        running: get('vllm:num_requests_running'),
        waiting: get('vllm:num_requests_waiting'),
        blocksTotal: get('dsinfer:kv_cache_blocks_total'),
        blocksFree: get('dsinfer:kv_cache_blocks_free'),
    };
}

// ---- the templates ----

const TEXTS = [
    'The quick brown fox jumps over the lazy dog.',
    'Write a haiku about the sea.',
    '1, 2, 3, 4, 5,',
    'def fib(n):\n    ',
    '深度求索是一家人工智能公司。',
    'Translate to French: good morning, how are you?',
    '   whitespace\t\tand\nnewlines  ',
    'Émoji 🎉 and accents: naïve café',
];
const STOPS = ['\n', '.', ' the', 'a', '!!', ','];
// Seeds at the edges of what a request may carry (JSON integers, written as text: JS numbers
// cannot hold them).
const SEEDS = ['0', '-1', '1', '42', '9223372036854775807', '-9223372036854775808', '123456789012345678',
    '-4611686018427387904'];

async function tokenCount(base, text) {
    const r = await fetch(`${base}/tokenize`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: text }),
    });
    const j = await r.json();
    return j.count;
}

// A prompt text of about `tokens` tokens (measured), built from the texts above.
async function longText(base, tokens) {
    let t = '';
    while ((await tokenCount(base, t)) < tokens) t += pick(TEXTS) + ' ';
    while (t.length > 1 && (await tokenCount(base, t)) > tokens) t = t.slice(0, Math.floor(t.length * 0.97));
    return t;
}

function samplingParams(kind) {
    if (kind === 'greedy') return { temperature: 0 };
    const p = { temperature: pick([0.3, 0.7, 1.0, 1.5]) };
    if (rnd() < 0.5) p.top_p = pick([0.5, 0.9, 1.0]);
    if (rnd() < 0.4) p.top_k = pick([1, 5, 40, -1]);
    if (rnd() < 0.3) p.min_p = pick([0.05, 0.2]);
    if (rnd() < 0.3) p.presence_penalty = pick([-1, 0.5, 2]);
    if (rnd() < 0.3) p.frequency_penalty = pick([-0.5, 1]);
    if (rnd() < 0.3) p.repetition_penalty = pick([1.1, 1.5]);
    if (rnd() < 0.3) p.logit_bias = { [String(irand(0, 128000))]: pick([-100, 5, 100]), '15': -5 };
    return p;
}

// Template: a request body (seed as raw JSON text), its kind (greedy / seeded / random) and,
// for the first two, the reference text per choice (filled before the load).
async function makeTemplates(base, model) {
    const out = [];
    for (let i = 0; i < 48; i++) {
        const chat = rnd() < 0.5;
        const kind = i % 3 === 0 ? 'greedy' : i % 3 === 1 ? 'seeded' : 'random';
        const long = rnd() < 0.2;
        const maxTokens = irand(1, 24);
        const text = long ? await longText(base, MAX_LEN - maxTokens - (chat ? 16 : 2)) : pick(TEXTS);
        const body = { model, max_tokens: maxTokens, ...samplingParams(kind) };
        if (chat) body.messages = [{ role: 'user', content: text }];
        else body.prompt = text;
        if (kind !== 'greedy' && rnd() < 0.6) body.n = irand(1, 3);
        if (rnd() < 0.3) body.stop = [pick(STOPS)];
        out.push({ chat, kind, body, seed: kind === 'seeded' ? pick(SEEDS) : null, ref: null });
    }
    return out;
}

function bodyText(t, stream) {
    const b = { ...t.body, stream };
    if (stream) b.stream_options = { include_usage: true };
    let s = JSON.stringify(b);
    if (t.seed !== null) s = s.slice(0, -1) + `,"seed":${t.seed}}`;
    return s;
}

// ---- one request ----

const stats = { sent: 0, ok: 0, aborted: 0, rejected: 0, failures: 0, lat: [], kinds: {} };
const failures = [];
function fail(msg) {
    stats.failures++;
    if (failures.length < 50) failures.push(msg);
    console.error('FAIL:', msg);
}

// Parses a finished answer into texts per choice, finish reasons and usage, or throws why it
// is malformed.
function parseAnswer(t, stream, status, raw) {
    if (!stream) {
        const j = JSON.parse(raw);
        const texts = j.choices.map((c) => (t.chat ? c.message.content || '' : c.text));
        const fins = j.choices.map((c) => c.finish_reason);
        return { texts, fins, usage: j.usage, indexes: j.choices.map((c) => c.index) };
    }
    const events = raw.split('\n\n').filter((e) => e.trim());
    if (!events.length || events[events.length - 1].trim() !== 'data: [DONE]') throw new Error('no [DONE]');
    const texts = [], fins = [];
    let usage = null;
    for (const e of events.slice(0, -1)) {
        if (!e.startsWith('data: ')) throw new Error(`not a data event: ${e.slice(0, 80)}`);
        const j = JSON.parse(e.slice(6));
        if (j.usage) usage = j.usage;
        for (const c of j.choices) {
            const piece = t.chat ? (c.delta && c.delta.content) || '' : c.text || '';
            texts[c.index] = (texts[c.index] || '') + piece;
            if (c.finish_reason) fins[c.index] = c.finish_reason;
        }
    }
    return { texts, fins, usage, indexes: texts.map((_, i) => i) };
}

async function send(base, t, stream, abortAfter) {
    const url = `${base}/v1/${t.chat ? 'chat/completions' : 'completions'}`;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort('timeout'), abortAfter !== null ? abortAfter : REQUEST_TIMEOUT);
    const t0 = Date.now();
    stats.sent++;
    let status = 0, raw = '';
    try {
        const r = await fetch(url, {
            method: 'POST', headers: { 'content-type': 'application/json' },
            body: bodyText(t, stream), signal: ctl.signal,
        });
        status = r.status;
        raw = await r.text();
    } catch (e) {
        clearTimeout(timer);
        if (abortAfter !== null) return void stats.aborted++;
        return fail(`${t.chat ? 'chat' : 'completion'} lost (no answer in ${REQUEST_TIMEOUT / 1000} s): ${e}`);
    }
    clearTimeout(timer);
    if (abortAfter !== null) stats.aborted++; /* answered before the client gave up: fine too */
    if (status !== 200) return fail(`status ${status} for a valid request: ${raw.slice(0, 200)}`);
    let a;
    try {
        a = parseAnswer(t, stream, status, raw);
    } catch (e) {
        return fail(`malformed ${stream ? 'stream' : 'body'} (${e.message}): ${raw.slice(0, 200)}`);
    }
    const n = t.body.n || 1, mt = t.body.max_tokens;
    if (a.texts.length !== n) return fail(`${a.texts.length} choices, asked for ${n}`);
    for (let i = 0; i < n; i++)
        if (!['stop', 'length'].includes(a.fins[i])) return fail(`choice ${i} finish_reason ${a.fins[i]}`);
    if (!a.usage || a.usage.completion_tokens > n * mt || a.usage.completion_tokens < 0 || a.usage.prompt_tokens < 1)
        return fail(`usage ${JSON.stringify(a.usage)} for n=${n} max_tokens=${mt}`);
    if (t.ref && JSON.stringify(a.texts) !== JSON.stringify(t.ref))
        return fail(`${t.kind} request (seed ${t.seed}) differs under load from its run alone: ` +
            `${JSON.stringify(a.texts).slice(0, 200)} vs ${JSON.stringify(t.ref).slice(0, 200)}`);
    stats.ok++;
    stats.lat.push(Date.now() - t0);
    stats.kinds[t.kind] = (stats.kinds[t.kind] || 0) + 1;
}

// Malformed and hostile requests: each must get a 4xx with an OpenAI error object.
const BAD = [
    ['completions', '{"prompt": "hi", "max_tokens": 5'],
    ['completions', '{"prompt": "hi", "max_tokens": "five"}'],
    ['completions', '{"prompt": "hi", "max_tokens": -3}'],
    ['completions', '{"prompt": "hi", "n": 100000}'],
    ['completions', '{"prompt": "hi", "seed": 1e400}'],
    ['completions', '{"prompt": "hi", "seed": 99999999999999999999999}'],
    ['completions', '{"prompt": "hi", "seed": 18446744073709551615}'],
    ['completions', '{"prompt": "hi", "temperature": "hot"}'],
    ['completions', '{"prompt": "hi", "logit_bias": {"abc": 1}}'],
    ['completions', '{"prompt": "hi", "stop": [1, 2]}'],
    ['completions', '[1, 2, 3]'],
    ['chat/completions', '{"messages": "hello"}'],
    ['chat/completions', '{"messages": [{"role": "wizard", "content": "x"}]}'],
    ['chat/completions', '{"messages": [], "max_tokens": 3}'],
    ['completions', '{"prompt": "' + 'x '.repeat(4000) + '", "max_tokens": 8}'],
    ['completions', '{"prompt": "hi", "max_tokens": 100000000}'],
    ['completions', '{"prompt": {"nested": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}'],
];

async function sendBad(base) {
    const [path, body] = pick(BAD);
    stats.sent++;
    try {
        const r = await fetch(`${base}/v1/${path}`, {
            method: 'POST', headers: { 'content-type': 'application/json' }, body,
            signal: AbortSignal.timeout(REQUEST_TIMEOUT),
        });
        const raw = await r.text();
        let j = null;
        try {
            j = JSON.parse(raw);
        } catch (e) { /* checked below */ }
        if (r.status < 400 || r.status > 499 || !j || !j.error || !j.error.message)
            return fail(`malformed request ${body.slice(0, 60)}: status ${r.status}, ${raw.slice(0, 160)}`);
        stats.rejected++;
    } catch (e) {
        fail(`malformed request ${body.slice(0, 60)} lost: ${e}`);
    }
}

// A client that opens a connection, sends half a request and vanishes.
function sendHalf(port) {
    stats.sent++;
    stats.aborted++;
    return new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1', () => {
            s.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": ');
            setTimeout(() => {
                s.destroy();
                resolve();
            }, irand(0, 200));
        });
        s.on('error', () => resolve());
    });
}

// ---- the run ----

async function client(base, port, templates, until, burst) {
    while (Date.now() < until()) {
        if (burst.idle()) {
            await sleep(50);
            continue;
        }
        const r = rnd();
        if (r < 0.05) await sendBad(base);
        else if (r < 0.07) await sendHalf(port);
        else await send(base, pick(templates), rnd() < 0.5, rnd() < 0.1 ? irand(0, 400) : null);
    }
}

function percentile(a, p) {
    if (!a.length) return 0;
    const s = [...a].sort((x, y) => x - y);
    return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

async function main() {
    const t_start = Date.now();
    const proc = await startServer();
    const base = `http://127.0.0.1:${proc.port}`;
    for (let i = 0; (await fetch(`${base}/health`)).status !== 200; i++) {
        if (i > 1200) throw new Error('/health never answered 200');
        await sleep(100);
    }
    const model = (await (await fetch(`${base}/v1/models`)).json()).data[0].id;
    const templates = await makeTemplates(base, model);
    // references: each greedy / seeded template alone, not streamed
    for (const t of templates) {
        if (t.kind === 'random') continue;
        const r = await fetch(`${base}/v1/${t.chat ? 'chat/completions' : 'completions'}`, {
            method: 'POST', headers: { 'content-type': 'application/json' }, body: bodyText(t, false),
        });
        const raw = await r.text();
        if (r.status !== 200) throw new Error(`reference run: status ${r.status}: ${raw}`);
        t.ref = parseAnswer(t, false, 200, raw).texts;
    }
    console.log(`soak: server pid ${proc.pid}, ${templates.length} templates, ${CLIENTS} clients ` +
        `(bursts of ${2 * CLIENTS}) against --max-num-seqs ${MAX_SEQS}, ${DURATION / 1000} s`);
    // warm-up before the memory baseline: a fifth of the run, at least 10 s (a burst, every
    // KV block and the connection threads touched once)
    const warm = Math.max(10000, DURATION / 5);
    const t0 = Date.now();
    const end = t0 + warm + DURATION;
    let rssWarm = 0;
    const burst = { idle: () => false };
    const extra = { idle: () => (Date.now() - t0) % 10000 >= 3000 }; // bursts: 3 s of every 10
    const jobs = [];
    for (let i = 0; i < CLIENTS; i++) jobs.push(client(base, proc.port, templates, () => end, burst));
    for (let i = 0; i < CLIENTS; i++) jobs.push(client(base, proc.port, templates, () => end, extra));
    const sampler = (async () => {
        await sleep(warm);
        rssWarm = rssBytes(proc.pid);
    })();
    await Promise.all([...jobs, sampler]);
    const elapsed = (Date.now() - t0) / 1000;
    // idle: nothing running or waiting, every block free, within 30 s of the last answer
    let m = null;
    for (let i = 0; i < 300; i++) {
        m = await metrics(base);
        if (m.running === 0 && m.waiting === 0 && m.blocksFree === m.blocksTotal) break;
        await sleep(100);
    }
    const health = (await fetch(`${base}/health`)).status;
    await sleep(500);
    const rssEnd = rssBytes(proc.pid);
    const drift = rssWarm ? (rssEnd - rssWarm) / rssWarm : 0;
    if (health !== 200) fail(`/health ${health} at the end`);
    if (m.running !== 0 || m.waiting !== 0) fail(`not idle at the end: running ${m.running}, waiting ${m.waiting}`);
    if (m.blocksFree !== m.blocksTotal) fail(`KV blocks leaked: ${m.blocksTotal - m.blocksFree} of ${m.blocksTotal} in use`);
    if (RSS_GROWTH !== null && drift > RSS_GROWTH / 100) fail(`RSS grew ${(100 * drift).toFixed(1)}% after warm-up (${rssWarm} -> ${rssEnd} bytes)`);
    if (proc.exited) fail(`the server died: ${proc.exited}`);
    proc.kill('SIGTERM');
    const code = await new Promise((r) => (proc.exited ? r(-1) : proc.on('exit', (c) => r(c))));
    if (code !== 0) fail(`dsinfer serve exited ${code} on SIGTERM`);
    const summary = {
        duration_s: elapsed, requests: stats.sent, answered_ok: stats.ok, by_kind: stats.kinds,
        aborted_by_client: stats.aborted, malformed_rejected: stats.rejected, failures: stats.failures,
        requests_per_s: stats.sent / elapsed, latency_ms_p50: percentile(stats.lat, 50),
        latency_ms_p99: percentile(stats.lat, 99), kv_blocks: m.blocksTotal, leaked_blocks: m.blocksTotal - m.blocksFree,
        rss_after_warmup: rssWarm, rss_end: rssEnd, rss_drift: drift, crashes: proc.exited && code !== 0 ? 1 : 0,
        wall_s: (Date.now() - t_start) / 1000,
    };
    console.log(JSON.stringify(summary, null, 1));
    if (opts.json) fs.writeFileSync(opts.json, JSON.stringify({ summary, failures }, null, 1));
    console.log(stats.failures ? `soak: FAILED (${stats.failures})` : 'soak: passed');
    process.exit(stats.failures ? 1 : 0);
}

main().catch((e) => {
    console.error('soak: error:', e.stack || e.message);
    process.exit(1);
});
