#!/usr/bin/env node
// Tokenizer conformance: dsinfer's tokenizer against Hugging Face's @huggingface/tokenizers (the
// reference the golden fixtures were made with), on the deterministic corpus of gen_corpus.js.
//
//   node tests/js/tokenizer_conformance.js --dsinfer build/dsinfer [--model DIR]
//        [--corpus HEXFILE] [--seed N] [--fixtures DIR] [--keep DIR] [--max-report N]
//
// Checks, each through ONE dsinfer process over the whole corpus:
//  1. encode: `dsinfer tokenize --batch` ids == HF ids for every input (no BOS on either side;
//     the tokenizer.json post_processor is ByteLevel and adds nothing, so HF's
//     add_special_tokens makes no difference; BOS comes from tokenizer_config add_bos_token and is
//     checked separately with --add-bos: exactly [bos_id] + the ids without it).
//     The JS string for an input's bytes is `new TextDecoder('utf-8', {ignoreBOM: true})
//     .decode(bytes)`: WHATWG decoding replaces each maximal invalid subpart (lone continuation
//     byte, truncated sequence, overlong or surrogate encoding such as ED A0 80, bytes F5..FF,
//     ...) by one U+FFFD -- the same as Rust's String::from_utf8_lossy -- and that is what dsinfer
//     promises to do with invalid input. ignoreBOM keeps a leading U+FEFF as text (the default
//     TextDecoder would silently drop it; a client's string, and HF, keep it).
//  2. round trip: `dsinfer detokenize --batch` of the HF ids == the input bytes for every input
//     that is valid UTF-8, and == the U+FFFD-replaced bytes for the others.
//  3. decode: `dsinfer detokenize --batch` of random id sequences (many cut UTF-8 characters,
//     added tokens among them) == HF's decode, as UTF-8 bytes.
//  4. (when present) the golden prompts.json of the fixtures: `dsinfer tokenize --add-bos` ids.
// Exit 0: all identical; 1: a mismatch or a failing command; 77: inputs missing (skip; a failure
// under CI=true).
'use strict';

const fs = require('fs');
const path = require('path');
const c = require('./common');

const opts = c.parseArgs(process.argv.slice(2), {
    dsinfer: 'value',
    model: 'value',
    corpus: 'value',
    seed: 'value',
    fixtures: 'value',
    keep: 'value',
    'max-report': 'value',
});
if (opts.help) {
    console.log(fs.readFileSync(__filename, 'utf8').split('\n').slice(1, 28).join('\n'));
    process.exit(0);
}
const MAX_REPORT = Number(opts['max-report'] || 5);
const modelDir = opts.model || c.defaultModelDir();
c.checkDsinfer(opts.dsinfer);
const { tokenizerJson, tokenizerConfig } = c.loadTokenizerDir(modelDir);

let Tokenizer;
try {
    ({ Tokenizer } = require('@huggingface/tokenizers'));
} catch (e) {
    c.skipOrFail(`@huggingface/tokenizers is not installed (npm ci --prefix tests/js): ${e.message}`);
}
const { generateCorpus, makeRng, DEFAULT_SEED } = require('./gen_corpus');

const tok = new Tokenizer(tokenizerJson, tokenizerConfig);
const decoder = new TextDecoder('utf-8', { ignoreBOM: true });
const strictDecoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

// ---- the corpus ------------------------------------------------------------------------------
let corpus;
if (opts.corpus) {
    const lines = fs.readFileSync(opts.corpus, 'utf8').split('\n');
    if (lines.length && lines[lines.length - 1] === '') lines.pop();
    corpus = lines.map((h, i) => ({ kind: `line${i + 1}`, bytes: Buffer.from(h.trim(), 'hex') }));
} else {
    corpus = generateCorpus(opts.seed !== undefined ? Number(opts.seed) : DEFAULT_SEED);
}
let failures = 0;
const t0 = Date.now();
for (const item of corpus) {
    item.text = decoder.decode(item.bytes);
    try {
        strictDecoder.decode(item.bytes);
        item.valid = true;
    } catch {
        item.valid = false;
    }
    item.expected = tok.encode(item.text, { add_special_tokens: false }).ids;
}
const nValid = corpus.filter((x) => x.valid).length;
const totalBytes = corpus.reduce((a, x) => a + x.bytes.length, 0);
console.log(
    `corpus: ${corpus.length} inputs, ${totalBytes} bytes (${nValid} valid UTF-8, ${corpus.length - nValid} not); ` +
        `HF encode ${((Date.now() - t0) / 1000).toFixed(2)}s`
);
if (opts.keep) {
    fs.mkdirSync(opts.keep, { recursive: true });
    fs.writeFileSync(path.join(opts.keep, 'corpus.hex'), corpus.map((x) => x.bytes.toString('hex')).join('\n') + '\n');
    fs.writeFileSync(path.join(opts.keep, 'expected_ids.txt'), corpus.map((x) => x.expected.join(',')).join('\n') + '\n');
}

function parseIds(line) {
    if (line === '') return [];
    return line.split(',').map((s) => (/^\s*\d+\s*$/.test(s) ? Number(s) : NaN));
}
function firstDiff(a, b) {
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
    return a.length === b.length ? -1 : n;
}

// ---- 1. encode -------------------------------------------------------------------------------
const bin = opts.dsinfer;
const enc = c.runDsinfer(
    bin,
    ['tokenize', '--model', modelDir, '--batch'],
    corpus.map((x) => x.bytes.toString('hex')).join('\n') + '\n',
    'encode'
);
if (!enc.ok) process.exit(1);
const encLines = c.splitLines(enc.stdout, corpus.length, 'dsinfer tokenize --batch');
if (opts.keep) fs.writeFileSync(path.join(opts.keep, 'dsinfer_ids.txt'), encLines.join('\n') + '\n');
let encSame = 0;
const encBad = [];
corpus.forEach((x, i) => {
    const got = parseIds(encLines[i]);
    const d = firstDiff(x.expected, got);
    if (d < 0) encSame++;
    else encBad.push({ i, x, got, d });
});
console.log(`encode: ${encSame}/${corpus.length} identical`);
if (encBad.length) {
    failures++;
    const byKind = {};
    for (const b of encBad) byKind[b.x.kind] = (byKind[b.x.kind] || 0) + 1;
    console.error(`FAIL: ${encBad.length} inputs tokenize differently; by kind: ${JSON.stringify(byKind)}`);
    // shortest first: the easiest to debug
    encBad.sort((a, b) => a.x.bytes.length - b.x.bytes.length);
    for (const b of encBad.slice(0, MAX_REPORT)) {
        console.error(`--- input #${b.i} (${b.x.kind}${b.x.valid ? '' : ', invalid UTF-8'}): ${c.escBytes(b.x.bytes)}`);
        console.error(`    first difference at id position ${b.d}`);
        console.error(`    HF:      ${c.listStr(b.x.expected, b.d)}`);
        console.error(`    dsinfer: ${c.listStr(b.got, b.d)}`);
        const show = (ids) =>
            ids
                .slice(Math.max(0, b.d - 2), b.d + 3)
                .map((id) => (Number.isInteger(id) ? JSON.stringify(tok.id_to_token(id) ?? `?${id}`) : 'NaN'))
                .join(' ');
        console.error(`    tokens around it: HF ${show(b.x.expected)} | dsinfer ${show(b.got)}`);
    }
}

// BOS: --add-bos gives [bos] + the ids, on a sample.
{
    const bosId = tok.token_to_id(
        typeof tokenizerConfig.bos_token === 'string' ? tokenizerConfig.bos_token : tokenizerConfig.bos_token.content
    );
    const sample = corpus.filter((x, i) => i % 97 === 0 || x.bytes.length === 0);
    const r = c.runDsinfer(
        bin,
        ['tokenize', '--model', modelDir, '--batch', '--add-bos'],
        sample.map((x) => x.bytes.toString('hex')).join('\n') + '\n',
        'encode with BOS'
    );
    if (!r.ok) failures++;
    else {
        const lines = c.splitLines(r.stdout, sample.length, 'dsinfer tokenize --batch --add-bos');
        let bad = 0;
        sample.forEach((x, i) => {
            const want = [bosId, ...x.expected];
            const got = parseIds(lines[i]);
            if (firstDiff(want, got) >= 0) {
                if (bad++ < MAX_REPORT)
                    console.error(`--- --add-bos of ${c.escBytes(x.bytes, 80)}: want ${c.listStr(want, 0)} got ${c.listStr(got, 0)}`);
            }
        });
        console.log(`encode --add-bos: ${sample.length - bad}/${sample.length} identical (BOS id ${bosId})`);
        if (bad) {
            failures++;
            console.error(`FAIL: --add-bos differs on ${bad} inputs`);
        }
    }
}

// ---- 2. round trip through detokenize ----------------------------------------------------------
function detokenize(idLists, what) {
    const r = c.runDsinfer(bin, ['detokenize', '--model', modelDir, '--batch'], idLists.map((l) => l.join(',')).join('\n') + '\n', what);
    if (!r.ok) {
        if (/unknown|usage|not a command|unrecognized/i.test(r.stderr))
            console.error('FAIL: `dsinfer detokenize --batch` is missing or rejects these arguments: the round-trip and decode checks cannot run');
        return null;
    }
    return c.splitLines(r.stdout, idLists.length, `dsinfer detokenize --batch (${what})`);
}
{
    const lines = detokenize(corpus.map((x) => x.expected), 'round trip');
    if (!lines) failures++;
    else {
        let okValid = 0;
        let okOther = 0;
        const bad = [];
        corpus.forEach((x, i) => {
            const want = Buffer.from(x.text, 'utf8'); // == x.bytes when valid
            if (lines[i].toLowerCase() === want.toString('hex')) x.valid ? okValid++ : okOther++;
            else bad.push({ i, x, want, got: lines[i] });
        });
        console.log(
            `round trip: ${okValid}/${nValid} valid inputs give back their bytes; ` +
                `${okOther}/${corpus.length - nValid} invalid ones give their U+FFFD-replaced bytes`
        );
        if (bad.length) {
            failures++;
            console.error(`FAIL: decode(encode(s)) != s for ${bad.length} inputs`);
            bad.sort((a, b) => a.x.bytes.length - b.x.bytes.length);
            for (const b of bad.slice(0, MAX_REPORT)) {
                const got = /^[0-9a-fA-F]*$/.test(b.got) && b.got.length % 2 === 0 ? Buffer.from(b.got, 'hex') : null;
                console.error(`--- input #${b.i} (${b.x.kind}): ${c.escBytes(b.x.bytes)}`);
                console.error(`    ids ${c.listStr(b.x.expected, 0)}`);
                console.error(`    want ${c.escBytes(b.want)}`);
                console.error(`    got  ${got ? c.escBytes(got) : JSON.stringify(b.got.slice(0, 200)) + ' (not hex)'}`);
            }
        }
    }
}

// ---- 3. decode of random id sequences ------------------------------------------------------------
{
    const rng = makeRng(4242);
    const vocabSize = tok.model.vocab.length;
    const singleByte = [];
    const added = tokenizerJson.added_tokens.map((t) => t.id);
    for (let id = 0; id < vocabSize; id++) {
        const t = tok.id_to_token(id);
        if (t !== undefined && [...t].length === 1 && !added.includes(id)) singleByte.push(id);
    }
    const seqs = [];
    for (let k = 0; k < 400; k++) {
        const n = rng.int(1, 24);
        const s = [];
        for (let j = 0; j < n; j++) {
            const r = rng.next();
            if (r < 0.45) s.push(rng.pick(singleByte));
            else if (r < 0.55) s.push(rng.pick(added));
            else s.push(rng.int(0, vocabSize - 1));
        }
        seqs.push(s.filter((id) => tok.id_to_token(id) !== undefined));
    }
    const want = seqs.map((s) => (s.length ? Buffer.from(tok.decode(s, { skip_special_tokens: false }), 'utf8') : Buffer.alloc(0)));
    const lines = detokenize(seqs, 'random ids');
    if (!lines) failures++;
    else {
        let same = 0;
        const bad = [];
        seqs.forEach((s, i) => (lines[i].toLowerCase() === want[i].toString('hex') ? same++ : bad.push(i)));
        console.log(`decode of random id sequences: ${same}/${seqs.length} identical to HF decode`);
        if (bad.length) {
            failures++;
            console.error(`FAIL: ${bad.length} random id sequences decode differently`);
            for (const i of bad.slice(0, MAX_REPORT)) {
                console.error(`--- ids [${seqs[i].join(',')}]`);
                console.error(`    HF:      hex ${want[i].toString('hex')}`);
                console.error(`    dsinfer: hex ${lines[i]}`);
            }
        }
    }
}

// ---- 4. golden prompts.json ---------------------------------------------------------------------
{
    const fx = process.env.DSINFER_FIXTURES || opts.fixtures || path.join(__dirname, '..', '..', '..', 'shared', 'fixtures');
    const cand = [path.join(fx, 'prompts.json'), path.join(fx, '..', 'prompts.json')];
    const file = cand.find((p) => fs.existsSync(p));
    if (!file) console.log(`prompts.json: not found (${cand.join(', ')}); skipped (optional)`);
    else {
        const prompts = JSON.parse(fs.readFileSync(file, 'utf8')).prompts;
        const r = c.runDsinfer(
            bin,
            ['tokenize', '--model', modelDir, '--batch', '--add-bos'],
            prompts.map((p) => Buffer.from(p.text, 'utf8').toString('hex')).join('\n') + '\n',
            'prompts.json'
        );
        if (!r.ok) failures++;
        else {
            const lines = c.splitLines(r.stdout, prompts.length, 'prompts.json');
            let bad = 0;
            prompts.forEach((p, i) => {
                const got = parseIds(lines[i]);
                const hf = [tok.token_to_id('<｜begin▁of▁sentence｜>'), ...tok.encode(p.text, { add_special_tokens: false }).ids];
                if (firstDiff(p.ids, hf) >= 0) console.error(`note: HF ids of golden prompt '${p.name}' differ from prompts.json`);
                const d = firstDiff(p.ids, got);
                if (d >= 0) {
                    bad++;
                    console.error(`--- prompt '${p.name}': first difference at ${d}\n    golden:  ${c.listStr(p.ids, d)}\n    dsinfer: ${c.listStr(got, d)}`);
                }
            });
            console.log(`prompts.json (${file}): ${prompts.length - bad}/${prompts.length} identical`);
            if (bad) {
                failures++;
                console.error(`FAIL: ${bad} golden prompts tokenize differently`);
            }
        }
    }
}

console.log(`total ${((Date.now() - t0) / 1000).toFixed(1)}s`);
if (failures) {
    console.error(`tokenizer conformance: FAILED (${failures} check(s))`);
    process.exit(1);
}
console.log('tokenizer conformance: all identical');
