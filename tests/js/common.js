// Shared helpers of the JS conformance tests (argument parsing, loading the tokenizer directory,
// running dsinfer, the skip/fail rule, escaping for messages).
'use strict';

const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const SKIP = 77;

// --dsinfer BIN --model DIR [--fixtures DIR] [--keep FILE] ... ; flags without a value are true.
function parseArgs(argv, known) {
    const opts = {};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '-h' || a === '--help') {
            opts.help = true;
            continue;
        }
        if (!a.startsWith('--')) die(`unexpected argument '${a}'`);
        const name = a.slice(2);
        if (!(name in known)) die(`unknown option '${a}' (known: ${Object.keys(known).map((k) => '--' + k).join(' ')})`);
        if (known[name] === 'flag') opts[name] = true;
        else {
            if (i + 1 >= argv.length) die(`option '${a}' needs a value`);
            opts[name] = argv[++i];
        }
    }
    return opts;
}

function die(msg, code = 2) {
    console.error(`error: ${msg}`);
    process.exit(code);
}

function defaultModelDir() {
    return (
        process.env.DSINFER_TOKENIZER_DIR ||
        path.join(process.env.HOME || '', '.cache/dsinfer/tokenizer-deepseek_v3-3.7.2')
    );
}

// Missing inputs (tokenizer files, dsinfer) are a skip, or a failure under CI=true, like the
// golden fixtures of the C tests.
function skipOrFail(msg) {
    const ci = process.env.CI === 'true';
    console.error('*'.repeat(78));
    console.error(`*** ${ci ? 'FAIL' : 'SKIP'}: ${msg}`);
    if (!ci) console.error('*** (reported as skipped; under CI=true this is a failure)');
    console.error('*'.repeat(78));
    process.exit(ci ? 1 : SKIP);
}

function loadTokenizerDir(dir) {
    const tj = path.join(dir, 'tokenizer.json');
    const tc = path.join(dir, 'tokenizer_config.json');
    if (!fs.existsSync(tj) || !fs.existsSync(tc))
        skipOrFail(`tokenizer files not found in ${dir} (run scripts/setup.sh, or set DSINFER_TOKENIZER_DIR / --model)`);
    return {
        tokenizerJson: JSON.parse(fs.readFileSync(tj, 'utf8')),
        tokenizerConfig: JSON.parse(fs.readFileSync(tc, 'utf8')),
    };
}

function checkDsinfer(bin) {
    if (!bin) die('--dsinfer BIN is required');
    if (!fs.existsSync(bin)) skipOrFail(`dsinfer binary not found at ${bin} (build it first)`);
}

// Runs dsinfer with `input` on stdin; returns stdout. Exits 1 (with stderr shown) on failure.
function runDsinfer(bin, args, input, what) {
    const t0 = Date.now();
    const r = spawnSync(bin, args, {
        input,
        maxBuffer: 1 << 30,
        encoding: 'utf8',
        env: process.env,
    });
    const secs = ((Date.now() - t0) / 1000).toFixed(2);
    // EPIPE: the command exited without reading all of stdin (e.g. it rejected its arguments);
    // its exit status and stderr tell why.
    if (r.error && !(r.error.code === 'EPIPE' && r.status !== null)) {
        console.error(`FAIL: could not run ${bin}: ${r.error.message}`);
        process.exit(1);
    }
    if (r.error && r.status === 0) {
        console.error(`FAIL: \`dsinfer ${args.join(' ')}\` (${what}) exited 0 without reading all its input`);
        return { ok: false, status: r.status, stderr: r.stderr || '', stdout: r.stdout || '' };
    }
    if (r.status !== 0) {
        console.error(`FAIL: \`dsinfer ${args.join(' ')}\` (${what}) exited with ${r.status ?? r.signal} after ${secs}s`);
        const err = (r.stderr || '').trim();
        if (err) console.error('its stderr:\n' + err.split('\n').slice(0, 40).join('\n'));
        return { ok: false, status: r.status, stderr: r.stderr || '', stdout: r.stdout || '' };
    }
    console.log(`dsinfer ${args.join(' ')}: ${secs}s`);
    return { ok: true, stdout: r.stdout, stderr: r.stderr || '' };
}

// Splits command output into exactly `n` lines (each ends with a newline; an empty line is an
// empty result, so a missing or extra line is an error, not something to guess about).
function splitLines(out, n, what) {
    if (out.endsWith('\n')) out = out.slice(0, -1);
    const lines = n === 0 && out === '' ? [] : out.split('\n');
    if (lines.length !== n) {
        console.error(`FAIL: ${what}: expected ${n} output lines, got ${lines.length}`);
        process.exit(1);
    }
    return lines.map((l) => (l.endsWith('\r') ? l.slice(0, -1) : l));
}

// A printable, bounded rendering of a string (JSON escapes; long strings shortened).
function esc(s, max = 300) {
    let j = JSON.stringify(s);
    if (j.length > max) j = j.slice(0, max) + `...(${s.length} UTF-16 units)`;
    return j;
}

function escBytes(buf, max = 300) {
    const dec = new TextDecoder('utf-8', { ignoreBOM: true }).decode(buf);
    let hex = buf.toString('hex');
    if (hex.length > 120) hex = hex.slice(0, 120) + '...';
    return `${esc(dec, max)} (${buf.length} bytes, hex ${hex})`;
}

function listStr(a, around, max = 24) {
    if (a.length <= max) return '[' + a.join(',') + ']';
    const lo = Math.max(0, around - (max >> 1));
    const hi = Math.min(a.length, lo + max);
    return (lo > 0 ? '[...,' : '[') + a.slice(lo, hi).join(',') + (hi < a.length ? ',...]' : ']') + ` (${a.length} ids)`;
}

module.exports = {
    SKIP,
    parseArgs,
    die,
    defaultModelDir,
    skipOrFail,
    loadTokenizerDir,
    checkDsinfer,
    runDsinfer,
    splitLines,
    esc,
    escBytes,
    listStr,
};
