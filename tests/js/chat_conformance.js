#!/usr/bin/env node
// Chat-template conformance: `dsinfer chat-template --batch` against @huggingface/jinja rendering
// the real chat_template strings.
//
//   node tests/js/chat_conformance.js --dsinfer build/dsinfer [--model DIR] [--count N]
//        [--seed N] [--keep DIR] [--max-report N]
//
//  1. The chat_template of DIR/tokenizer_config.json (DeepSeek-V3), with that file's bos_token,
//     on N (default 300) deterministic conversations: 0-3 system prompts (also mid-conversation),
//     user/assistant turns, assistant tool calls (1-3 per message, arguments as JSON strings;
//     content null, "" or text), 1-3 tool results in a row, conversations ending on a tool
//     result, <think> blocks in assistant content, special-token text inside content, non-ASCII,
//     empty strings, add_generation_prompt true/false/absent. dsinfer detects the format itself.
//  2. Every tests/js/templates/*.json ({"chat_template", "bos_token"}; deepseek-r1.json is the
//     DeepSeek-R1 one) on the same conversations, with --chat-template-format from the file's
//     "format" field, else its name: deepseek-<format>.json (v3, r1, r1-0528), else r1 when the
//     name contains "r1", else v3.
//  3. A few messages the template cannot render (non-string content, a tool call without its
//     function): dsinfer must exit non-zero with a message.
// All renderings must be byte-identical. Exit 0 / 1 / 77 (inputs missing; a failure under CI=true).
'use strict';

const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');
const c = require('./common');

const opts = c.parseArgs(process.argv.slice(2), {
    dsinfer: 'value',
    model: 'value',
    count: 'value',
    seed: 'value',
    keep: 'value',
    'max-report': 'value',
});
if (opts.help) {
    console.log(fs.readFileSync(__filename, 'utf8').split('\n').slice(1, 22).join('\n'));
    process.exit(0);
}
const MAX_REPORT = Number(opts['max-report'] || 3);
const modelDir = opts.model || c.defaultModelDir();
c.checkDsinfer(opts.dsinfer);
const { tokenizerConfig } = c.loadTokenizerDir(modelDir);
let Template;
try {
    ({ Template } = require('@huggingface/jinja'));
} catch (e) {
    c.skipOrFail(`@huggingface/jinja is not installed (npm ci --prefix tests/js): ${e.message}`);
}
const { makeRng, PROSE, CODE, CJK, SCRIPTS, EMOJI, SPECIAL, LOOKALIKE } = require('./gen_corpus');

const tokenString = (t) => (t == null ? '' : typeof t === 'string' ? t : t.content);

// ---- conversations -------------------------------------------------------------------------------
function makeConversations(seed, count) {
    const rng = makeRng(seed);
    const text = () => {
        const k = rng.int(0, 13);
        if (k === 0) return '';
        if (k === 1) return rng.pick(PROSE);
        if (k === 2) return rng.pick(CODE);
        if (k === 3) return rng.pick(CJK);
        if (k === 4) return rng.pick(SCRIPTS);
        if (k === 5) return rng.pick(EMOJI) + ' ' + rng.pick(PROSE);
        if (k === 6) return 'Please use ' + rng.pick(SPECIAL) + ' and ' + rng.pick(LOOKALIKE) + ' literally.';
        if (k === 7) return '  leading/trailing whitespace\n\n\t ';
        if (k === 8) return 'quotes " \' \\ backslash \\n not-a-newline {{ not jinja }} {% raw %}';
        if (k === 9) return 'line1\r\nline2\u2028line3\u00a0\u3000end';
        if (k === 10) return rng.pick(CJK) + '\n' + rng.pick(PROSE);
        if (k === 11) return 'x'.repeat(rng.int(1, 2000));
        return rng.pick(PROSE) + ' ' + rng.pick(CJK);
    };
    const assistantText = () => {
        const k = rng.int(0, 6);
        if (k === 0) return '<think>\n' + text() + '\n</think>\n\n' + text();
        if (k === 1) return '<think>a</think>b</think>c'; // several </think>: the last part is kept by R1
        if (k === 2) return text() + '</think>';
        return text();
    };
    const NAMES = ['get_weather', 'search', 'run_code', 'calc', 'lookup_用户', 'send-email', 'f'];
    const args = () => {
        const k = rng.int(0, 5);
        if (k === 0) return '{}';
        if (k === 1) return '';
        if (k === 2) return JSON.stringify({ city: rng.pick(['Paris', '北京', 'São Paulo', 'Köln']), unit: 'c' });
        if (k === 3) return JSON.stringify({ query: text(), n: rng.int(0, 100), deep: { a: [1, 2, { b: null }] } });
        if (k === 4) return JSON.stringify({ code: rng.pick(CODE) }, null, 2);
        return '{"raw": "' + rng.pick(EMOJI) + '\\n\\"quoted\\""}';
    };
    let callId = 0;
    const toolCalls = () => {
        const n = rng.int(1, 3);
        const calls = [];
        for (let i = 0; i < n; i++)
            calls.push({ id: `call_${++callId}`, type: 'function', function: { name: rng.pick(NAMES), arguments: args() } });
        return calls;
    };

    const convs = [];
    for (let k = 0; k < count; k++) {
        const msgs = [];
        const nSys = rng.pick([0, 0, 1, 1, 1, 2, 3]);
        const sysMid = nSys > 0 && rng.chance(0.2); // the last system prompt goes mid-conversation
        for (let i = 0; i < nSys - (sysMid ? 1 : 0); i++) msgs.push({ role: 'system', content: text() });
        const nTurns = rng.int(1, 5);
        let endedOnTool = false;
        for (let t = 0; t < nTurns; t++) {
            msgs.push({ role: 'user', content: text() });
            if (sysMid && t === 0) msgs.push({ role: 'system', content: text() });
            const last = t === nTurns - 1;
            if (last && rng.chance(0.45)) break; // ends on the user: the usual generation request
            if (rng.chance(0.4)) {
                const nRounds = rng.int(1, 2);
                for (let r = 0; r < nRounds; r++) {
                    const content = rng.pick([null, null, null, '', 'Let me check. ']);
                    const m = { role: 'assistant', content, tool_calls: toolCalls() };
                    if (rng.chance(0.2)) m.reasoning_content = 'ignored by the template';
                    msgs.push(m);
                    const nTool = rng.int(1, 3);
                    for (let i = 0; i < nTool; i++) {
                        const tm = { role: 'tool', content: rng.chance(0.5) ? args() : text() };
                        if (rng.chance(0.7)) tm.tool_call_id = `call_${callId}`;
                        msgs.push(tm);
                    }
                }
                if (last && rng.chance(0.4)) {
                    endedOnTool = true;
                    break;
                }
            }
            msgs.push({ role: 'assistant', content: assistantText() });
        }
        const conv = { messages: msgs };
        const g = rng.next();
        if (g < 0.03) {
            // add_generation_prompt absent: the template's default (false)
        } else conv.add_generation_prompt = endedOnTool ? rng.chance(0.5) : g < 0.6;
        convs.push(conv);
    }
    // Fixed shapes worth having every time.
    convs.push({ messages: [], add_generation_prompt: true });
    convs.push({ messages: [], add_generation_prompt: false });
    convs.push({ messages: [{ role: 'user', content: '' }], add_generation_prompt: true });
    convs.push({ messages: [{ role: 'system', content: '' }], add_generation_prompt: true });
    convs.push({
        messages: [
            { role: 'system', content: 'A' },
            { role: 'system', content: 'B' },
            { role: 'system', content: 'C' },
            { role: 'user', content: 'hi' },
        ],
        add_generation_prompt: true,
    });
    convs.push({
        messages: [
            { role: 'user', content: 'weather?' },
            { role: 'assistant', content: null, tool_calls: [{ id: 'a', type: 'function', function: { name: 'w', arguments: '{"c":"x"}' } }] },
            { role: 'tool', content: '20C' },
        ],
        add_generation_prompt: true,
    });
    return convs;
}

function firstDiffStr(a, b) {
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
    return a.length === b.length ? -1 : n;
}

function checkTemplate(label, template, bosToken, formatArgs, convs) {
    let tmpl;
    try {
        tmpl = new Template(template);
    } catch (e) {
        console.error(`FAIL: ${label}: @huggingface/jinja cannot parse the template: ${e.message}`);
        return false;
    }
    const expected = convs.map((cv, i) => {
        const ctx = { messages: cv.messages, bos_token: bosToken };
        if ('add_generation_prompt' in cv) ctx.add_generation_prompt = cv.add_generation_prompt;
        try {
            return tmpl.render(ctx);
        } catch (e) {
            console.error(`FAIL: ${label}: jinja cannot render conversation #${i}: ${e.message}`);
            process.exit(1);
        }
    });
    const input = convs.map((cv) => JSON.stringify(cv)).join('\n') + '\n';
    const r = c.runDsinfer(opts.dsinfer, ['chat-template', '--model', modelDir, '--batch', ...formatArgs], input, label);
    let lines;
    if (r.ok) lines = c.splitLines(r.stdout, convs.length, `${label}: dsinfer chat-template --batch`);
    else {
        // A failed batch may still have printed a line per conversation (null for the refused
        // ones): compare what is there to show which.
        lines = r.stdout.replace(/\n$/, '').split('\n');
        if (lines.length !== convs.length) return false;
    }
    if (opts.keep) {
        fs.mkdirSync(opts.keep, { recursive: true });
        const base = label.replace(/[^A-Za-z0-9_.-]+/g, '_');
        fs.writeFileSync(path.join(opts.keep, `${base}.input.jsonl`), input);
        fs.writeFileSync(path.join(opts.keep, `${base}.expected.jsonl`), expected.map((s) => JSON.stringify(s)).join('\n') + '\n');
        fs.writeFileSync(path.join(opts.keep, `${base}.dsinfer.jsonl`), lines.join('\n') + '\n');
    }
    const bad = [];
    lines.forEach((line, i) => {
        let got;
        try {
            got = JSON.parse(line);
        } catch {
            got = undefined;
        }
        if (typeof got !== 'string') bad.push({ i, got: null, raw: line });
        else if (got !== expected[i]) bad.push({ i, got });
    });
    console.log(`${label}: ${convs.length - bad.length}/${convs.length} renderings byte-identical`);
    if (!bad.length) return r.ok;
    console.error(`FAIL: ${label}: ${bad.length} conversations render differently`);
    bad.sort((a, b) => expected[a.i].length - expected[b.i].length);
    for (const b of bad.slice(0, MAX_REPORT)) {
        const want = expected[b.i];
        console.error(`--- conversation #${b.i}: ${c.esc(JSON.stringify(convs[b.i]), 600)}`);
        if (b.got === null) {
            console.error(`    dsinfer printed something that is not a JSON string: ${c.esc(b.raw, 200)}`);
            continue;
        }
        const d = firstDiffStr(want, b.got);
        const lo = Math.max(0, d - 60);
        console.error(`    first difference at UTF-16 offset ${d} (lengths: jinja ${want.length}, dsinfer ${b.got.length})`);
        console.error(`    jinja:   ...${c.esc(want.slice(lo, d + 80), 400)}`);
        console.error(`    dsinfer: ...${c.esc(b.got.slice(lo, d + 80), 400)}`);
    }
    return false;
}

// ---- run -------------------------------------------------------------------------------------------
const t0 = Date.now();
const convs = makeConversations(opts.seed !== undefined ? Number(opts.seed) : 7, Number(opts.count || 300));
const nTool = convs.filter((cv) => cv.messages.some((m) => m.tool_calls)).length;
console.log(`${convs.length} conversations (${nTool} with tool calls)`);
let ok = true;

if (typeof tokenizerConfig.chat_template !== 'string') {
    console.error(`FAIL: ${modelDir}/tokenizer_config.json has no chat_template string`);
    ok = false;
} else {
    ok = checkTemplate('v3 (tokenizer_config.json)', tokenizerConfig.chat_template, tokenString(tokenizerConfig.bos_token), [], convs) && ok;
}

const tdir = path.join(__dirname, 'templates');
const tfiles = fs.existsSync(tdir) ? fs.readdirSync(tdir).filter((f) => f.endsWith('.json')).sort() : [];
if (!tfiles.length) console.log(`no ${tdir}/*.json: only the V3 template checked`);
for (const f of tfiles) {
    const j = JSON.parse(fs.readFileSync(path.join(tdir, f), 'utf8'));
    if (typeof j.chat_template !== 'string') {
        console.error(`FAIL: ${f} has no chat_template string`);
        ok = false;
        continue;
    }
    // The format: the file's "format" field, else its name (deepseek-<format>.json), else r1 for
    // any name with r1 in it, else v3.
    const stem = f.replace(/\.json$/, '').replace(/^deepseek-/i, '').toLowerCase();
    const fmt = j.format || (['v3', 'r1', 'r1-0528'].includes(stem) ? stem : /r1/.test(stem) ? 'r1' : 'v3');
    const bos = tokenString(j.bos_token) || tokenString(tokenizerConfig.bos_token);
    if (bos !== tokenString(tokenizerConfig.bos_token))
        console.log(`note: ${f} has bos_token ${c.esc(bos)}, the model directory ${c.esc(tokenString(tokenizerConfig.bos_token))}`);
    ok = checkTemplate(`${fmt} (templates/${f})`, j.chat_template, bos, ['--chat-template-format', fmt], convs) && ok;
}

// Messages no template can render: a non-zero exit with a message, not a guess.
const BAD = [
    { why: 'numeric content', conv: { messages: [{ role: 'user', content: 42 }], add_generation_prompt: true } },
    { why: 'null user content', conv: { messages: [{ role: 'user', content: null }], add_generation_prompt: true } },
    {
        why: 'array content',
        conv: { messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }], add_generation_prompt: true },
    },
    {
        why: 'tool call without function',
        conv: { messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: null, tool_calls: [{ type: 'function' }] }] },
    },
];
let refused = 0;
for (const b of BAD) {
    const r = spawnSync(opts.dsinfer, ['chat-template', '--model', modelDir, '--batch'], {
        input: JSON.stringify(b.conv) + '\n',
        encoding: 'utf8',
    });
    if (r.status !== 0 && r.status !== null && (r.stderr || '').trim()) refused++;
    else {
        ok = false;
        console.error(
            `FAIL: ${b.why}: expected a non-zero exit with a message; got exit ${r.status ?? r.signal}, ` +
                `stdout ${c.esc(r.stdout || '', 200)}, stderr ${c.esc(r.stderr || '', 200)}`
        );
    }
}
console.log(`unrenderable messages refused: ${refused}/${BAD.length}`);

console.log(`total ${((Date.now() - t0) / 1000).toFixed(1)}s`);
if (!ok) {
    console.error('chat conformance: FAILED');
    process.exit(1);
}
console.log('chat conformance: all identical');
