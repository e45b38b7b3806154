// `dsinfer serve` driven by the official `openai` npm package (pinned in package.json), as an
// application would use it: the real server on a free loopback port with the tiny-a fixture, then
//   - models.list() names the model by its path, as given on the command line;
//   - completions of every golden prompt: greedy tokens == the reference's (return_token_ids),
//     streamed deltas concatenate to the whole text, usage in the last chunk;
//   - chat, whole and streamed, with logprobs / top_logprobs;
//   - seed: the same seed repeats, n > 1 (whole and streamed per choice index);
//   - stop strings; completions logprobs;
//   - errors surface as the library's typed errors (NotFoundError 404, BadRequestError 400 with
//     error.param);
//   - SIGTERM: exit status 0.
// Usage: node server_openai.js --dsinfer BIN --fixtures DIR ($DSINFER_FIXTURES wins). Exit 0 / 1 / 77 (missing inputs;
// a failure under CI=true).
'use strict';

const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');
const { parseArgs, skipOrFail, checkDsinfer } = require('./common');

// (--model, which ctest passes to every JS test, is not needed here)
const opts = parseArgs(process.argv.slice(2), { dsinfer: 'value', fixtures: 'value', model: 'value' });
if (opts.help) {
    console.log('usage: node server_openai.js --dsinfer BIN --fixtures DIR');
    process.exit(0);
}
checkDsinfer(opts.dsinfer);
let OpenAI;
try {
    OpenAI = require('openai');
} catch (e) {
    skipOrFail('the openai package is not installed (npm ci --prefix tests/js)');
}
const fixtures = process.env.DSINFER_FIXTURES || opts.fixtures; // the C tests' rule
const model = fixtures && path.join(fixtures, 'tiny-a');
if (!model || !fs.existsSync(path.join(model, 'golden.json'))) skipOrFail(`golden fixtures not found (${fixtures})`);
const golden = JSON.parse(fs.readFileSync(path.join(model, 'golden.json'), 'utf8'));

let failures = 0,
    checks = 0;
function check(cond, ...msg) {
    checks++;
    if (!cond) {
        failures++;
        console.error('CHECK failed:', ...msg);
    }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function startServer() {
    return new Promise((resolve, reject) => {
        const proc = spawn(opts.dsinfer, ['serve', model, '--port', '0', '--disable-log-requests'], {
            stdio: ['ignore', 'ignore', 'pipe'],
        });
        let log = '';
        const timer = setTimeout(() => reject(new Error('no port after 60 s:\n' + log)), 60000);
        proc.stderr.on('data', (d) => {
            log += d.toString();
            const m = log.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
            if (m && !proc.port) {
                proc.port = Number(m[1]);
                clearTimeout(timer);
                resolve(proc);
            }
        });
        proc.on('exit', (code) => reject(new Error(`dsinfer serve exited (${code}):\n${log}`)));
    });
}

async function waitHealthy(port) {
    for (let i = 0; i < 600; i++) {
        try {
            const r = await fetch(`http://127.0.0.1:${port}/health`);
            if (r.status === 200) return;
        } catch (e) {
            /* not yet */
        }
        await sleep(100);
    }
    throw new Error('/health never answered 200');
}

async function collect(stream) {
    const text = [],
        finish = [],
        ids = [];
    let usage = null,
        chunks = 0;
    for await (const chunk of stream) {
        chunks++;
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices) {
            const t = c.delta ? c.delta.content || '' : c.text || '';
            text[c.index] = (text[c.index] || '') + t;
            if (c.finish_reason) finish[c.index] = c.finish_reason;
            if (c.token_ids) ids[c.index] = (ids[c.index] || []).concat(c.token_ids);
        }
    }
    return { text, finish, ids, usage, chunks };
}

async function main() {
    const proc = await startServer();
    const port = proc.port;
    let exitCode = null;
    const exited = new Promise((r) => proc.on('exit', (code) => r((exitCode = code))));
    await waitHealthy(port);
    const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: 'none', maxRetries: 0 });

    // the model is named by its path, exactly as given
    const models = await client.models.list();
    check(models.data.length === 1 && models.data[0].id === model, 'models.list', JSON.stringify(models.data));

    // golden prompts: greedy tokens, streamed == whole
    let n = 0;
    for (const p of golden.prompts) {
        if (!p.add_bos) continue;
        const req = { model, prompt: p.text, max_tokens: 24, temperature: 0, ignore_eos: true, return_token_ids: true };
        const whole = await client.completions.create(req);
        check(JSON.stringify(whole.choices[0].token_ids) === JSON.stringify(p.greedy.tokens), `${p.name}: greedy tokens differ from the golden ones`);
        check(whole.choices[0].finish_reason === 'length', `${p.name}: finish_reason`);
        check(whole.usage.prompt_tokens === p.ids.length && whole.usage.completion_tokens === 24, `${p.name}: usage`, JSON.stringify(whole.usage));
        const s = await collect(await client.completions.create({ ...req, stream: true, stream_options: { include_usage: true } }));
        check(s.text[0] === whole.choices[0].text, `${p.name}: streamed text differs`, JSON.stringify(s.text[0]), JSON.stringify(whole.choices[0].text));
        check(JSON.stringify(s.ids[0]) === JSON.stringify(p.greedy.tokens), `${p.name}: streamed token ids`);
        check(s.usage && s.usage.completion_tokens === 24, `${p.name}: usage chunk`);
        n++;
    }
    check(n >= 3, 'golden prompts checked:', n);

    // chat, whole and streamed, with logprobs
    const messages = [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Hello, who are you?' },
    ];
    const chatReq = { model, messages, max_tokens: 10, temperature: 0, ignore_eos: true };
    const chat = await client.chat.completions.create({ ...chatReq, logprobs: true, top_logprobs: 3 });
    check(chat.object === 'chat.completion' && chat.choices[0].message.role === 'assistant', 'chat shape');
    check(chat.choices[0].logprobs.content.length === 10, 'chat logprobs length');
    check(chat.choices[0].logprobs.content.every((t) => t.top_logprobs.length === 3 && Array.isArray(t.bytes)), 'chat top_logprobs');
    check(chat.usage.completion_tokens === 10, 'chat usage');
    const cs = await collect(await client.chat.completions.create({ ...chatReq, stream: true }));
    check(cs.text[0] === chat.choices[0].message.content, 'chat streamed text differs', JSON.stringify(cs.text[0]), JSON.stringify(chat.choices[0].message.content));
    check(cs.finish[0] === 'length', 'chat stream finish_reason');

    // seeds and n > 1
    const sreq = { model, prompt: 'Once upon a time', max_tokens: 12, temperature: 1, seed: 1234, n: 3, ignore_eos: true };
    const a = await client.completions.create(sreq);
    const b = await client.completions.create(sreq);
    check(a.choices.length === 3, 'n = 3 choices');
    check(JSON.stringify(a.choices.map((c) => c.text)) === JSON.stringify(b.choices.map((c) => c.text)), 'the same seed repeats');
    check(new Set(a.choices.map((c) => c.text)).size > 1, 'three samples are not all equal');
    const as = await collect(await client.completions.create({ ...sreq, stream: true }));
    for (let i = 0; i < 3; i++) check(as.text[i] === a.choices[i].text, `stream choice ${i} differs`);
    const ca = await client.chat.completions.create({ model, messages, max_tokens: 8, seed: -5, n: 2 });
    const cb = await client.chat.completions.create({ model, messages, max_tokens: 8, seed: -5, n: 2 });
    check(ca.choices.length === 2 && ca.choices[1].message.content === cb.choices[1].message.content, 'chat seed + n');

    // stop strings
    const g = await client.completions.create({ model, prompt: 'Mindspore is', max_tokens: 30, temperature: 0, ignore_eos: true });
    const text = g.choices[0].text;
    const chars = Array.from(text);
    if (chars.length > 8) {
        const stop = chars.slice(Math.floor(chars.length / 2), Math.floor(chars.length / 2) + 2).join('');
        const st = await client.completions.create({ model, prompt: 'Mindspore is', max_tokens: 30, temperature: 0, ignore_eos: true, stop: [stop] });
        check(st.choices[0].text === text.slice(0, text.indexOf(stop)), 'stop string', JSON.stringify(stop), JSON.stringify(st.choices[0].text));
        check(st.choices[0].finish_reason === 'stop', 'stop finish_reason');
        const sts = await collect(await client.completions.create({ model, prompt: 'Mindspore is', max_tokens: 30, temperature: 0, ignore_eos: true, stop: stop, stream: true }));
        check(sts.text[0] === st.choices[0].text && sts.finish[0] === 'stop', 'streamed stop');
    }

    // completions logprobs
    const lp = await client.completions.create({ model, prompt: 'Mindspore is', max_tokens: 5, temperature: 0, logprobs: 2, ignore_eos: true });
    const L = lp.choices[0].logprobs;
    check(L.tokens.length === 5 && L.token_logprobs.length === 5 && L.top_logprobs.length === 5 && L.text_offset.length === 5, 'completions logprobs');
    check(L.token_logprobs.every((x) => x <= 0), 'logprobs <= 0');

    // errors as the library's typed errors
    try {
        await client.completions.create({ model: 'no-such-model', prompt: 'x' });
        check(false, 'an unknown model was accepted');
    } catch (e) {
        check(e instanceof OpenAI.NotFoundError && e.status === 404, 'unknown model:', e.status, e.message);
    }
    try {
        await client.completions.create({ model, prompt: 'x', temperature: -1 });
        check(false, 'temperature -1 was accepted');
    } catch (e) {
        check(e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'temperature', 'bad temperature:', e.status, e.param, e.message);
    }
    try {
        await client.chat.completions.create({ model, messages: [], max_tokens: 1 });
        check(false, 'empty messages were accepted');
    } catch (e) {
        check(e instanceof OpenAI.BadRequestError && e.param === 'messages', 'empty messages:', e.status, e.param);
    }

    proc.kill('SIGTERM');
    await exited;
    check(exitCode === 0, 'exit status after SIGTERM:', exitCode);
    console.log(`server_openai: ${checks} checks, ${failures} failed`);
    process.exit(failures ? 1 : 0);
}

main().catch((e) => {
    console.error('error:', e && e.stack ? e.stack : e);
    process.exit(1);
});
