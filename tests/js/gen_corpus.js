#!/usr/bin/env node
// Deterministic tokenizer test corpus: >= 2,000 inputs as raw bytes (some deliberately invalid
// UTF-8), built from hand-written edge cases plus seeded random combinations of string fragments.
//
//   node tests/js/gen_corpus.js OUT_FILE [--seed N]
//
// writes one line per input: the lowercase hex of its bytes (an empty line is the empty input).
// As a module: require('./gen_corpus').generateCorpus(seed) -> [{ kind, bytes: Buffer }].
// The same seed always gives the same bytes (no Math.random, no clock, no locale).
'use strict';

const fs = require('fs');

const DEFAULT_SEED = 20250101;

// ---- seeded PRNG (mulberry32) ---------------------------------------------------------------
function makeRng(seed) {
    let a = seed >>> 0;
    const next = () => {
        a = (a + 0x6d2b79f5) >>> 0;
        let t = a;
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const rng = {
        next,
        int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)), // inclusive
        pick: (arr) => arr[Math.floor(next() * arr.length)],
        chance: (p) => next() < p,
    };
    return rng;
}

// ---- fragments ------------------------------------------------------------------------------
const PROSE = [
    'The quick brown fox jumps over the lazy dog.',
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    'Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse...',
    "I don't think they'll've finished by 5 o'clock; we're late, aren't we?",
    'Dr. Smith (the one from St. John\'s) said: "e.g., i.e., etc." are abbreviations.',
    'What?! No way... Really?? Yes!!!',
    'The U.S.A. and the U.K. signed the treaty on Jan. 1st, 1999 at 10:30 a.m.',
    'email me at john.doe+filter@example.co.uk or visit https://www.example.com/path?q=1&r=two#frag',
    'Large language models tokenize text into sub-word units using byte-pair encoding (BPE).',
    'HELLO WORLD, this Is MiXeD CaSe TeXt with camelCase, snake_case and kebab-case-words.',
    'naïve café résumé façade coöperate jalapeño Zürich São Paulo Øresund Łódź',
    '“Smart quotes” and ‘single ones’ — plus an em dash – an en dash … and an ellipsis.',
    'Mr. O\'Neil\'s dog\'s bone; the dogs\' bones; it\'s; its; \'tis; rock \'n\' roll',
    'Once upon a time, in a land far, far away, there lived a very small dragon.',
    'To be, or not to be, that is the question:',
    'A paragraph.\n\nAnother paragraph after a blank line.\nAnd a line break.',
    '   leading spaces and trailing spaces   ',
    'tab\tseparated\tvalues\there',
    'Windows line endings\r\nsecond line\r\n',
    '#hashtag @mention $dollar %percent ^caret &amp *star',
    '(parentheses) [brackets] {braces} <angles>',
    '100% of 50 is 50; 3/4 = 0.75; 2^10 = 1024; 1e-9 is tiny.',
    'ALLCAPS WORDS LIKE NASA, FBI AND HTTP REQUESTS.',
    'Words:apple,banana;cherry|date/fig\\grape',
    "The patient's BP was 120/80 mmHg, HR 72 bpm, SpO2 98%.",
];

const CODE = [
    // C
    '#include <stdio.h>\n\nint main(int argc, char **argv) {\n    printf("Hello, %s!\\n", argc > 1 ? argv[1] : "world");\n    return 0;\n}\n',
    'static inline uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }',
    'for (size_t i = 0; i < n; ++i) {\n\tif (a[i] != b[i]) goto fail;\n}\n',
    '#define MAX(a, b) ((a) > (b) ? (a) : (b))\ntypedef struct { int x, y; } point_t;',
    // Python
    'def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n',
    'import numpy as np\n\nx = np.arange(10, dtype=np.float32)\nprint(f"{x.mean():.3f}")\n',
    'class Foo(Base):\n    """Docstring."""\n\n    def __init__(self, *args, **kwargs):\n        super().__init__(*args, **kwargs)\n        self._cache: dict[str, int] = {}\n',
    'with open("data.txt", encoding="utf-8") as f:\n    lines = [l.rstrip("\\n") for l in f if l.strip()]\n',
    'lambda x: x ** 2 if x >= 0 else -x  # comment',
    // JavaScript
    'const add = (a, b) => a + b;\nexport default async function main() {\n  await fetch(`/api/${id}?q=${encodeURIComponent(q)}`);\n}\n',
    'document.querySelectorAll(".item").forEach((el, i) => { el.style.opacity = i / 10; });',
    'if (x === null || typeof x !== "object") { throw new TypeError("bad: " + x); }',
    'let re = /^[a-z0-9_\\-]+@[a-z]+\\.[a-z]{2,}$/i;',
    // Rust
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    'impl<T: Clone + Send + \'static> Iterator for Foo<T> {\n    type Item = T;\n    fn next(&mut self) -> Option<Self::Item> { None }\n}\n',
    'match result { Ok(v) => v, Err(e) => return Err(e.into()), }',
    '#[derive(Debug, Clone, PartialEq)]\npub struct Config { pub name: String, pub size: usize }',
    // shell
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do\n  echo "$f: $(wc -l < "$f")"\ndone\n',
    'find . -name "*.c" -print0 | xargs -0 grep -n "TODO" 2>/dev/null || true',
    'export PATH="$HOME/.local/bin:$PATH" && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release',
    'ls -la | awk \'{print $9}\' | sort -u > /tmp/out.txt',
    // JSON
    '{"name": "dsinfer", "version": "0.1.0", "tags": ["c", "llm"], "nested": {"a": 1, "b": [true, false, null]}}',
    '[{"id":1,"value":-3.5e+10},{"id":2,"value":"\\u00e9\\n"}]',
    '{\n  "key": "value",\n  "list": [\n    1,\n    2\n  ]\n}',
    // HTML
    '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Test</title></head>\n<body><p class="x">Hello &amp; welcome</p></body>\n</html>\n',
    '<div id="main" data-x=\'1\'><a href="https://example.com/?a=1&amp;b=2">link</a><br/></div>',
    '<script>window.onload = () => alert("hi");</script><!-- comment -->',
    // misc
    'SELECT id, name FROM users WHERE age >= 18 AND name LIKE \'%smith%\' ORDER BY id DESC;',
    '$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$',
    'diff --git a/x.c b/x.c\n@@ -1,3 +1,4 @@\n-old line\n+new line\n context\n',
];

const CJK = [
    '深度求索是一家专注于通用人工智能研究的中国公司，总部位于杭州。',
    '今天天气很好，我们去公园散步吧！',
    '人工智能（AI）正在改变世界：从医疗到教育，无处不在。',
    '我有3个苹果和２个梨。',
    '「引用」『二重引用』【括号】《书名》',
    '日本語のテキストです。ひらがなとカタカナと漢字が混ざっています。',
    'コンピューターサイエンスを勉強しています。',
    'ｶﾀｶﾅの半角文字とﾃｽﾄ',
    '東京都渋谷区１－２－３',
    '한국어 텍스트입니다. 안녕하세요, 만나서 반갑습니다!',
    '대한민국의 수도는 서울입니다.',
    '繁體中文與简体中文混合：這個、这个。',
    '龥龦龧鿐鿿𠀀𠀁𪚥', // around the edge of the pre-tokenizer's CJK range (U+9FA5) and astral CJK
    '中文English混合mixed文本text。',
    '〇一二三四五六七八九十百千万亿',
];

const SCRIPTS = [
    'Привет, мир! Как дела? Ёжик в тумане.',
    'Съешь же ещё этих мягких французских булок, да выпей чаю.',
    'مرحبا بالعالم! هذا نص عربي مع أرقام ١٢٣٤٥.',
    'السَّلَامُ عَلَيْكُمْ',
    'שלום עולם! זהו טקסט בעברית.',
    'नमस्ते दुनिया! यह हिंदी में पाठ है। संख्या: १२३४',
    'สวัสดีชาวโลก นี่คือข้อความภาษาไทย ๑๒๓',
    'Γειά σου Κόσμε! Αυτό είναι ελληνικό κείμενο. αβγδεζηθ',
    'Ελληνικά: ΑΒΓΔ άέήίόύώ ΐΰ',
    'ქართული ენა — Georgian; Հայերեն — Armenian; አማርኛ — Amharic',
    'Tiếng Việt có dấu: Xin chào thế giới, đây là văn bản.',
    'Türkçe: İstanbul, ığdır, ŞĞÜÖÇ',
    'Zalgo: Z̴̡̢̛͔̝a̷̧̛͍͚l̸̢̛̪g̶̡̛̣o̵̧̮',
    'combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323',
    'math: ∀x∈ℝ, ∃y: x²+y²≤1 ⇒ |x|≤1; ∑ᵢ aᵢ ≈ ∞; √2 ≠ π',
    '𝐀𝐁𝐂 𝒜ℬ𝒞 𝔄𝔅ℭ 𝟘𝟙𝟚 ⓐⓑⓒ ①②③ Ⅻ ½ ¾',
    'ＦＵＬＬＷＩＤＴＨ　ＡＳＣＩＩ！＂＃＄％',
    'ᚠᚢᚦᚨᚱᚲ ᛏᛒᛖᛗ 𐌰𐌱𐌲 ꦗꦮ',
];

const EMOJI = [
    '😀', '😂🤣', '❤️', '👍', '👍🏻', '👍🏼', '👍🏽', '👍🏾', '👍🏿',
    '👨‍👩‍👧‍👦', '👩🏽‍💻', '🧑🏿‍🚀', '👨‍❤️‍💋‍👨', '🏳️‍🌈', '🏴‍☠️',
    '🇯🇵', '🇺🇸🇬🇧🇫🇷', '🇩🇪', '🏴󠁧󠁢󠁳󠁣󠁴󠁿',
    '1️⃣', '#️⃣', '©️', '™', '☺︎', '✔️', '⚠️',
    '🙂 hello 🙃', 'done ✅', '🔥🔥🔥', '🎉🎊', '🤖 AI',
];

const DIGIT_MIXES = [
    'v1.2.3', '3.14159', '1,234,567.89', '0x1F', '0b1011', '2024-01-01', '12:30:45', '$1,000.00',
    '100%', '-42', '+7', '1e10', '6.02e23', 'abc123def', 'x86_64', 'mp3', 'h264', 'A1B2C3',
    '192.168.0.1', '555-0123', '(555) 123-4567', '#42', 'No.7', '4th', '21st', '1/2', '3:1',
    '٠١٢٣٤٥٦٧٨٩', '०१२३४५६७८९', '１２３４５', '²³¹', '½⅓¼', 'ⅠⅡⅢⅣ', '①②', '๑๒๓', '𝟏𝟐𝟑',
];

const SPECIAL = [
    '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜▁pad▁｜>', '<｜fim▁hole｜>',
    '<｜fim▁begin｜>', '<｜fim▁end｜>', '<｜User｜>', '<｜Assistant｜>', '<|EOT|>',
    '<｜tool▁calls▁begin｜>', '<｜tool▁calls▁end｜>', '<｜tool▁call▁begin｜>', '<｜tool▁call▁end｜>',
    '<｜tool▁outputs▁begin｜>', '<｜tool▁outputs▁end｜>', '<｜tool▁output▁begin｜>',
    '<｜tool▁output▁end｜>', '<｜tool▁sep｜>',
    '<｜place▁holder▁no▁0｜>', '<｜place▁holder▁no▁17｜>', '<｜place▁holder▁no▁255｜>',
    '<｜place▁holder▁no▁799｜>',
];

const LOOKALIKE = [
    '<｜User|>', '<|User|>', '<|User｜>', '<｜User', 'User｜>', '｜User｜', '<｜user｜>', '<｜USER｜>',
    '<｜begin_of_sentence｜>', '<|begin▁of▁sentence|>', '<｜begin▁of▁sentence｜', '<｜begin of sentence｜>',
    '<<｜User｜>>', '<｜User｜｜>', '<｜ User｜>', '<｜User ｜>', '＜｜User｜＞', '<｜Assistant|>',
    '<|eot|>', '<|EOT|', '|EOT|>', '< |EOT|>', '<|EOT |>', '<｜EOT｜>',
    '<｜place▁holder▁no▁800｜>', '<｜place▁holder▁no▁017｜>', '<｜place▁holder▁no▁-1｜>',
    '<｜place_holder_no_17｜>', '<｜tool▁call▁begin', '<｜tool▁callbegin｜>', '<｜tool▁call▁begin｜ >',
    '<think>', '</think>', '<|im_start|>', '<|endoftext|>', '<s>', '</s>', '[INST]',
    '▁', '｜', '<｜', '｜>', '<｜｜>', '<｜▁｜>',
];

const UNUSUAL_WS = [
    '\u00a0', '\u2028', '\u2029', '\u3000', '\u0085', '\ufeff', '\u200b', '\u2009', '\u1680',
    '\u202f', '\u205f', '\u000b', '\u000c', '\u180e', '\u200d', '\u2060',
];

const SEPARATORS = ['', ' ', ' ', ' ', '\n', '\n\n', '\t', '  ', '\r\n', ', ', '. ', '\n    ', '\r'];

// Invalid UTF-8 byte sequences (each a "maximal subpart" case of the WHATWG decoder or a
// combination of them).
const INVALID = [
    [0x80], [0xbf], [0x80, 0x80, 0x80], [0xc0], [0xc1], [0xc0, 0x80], [0xc1, 0xbf],
    [0xe0, 0x80, 0x80], [0xe0, 0x9f, 0xbf], [0xed, 0xa0, 0x80], [0xed, 0xbf, 0xbf],
    [0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80], // CESU-8 surrogate pair of U+1F600
    [0xf0, 0x80, 0x80, 0x80], [0xf0, 0x8f, 0xbf, 0xbf], [0xf4, 0x90, 0x80, 0x80],
    [0xf5], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xfc, 0x84, 0x80, 0x80, 0x80, 0x80], [0xfe], [0xff],
    [0xfe, 0xff], [0xff, 0xfe],
    [0xc3], [0xe4], [0xe4, 0xb8], [0xf0], [0xf0, 0x9f], [0xf0, 0x9f, 0x98], [0xf4, 0x8f, 0xbf],
    [0xe4, 0xb8, 0xe4, 0xb8, 0xad], // truncated then complete
    [0xc3, 0xc3, 0xa9], [0xe2, 0x82], [0xf0, 0x9f, 0x98, 0x41], [0xc2, 0x41], [0xe0, 0xa0, 0x41],
];

const CONTROL = ['\u0000', '\u0001', '\u0007', '\u001b', '\u001f', '\u007f', '\u0080', '\u009f'];

// ---- generators -----------------------------------------------------------------------------
function randomDigits(rng, n) {
    let s = String(rng.int(1, 9));
    if (rng.chance(0.15)) s = '0';
    while (s.length < n) s += String(rng.int(0, 9));
    return s.slice(0, n);
}

// Random code point from a broad set of ranges (never a surrogate: the JS string and its UTF-8
// bytes stay well-formed).
const CP_RANGES = [
    [0x20, 0x7e, 30], [0xa0, 0xff, 6], [0x100, 0x24f, 5], [0x300, 0x36f, 3], [0x370, 0x3ff, 3],
    [0x400, 0x4ff, 4], [0x590, 0x5ff, 2], [0x600, 0x6ff, 3], [0x900, 0x97f, 2], [0xe00, 0xe7f, 2],
    [0x1100, 0x11ff, 1], [0x1e00, 0x1eff, 2], [0x2000, 0x206f, 3], [0x2070, 0x209f, 1],
    [0x20a0, 0x20cf, 1], [0x2100, 0x214f, 1], [0x2150, 0x218f, 1], [0x2190, 0x23ff, 2],
    [0x2460, 0x24ff, 1], [0x2500, 0x27bf, 2], [0x3000, 0x303f, 2], [0x3040, 0x30ff, 4],
    [0x3400, 0x4dbf, 2], [0x4e00, 0x9fff, 10], [0xa000, 0xa4cf, 1], [0xac00, 0xd7a3, 5],
    [0xe000, 0xf8ff, 1], [0xf900, 0xfaff, 1], [0xfb00, 0xfdff, 1], [0xfe00, 0xfe6f, 1],
    [0xff00, 0xffef, 3], [0xfff0, 0xffff, 1], [0x10000, 0x1007f, 1], [0x1d400, 0x1d7ff, 2],
    [0x1f300, 0x1faff, 6], [0x20000, 0x2a6df, 2], [0xe0000, 0xe007f, 1], [0x10fff0, 0x10ffff, 1],
];
const CP_TOTAL = CP_RANGES.reduce((a, r) => a + r[2], 0);

// Code points assigned by Unicode 15.0, from Debian's unicode-data (DerivedAge.txt). Hugging
// Face tokenizers' regex engine (Oniguruma 6.9.8) and dsinfer use Unicode 15.0 tables; Node's
// own tables are those of its ICU (15.0 on Debian 12's Node 18, 17.0 on Node 20.20), so a code
// point assigned after 15.0 would make the JS reference depend on the Node version. Such code
// points are drawn again; the decision uses only the file, so the corpus is the same on every
// Node. Unassigned code points stay in through the noncharacters, which are never assigned.
const UCD_AGE = process.env.DSINFER_UCD_AGE || '/usr/share/unicode/DerivedAge.txt';
const ASSIGNED_15 = (() => {
    let text;
    try {
        text = fs.readFileSync(UCD_AGE, 'utf8');
    } catch (e) {
        throw new Error(`gen_corpus: cannot read ${UCD_AGE} (Debian package unicode-data; run scripts/setup.sh): ${e.message}`);
    }
    const ranges = [];
    for (const line of text.split('\n')) {
        const m = line.match(/^([0-9A-F]+)(?:\.\.([0-9A-F]+))?\s*;\s*(\d+)\.(\d+)/);
        if (!m || +m[3] > 15 || (+m[3] === 15 && +m[4] > 0)) continue;
        ranges.push([parseInt(m[1], 16), m[2] ? parseInt(m[2], 16) : parseInt(m[1], 16)]);
    }
    return ranges.sort((a, b) => a[0] - b[0]);
})();
function assignedBy15(cp) {
    let lo = 0, hi = ASSIGNED_15.length - 1;
    while (lo <= hi) {
        const mid = (lo + hi) >> 1, [a, b] = ASSIGNED_15[mid];
        if (cp < a) hi = mid - 1;
        else if (cp > b) lo = mid + 1;
        else return true;
    }
    return false;
}
const isNoncharacter = (cp) => (cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe;

function randomCodePoint(rng) {
    for (;;) {
        let w = rng.next() * CP_TOTAL, cp = 0x41;
        for (const [lo, hi, weight] of CP_RANGES) {
            if (w < weight) {
                cp = rng.int(lo, hi);
                break;
            }
            w -= weight;
        }
        if (assignedBy15(cp) || isNoncharacter(cp)) return cp;
    }
}
function randomUnicode(rng, n) {
    let s = '';
    for (let i = 0; i < n; i++) s += String.fromCodePoint(randomCodePoint(rng));
    return s;
}

function whitespaceRun(rng) {
    const kinds = [
        () => ' '.repeat(rng.int(1, 80)),
        () => '\n'.repeat(rng.int(1, 40)),
        () => '\t'.repeat(rng.int(1, 20)),
        () => '\r\n'.repeat(rng.int(1, 20)),
        () => ' \n'.repeat(rng.int(1, 10)),
        () => '\n '.repeat(rng.int(1, 10)),
        () => ' '.repeat(rng.int(1, 8)) + '\n'.repeat(rng.int(1, 5)) + ' '.repeat(rng.int(0, 8)),
        () => {
            let s = '';
            const n = rng.int(1, 30);
            for (let i = 0; i < n; i++) s += rng.pick([' ', '\t', '\n', '\r', '\r\n', ...UNUSUAL_WS]);
            return s;
        },
        () => rng.pick(UNUSUAL_WS).repeat(rng.int(1, 6)),
    ];
    return rng.pick(kinds)();
}

function numberFragment(rng) {
    const k = rng.int(0, 7);
    if (k === 0) return randomDigits(rng, rng.int(1, 40));
    if (k === 1) return rng.pick(DIGIT_MIXES);
    if (k === 2) return 'abc' + randomDigits(rng, rng.int(1, 12)) + rng.pick(['', 'xyz', '.', 'px', '%']);
    if (k === 3) return randomDigits(rng, rng.int(1, 6)) + rng.pick(['.', ',', ':', '-', '/', ' ']) + randomDigits(rng, rng.int(1, 6));
    if (k === 4) return rng.pick(['$', '€', '£', '¥', '#', 'v', 'x', '+', '-', '(']) + randomDigits(rng, rng.int(1, 9));
    if (k === 5) return randomDigits(rng, rng.int(1, 5)) + rng.pick(['st', 'nd', 'rd', 'th', 'km', 'GB', '中', '号', 'は']);
    if (k === 6) {
        let s = '';
        const n = rng.int(2, 6);
        for (let i = 0; i < n; i++) s += randomDigits(rng, rng.int(1, 4)) + rng.pick([',', '.', ' ', '', '_']);
        return s;
    }
    return rng.pick(DIGIT_MIXES) + randomDigits(rng, rng.int(1, 8));
}

const POOLS = {
    prose: (rng) => rng.pick(PROSE),
    code: (rng) => rng.pick(CODE),
    cjk: (rng) => rng.pick(CJK),
    scripts: (rng) => rng.pick(SCRIPTS),
    emoji: (rng) => rng.pick(EMOJI),
    numbers: numberFragment,
    whitespace: whitespaceRun,
    special: (rng) => rng.pick(SPECIAL),
    lookalike: (rng) => rng.pick(LOOKALIKE),
    unicode: (rng) => randomUnicode(rng, rng.int(1, 24)),
    control: (rng) => rng.pick(CONTROL).repeat(rng.int(1, 3)),
    word: (rng) => {
        // a slice of a prose/code/script fragment: cuts words and lines at odd places
        const src = rng.pick([PROSE, CODE, SCRIPTS, CJK]);
        const s = Array.from(rng.pick(src));
        const a = rng.int(0, s.length - 1);
        return s.slice(a, a + rng.int(1, 16)).join('');
    },
};
const POOL_NAMES = Object.keys(POOLS);

// A theme is a weighted set of pools one input draws its fragments from.
const THEMES = [
    ['prose', { prose: 6, word: 2, numbers: 1, whitespace: 1 }],
    ['code', { code: 6, word: 2, whitespace: 2, numbers: 1 }],
    ['cjk', { cjk: 6, numbers: 1, prose: 1, emoji: 1, word: 1 }],
    ['scripts', { scripts: 6, word: 2, numbers: 1, whitespace: 1 }],
    ['emoji', { emoji: 6, prose: 1, cjk: 1, word: 1 }],
    ['numbers', { numbers: 8, prose: 1, word: 1, whitespace: 1 }],
    ['whitespace', { whitespace: 6, word: 3, prose: 1 }],
    ['special', { special: 4, prose: 2, word: 2, code: 1, cjk: 1, whitespace: 1 }],
    ['lookalike', { lookalike: 4, special: 1, word: 2, prose: 1 }],
    ['unicode', { unicode: 6, whitespace: 1, numbers: 1 }],
    ['control', { control: 2, prose: 2, word: 2, whitespace: 1 }],
    ['mixed', Object.fromEntries(POOL_NAMES.map((n) => [n, 1]))],
];

function weightedPick(rng, weights) {
    const entries = Object.entries(weights);
    let total = 0;
    for (const [, w] of entries) total += w;
    let x = rng.next() * total;
    for (const [k, w] of entries) {
        if (x < w) return k;
        x -= w;
    }
    return entries[entries.length - 1][0];
}

function composeString(rng, weights, nFrag) {
    let s = '';
    for (let i = 0; i < nFrag; i++) {
        if (i > 0) s += rng.chance(0.15) ? whitespaceRun(rng) : rng.pick(SEPARATORS);
        s += POOLS[weightedPick(rng, weights)](rng);
    }
    return s;
}

// Splices invalid sequences into valid bytes at random byte offsets (which may also cut a
// multi-byte character: another kind of truncated sequence).
function corrupt(rng, buf, nInsert) {
    let bytes = Array.from(buf);
    for (let i = 0; i < nInsert; i++) {
        const bad = rng.pick(INVALID);
        const at = rng.chance(0.2) ? (rng.chance(0.5) ? 0 : bytes.length) : rng.int(0, bytes.length);
        bytes = bytes.slice(0, at).concat(bad, bytes.slice(at));
    }
    return Buffer.from(bytes);
}

function generateCorpus(seed = DEFAULT_SEED) {
    const rng = makeRng(seed);
    const out = [];
    const seen = new Set();
    const add = (kind, data) => {
        const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8');
        const key = bytes.toString('hex');
        if (seen.has(key)) return;
        seen.add(key);
        out.push({ kind, bytes });
    };

    // -- fixed edge cases ------------------------------------------------------------------
    add('empty', '');
    for (const list of [PROSE, CODE, CJK, SCRIPTS, EMOJI, DIGIT_MIXES, SPECIAL, LOOKALIKE, UNUSUAL_WS, CONTROL])
        for (const s of list) add('fixed', s);
    for (let c = 0; c < 128; c++) add('ascii', String.fromCharCode(c));
    for (let n = 1; n <= 40; n++) {
        const d = randomDigits(rng, n);
        add('digits', d);
        add('digits', 'x' + d);
        add('digits', d + 'x');
        add('digits', ' ' + d + ' ');
        add('digits', 'v' + d + '.' + randomDigits(rng, (n % 7) + 1));
        add('digits', d.split('').join(rng.pick([',', '.', ' '])));
    }
    for (const n of [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100, 255, 256, 1000]) {
        add('ws', ' '.repeat(n));
        add('ws', '\n'.repeat(n));
        add('ws', 'a' + ' '.repeat(n) + 'b');
        add('ws', 'a' + ' '.repeat(n));
        add('ws', ' '.repeat(n) + 'a');
        add('ws', 'x\n' + ' '.repeat(n) + 'y');
        add('ws', '\t'.repeat(n) + 'z');
        add('ws', '\r\n'.repeat(Math.min(n, 64)));
    }
    for (const w of UNUSUAL_WS) {
        add('ws', 'a' + w + 'b');
        add('ws', w + 'start');
        add('ws', 'end' + w);
        add('ws', w + w + w);
        add('ws', 'a ' + w + ' b');
        add('ws', 'a' + w + '\n' + w + 'b');
    }
    for (const t of SPECIAL) {
        add('special', 'Hello' + t + 'world');
        add('special', 'Hello ' + t + ' world');
        add('special', t + t);
        add('special', ' ' + t);
        add('special', t + '\n');
        add('special', '中文' + t + '中文');
        add('special', '123' + t + '456');
    }
    add('special', SPECIAL.join(''));
    add('special', SPECIAL.join(' '));
    add('special', '<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>');
    add('special', '<｜<｜User｜>｜>');
    add('special', '<<|EOT|>>');
    add('special', '<｜User｜<｜User｜>>');
    for (const t of LOOKALIKE) {
        add('lookalike', 'text' + t + 'text');
        add('lookalike', ' ' + t + ' ');
        add('lookalike', t + '<｜User｜>');
    }
    for (const bad of INVALID) {
        add('invalid', Buffer.from(bad));
        add('invalid', Buffer.concat([Buffer.from('abc'), Buffer.from(bad), Buffer.from('def')]));
        add('invalid', Buffer.concat([Buffer.from('中文'), Buffer.from(bad)]));
        add('invalid', Buffer.concat([Buffer.from(bad), Buffer.from(' 123 <｜User｜>')]));
        add('invalid', Buffer.concat([Buffer.from('  '), Buffer.from(bad), Buffer.from(bad), Buffer.from('\n')]));
    }
    for (let b = 0x80; b <= 0xff; b++) add('invalid', Buffer.from([0x41, b, 0x42]));
    // A valid multi-byte character cut at every byte position.
    for (const ch of ['é', '中', '😀', '👨‍👩‍👧', '<｜User｜>']) {
        const b = Buffer.from(ch);
        for (let i = 1; i < b.length; i++) {
            add('invalid', Buffer.concat([Buffer.from('x'), b.subarray(0, i)]));
            add('invalid', Buffer.concat([b.subarray(i), Buffer.from('y')]));
        }
    }

    // -- random combinations ----------------------------------------------------------------
    for (let i = 0; i < 1700; i++) {
        const [name, weights] = rng.pick(THEMES);
        const nFrag = rng.chance(0.3) ? 1 : rng.int(2, rng.chance(0.2) ? 40 : 10);
        add('rand-' + name, composeString(rng, weights, nFrag));
    }
    for (let i = 0; i < 350; i++) {
        const [name, weights] = rng.pick(THEMES);
        const s = composeString(rng, weights, rng.int(1, 8));
        add('rand-invalid-' + name, corrupt(rng, Buffer.from(s, 'utf8'), rng.int(1, 4)));
    }
    // raw random bytes (mostly invalid)
    for (let i = 0; i < 60; i++) {
        const n = rng.int(1, 64);
        const b = Buffer.alloc(n);
        for (let j = 0; j < n; j++) b[j] = rng.chance(0.5) ? rng.int(0x80, 0xff) : rng.int(0x00, 0xff);
        add('random-bytes', b);
    }

    // -- long inputs --------------------------------------------------------------------------
    const long = (kind, target, weights, corruptEvery) => {
        let s = '';
        while (Buffer.byteLength(s) < target) s += composeString(rng, weights, 20) + rng.pick(SEPARATORS);
        let b = Buffer.from(s, 'utf8');
        if (corruptEvery) b = corrupt(rng, b, Math.floor(b.length / corruptEvery));
        add(kind, b);
    };
    const ALL = Object.fromEntries(POOL_NAMES.map((n) => [n, 1]));
    long('long-mixed', 100000, ALL, 0);
    long('long-mixed', 110000, ALL, 0);
    long('long-mixed-invalid', 100000, ALL, 5000);
    long('long-prose-code', 100000, { prose: 3, code: 3, whitespace: 1, numbers: 1 }, 0);
    long('long-cjk', 100000, { cjk: 5, scripts: 2, emoji: 1, numbers: 1 }, 0);
    long('long-special', 60000, { special: 2, lookalike: 2, prose: 2, word: 2 }, 0);
    // single pre-tokens tens of thousands of characters long (BPE on one huge word)
    add('long-run', 'a'.repeat(30000));
    add('long-run', ' '.repeat(30000) + 'x');
    add('long-run', '\n'.repeat(20000));
    add('long-run', randomDigits(rng, 30000));
    add('long-run', '中'.repeat(10000) + '文字'.repeat(5000));
    add('long-run', '😀'.repeat(5000));
    add('long-run', 'ab'.repeat(15000));

    return out;
}

module.exports = { generateCorpus, makeRng, DEFAULT_SEED, SPECIAL, LOOKALIKE, PROSE, CODE, CJK, SCRIPTS, EMOJI };

if (require.main === module) {
    const args = process.argv.slice(2);
    let seed = DEFAULT_SEED;
    let file = null;
    for (let i = 0; i < args.length; i++) {
        if (args[i] === '--seed') seed = Number(args[++i]);
        else if (args[i] === '-h' || args[i] === '--help') {
            console.log('usage: node gen_corpus.js OUT_FILE [--seed N]');
            process.exit(0);
        } else file = args[i];
    }
    if (!file || !Number.isInteger(seed)) {
        console.error('usage: node gen_corpus.js OUT_FILE [--seed N]');
        process.exit(2);
    }
    const corpus = generateCorpus(seed);
    fs.writeFileSync(file, corpus.map((c) => c.bytes.toString('hex')).join('\n') + '\n');
    const total = corpus.reduce((a, c) => a + c.bytes.length, 0);
    console.log(`wrote ${corpus.length} inputs (${total} bytes) to ${file}`);
}
