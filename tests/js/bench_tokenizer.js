#!/usr/bin/env node
// Tokenizer encode speed: @huggingface/tokenizers (JS) vs `dsinfer tokenize --bench`, single
// thread, on the same few MB of deterministic mixed text. A benchmark, not a test.
//
//   node tests/js/bench_tokenizer.js --dsinfer build/dsinfer [--model DIR] [--mb 2]
//        [--seconds 2] [--file FILE] [--keep FILE]
//
// The text (--mb MB, default 2, of prose, code, CJK, other scripts, emoji, numbers, whitespace
// and special tokens; the same bytes for the same --mb) is written to a temporary file (or --keep
// FILE), or --file FILE is used as is. JS: the whole text is encoded once to warm up, then again
// until --seconds (default 2) have passed; MB/s = bytes x encodes / time (MB = 10^6 bytes). Both
// sides keep their BPE caches warm across iterations (HF JS: an LRU of 10,000 words).
// HF JS manages about 0.5 MB/s on this text, so a run takes ~15 s per 2 MB.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const c = require('./common');

const opts = c.parseArgs(process.argv.slice(2), {
    dsinfer: 'value',
    model: 'value',
    mb: 'value',
    seconds: 'value',
    file: 'value',
    keep: 'value',
});
if (opts.help) {
    console.log(fs.readFileSync(__filename, 'utf8').split('\n').slice(1, 13).join('\n'));
    process.exit(0);
}
const modelDir = opts.model || c.defaultModelDir();
const seconds = Number(opts.seconds || 2);
const { tokenizerJson, tokenizerConfig } = c.loadTokenizerDir(modelDir);
const { Tokenizer } = require('@huggingface/tokenizers');
const g = require('./gen_corpus');

function buildText(mb) {
    const rng = g.makeRng(99);
    const target = Math.round(mb * 1e6);
    const parts = [];
    let n = 0;
    const pools = [
        [g.PROSE, 8],
        [g.CODE, 5],
        [g.CJK, 3],
        [g.SCRIPTS, 2],
        [g.EMOJI, 1],
        [g.SPECIAL, 0.2],
    ];
    const total = pools.reduce((a, p) => a + p[1], 0);
    while (n < target) {
        let x = rng.next() * total;
        let frag = '';
        for (const [list, w] of pools) {
            if (x < w) {
                frag = rng.pick(list);
                break;
            }
            x -= w;
        }
        if (rng.chance(0.1)) frag += ' ' + String(rng.int(0, 10 ** rng.int(1, 9)));
        frag += rng.pick([' ', ' ', '\n', '\n\n', '  ', '\t']);
        parts.push(frag);
        n += Buffer.byteLength(frag);
    }
    return Buffer.from(parts.join(''), 'utf8').subarray(0, target);
}

let bytes;
let file;
let tmpDir = null;
if (opts.file) {
    file = opts.file;
    bytes = fs.readFileSync(file);
} else {
    bytes = buildText(Number(opts.mb || 2));
    if (opts.keep) file = opts.keep;
    else {
        tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsinfer-bench-'));
        file = path.join(tmpDir, 'bench.txt');
    }
    fs.writeFileSync(file, bytes);
}
// Cutting at a byte count may leave a partial character at the end: both sides see U+FFFD there.
const text = new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes);
console.log(`text: ${bytes.length} bytes (${(bytes.length / 1e6).toFixed(2)} MB) in ${file}`);

// ---- JS ----
function jsVersion() {
    try {
        const p = path.join(__dirname, 'node_modules', '@huggingface', 'tokenizers', 'package.json');
        return JSON.parse(fs.readFileSync(p, 'utf8')).version;
    } catch {
        return '?';
    }
}
const tok = new Tokenizer(tokenizerJson, tokenizerConfig);
let t = process.hrtime.bigint();
const nTok = tok.encode(text, { add_special_tokens: false }).ids.length;
const coldS = Number(process.hrtime.bigint() - t) / 1e9;
let iters = 0;
t = process.hrtime.bigint();
let el = 0;
while (el < seconds) {
    tok.encode(text, { add_special_tokens: false });
    iters++;
    el = Number(process.hrtime.bigint() - t) / 1e9;
}
const jsMBs = (bytes.length * iters) / el / 1e6;
console.log(
    `@huggingface/tokenizers ${jsVersion()} (node ${process.version}): ` +
        `${jsMBs.toFixed(2)} MB/s  (${nTok} tokens, ${iters} iterations in ${el.toFixed(2)} s; first, cold encode ${(bytes.length / coldS / 1e6).toFixed(2)} MB/s)`
);

// ---- dsinfer ----
let dsMBs = null;
if (!opts.dsinfer) console.log('dsinfer: not run (no --dsinfer BIN)');
else {
    const r = spawnSync(opts.dsinfer, ['tokenize', '--model', modelDir, '--bench', file], { encoding: 'utf8' });
    const out = ((r.stdout || '') + (r.stderr || '')).trim();
    if (r.status !== 0) console.log(`dsinfer tokenize --bench failed (exit ${r.status ?? r.signal}): ${out}`);
    else {
        console.log(`dsinfer tokenize --bench: ${out}`);
        const m = /([0-9.]+)\s*MB\/s/.exec(out);
        if (m) dsMBs = Number(m[1]);
    }
}
if (dsMBs !== null) console.log(`ratio dsinfer / HF JS: ${(dsMBs / jsMBs).toFixed(2)}x`);
if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
