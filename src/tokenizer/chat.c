/* chat: the DeepSeek chat templates (V3, R1, R1-0528), rendered in C byte-identically to what
 * their Jinja text in tokenizer_config.json produces, and recognised from that text.
 *
 * We do not interpret Jinja. Each known template is a small state machine (the `ns` namespace
 * of the template: is_first, is_tool, is_output_first, system prompt, is_last_user) and each
 * renderer below is a transcription of one template, branch by branch, quirks included:
 *  - V3 and R1 never reset ns.is_first, so only the first tool call of the whole conversation
 *    opens "<｜tool▁calls▁begin｜>"; every later one (also in later messages) is "\n"-joined.
 *  - V3 closes "<｜tool▁calls▁end｜>" after each non-first call and never after a lone call.
 *  - V3 and R1 never reset ns.is_output_first: only the first tool output of the conversation
 *    opens "<｜tool▁outputs▁begin｜>".
 *  - V3 renders an assistant's tool_calls only when content is null; R1 whenever the key
 *    "tool_calls" is present (then the content appears only before the first call, if at all).
 *  - R1 and R1-0528 drop everything up to the last "</think>" of assistant history content.
 * docs/chat.md lists the sources of the templates and every edge case.
 *
 * Errors mirror @huggingface/jinja (what the conformance test renders with): where the template
 * would concatenate null/undefined or iterate a non-list, we fail with DS_ERR_ARG naming
 * messages[i].field. Stricter than Jinja on purpose: an unknown or missing role (Jinja silently
 * skips the message) and non-string content/arguments (Jinja would stringify them). */
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the published template texts (see docs/chat.md) -------------------------------------- */
static const char TPL_V3[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = fals"
    "e %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_fi"
    "rst=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%"
    "- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prom"
    "pt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%-"
    " else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %"
    "}{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for m"
    "essage in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = fal"
    "se -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == '"
    "assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- fo"
    "r tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool"
    "▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['funct"
    "ion']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '`"
    "``' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜t"
    "ool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '"
    "\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁cal"
    "l▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%"
    "- endif %}{%- if message['role'] == 'assistant' and message['content'] is not no"
    "ne %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁"
    "of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + mes"
    "sage['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message["
    "'role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'"
    "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁outp"
    "ut▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁beg"
    "in｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- "
    "endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_gene"
    "ration_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}";

static const char TPL_R1[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = fals"
    "e %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_fi"
    "rst=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%"
    "- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prom"
    "pt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%-"
    " else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content']"
    " %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%-"
    " for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool"
    " = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'"
    "] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%-"
    " for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['co"
    "ntent'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + too"
    "l['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %"
    "}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin"
    "｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json"
    "' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{"
    "%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜"
    ">' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json'"
    " + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%"
    "- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%"
    "- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns."
    "is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}"
    "}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{"
    "% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- e"
    "ndif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns"
    ".is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['co"
    "ntent'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %"
    "}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- end"
    "if %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% e"
    "ndif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\"
    "n'}}{% endif %}";

static const char TPL_R1_0528[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = fals"
    "e %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_fi"
    "rst=true, system_prompt='', is_first_sp=true, is_last_user=false) %}{%- for mess"
    "age in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{"
    "% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_fi"
    "rst_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' "
    "+ message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns"
    ".system_prompt }}{%- for message in messages %}{% set content = message['content"
    "'] %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns"
    ".is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>' + content + "
    "'<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' %}{% if '</th"
    "ink>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{"
    "% endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] is def"
    "ined and message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = "
    "false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}{%- fo"
    "r tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if content is non"
    "e %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['argume"
    "nts'] if tool['function']['arguments'] is string else tool['function']['argument"
    "s'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{content + '<｜to"
    "ol▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['fun"
    "ction']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments'] if to"
    "ol['function']['arguments'] is string else tool['function']['arguments'] | tojso"
    "n) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true "
    "-%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + t"
    "ool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments"
    "'] if tool['function']['arguments'] is string else tool['function']['arguments']"
    " | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜t"
    "ool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assi"
    "stant' and (message['tool_calls'] is not defined or message['tool_calls'] is non"
    "e)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end"
    "｜>' + content + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'"
    "] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}{%"
    "- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + cont"
    "ent + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'"
    "\\n<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endi"
    "f %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if "
    "add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistan"
    "t｜>'}}{% endif %}";

/* ---- recognition ------------------------------------------------------------------------- */

/* Normalizes a template so that whitespace-only differences inside Jinja tags do not matter:
 * outside tags ({{ }}, {% %}, {# #}) every byte is kept (it is output); inside a tag, ASCII
 * whitespace is dropped except within string literals, which are kept verbatim. Returns a
 * malloc'd string (caller frees) or NULL when out of memory. */
static char *normalize(const char *t) {
    size_t n = strlen(t);
    char *o = malloc(n + 1), *w = o;
    if (!o) return NULL;
    size_t i = 0;
    while (i < n) {
        if (t[i] == '{' && (t[i + 1] == '{' || t[i + 1] == '%' || t[i + 1] == '#')) {
            char close = t[i + 1] == '{' ? '}' : t[i + 1];
            *w++ = t[i++];
            *w++ = t[i++];
            while (i < n) {
                char c = t[i];
                if (c == close && t[i + 1] == '}') {
                    *w++ = t[i++];
                    *w++ = t[i++];
                    break;
                }
                if (c == '\'' || c == '"') { /* a string literal, escapes included */
                    *w++ = t[i++];
                    while (i < n && t[i] != c) {
                        if (t[i] == '\\' && i + 1 < n) *w++ = t[i++];
                        *w++ = t[i++];
                    }
                    if (i < n) *w++ = t[i++];
                    continue;
                }
                if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
                    i++;
                    continue;
                }
                *w++ = t[i++];
            }
        } else {
            *w++ = t[i++];
        }
    }
    *w = '\0';
    return o;
}

static const struct {
    ds_chat_format f;
    const char *name, *text;
} known[] = {
    {DS_CHAT_V3, "v3", TPL_V3},
    {DS_CHAT_R1, "r1", TPL_R1},
    {DS_CHAT_R1_0528, "r1-0528", TPL_R1_0528},
};
#define N_KNOWN (sizeof known / sizeof known[0])

int ds_chat_detect(const char *chat_template, ds_chat_format *out) {
    if (!chat_template)
        return ds_err_set(DS_ERR_UNSUPPORTED, "no chat_template in tokenizer_config.json: pass "
                                              "--chat-template-format v3|r1|r1-0528");
    char *a = normalize(chat_template);
    if (!a) return ds_err_set(DS_ERR_NOMEM, "out of memory normalizing a chat template");
    for (size_t k = 0; k < N_KNOWN; k++) {
        char *b = normalize(known[k].text);
        if (!b) {
            free(a);
            return ds_err_set(DS_ERR_NOMEM, "out of memory normalizing a chat template");
        }
        int same = strcmp(a, b) == 0;
        free(b);
        if (same) {
            free(a);
            *out = known[k].f;
            return DS_OK;
        }
    }
    free(a);
    return ds_err_set(DS_ERR_UNSUPPORTED,
                      "the chat_template (%zu bytes) is not one of the DeepSeek templates this "
                      "build knows (V3, R1, R1-0528; see docs/chat.md); if the model was trained "
                      "on one of them, pass --chat-template-format v3|r1|r1-0528",
                      strlen(chat_template));
}

int ds_chat_format_parse(const char *name, ds_chat_format *out) {
    for (size_t k = 0; name && k < N_KNOWN; k++)
        if (!strcmp(name, known[k].name)) {
            *out = known[k].f;
            return DS_OK;
        }
    return ds_err_set(DS_ERR_ARG, "chat template format '%s': expected v3, r1 or r1-0528",
                      name ? name : "(null)");
}

const char *ds_chat_format_name(ds_chat_format f) {
    for (size_t k = 0; k < N_KNOWN; k++)
        if (known[k].f == f) return known[k].name;
    return "unknown";
}

/* ---- rendering --------------------------------------------------------------------------- */

#define BOS_TC "<｜tool▁calls▁begin｜>"
#define EOS_TC "<｜tool▁calls▁end｜>"
#define BOC "<｜tool▁call▁begin｜>"
#define EOC "<｜tool▁call▁end｜>"
#define SEP "<｜tool▁sep｜>"
#define BOS_TO "<｜tool▁outputs▁begin｜>"
#define EOS_TO "<｜tool▁outputs▁end｜>"
#define BOO "<｜tool▁output▁begin｜>"
#define EOO "<｜tool▁output▁end｜>"
#define USER "<｜User｜>"
#define ASST "<｜Assistant｜>"
#define EOS "<｜end▁of▁sentence｜>"

typedef struct {
    ds_buf *out;
    int err; /* first error: later appends are no-ops */
} sink;

static void put(sink *s, const char *p, size_t n) {
    if (!s->err) s->err = ds_buf_append(s->out, p, n);
}
static void puts_(sink *s, const char *p) {
    put(s, p, strlen(p));
}

/* A string view of a JSON string. */
typedef struct {
    const char *p;
    size_t n;
} str;

static const char *jtype(const json_t *v) {
    if (!v) return "missing";
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

/* messages[i].key as a string, or DS_ERR_ARG naming it (`why` says what the template does). */
static int get_str(const json_t *m, size_t i, const char *key, str *v) {
    const json_t *x = json_object_get(m, key);
    if (!json_is_string(x))
        return ds_err_set(DS_ERR_ARG, "messages[%zu].%s: expected a string, got %s", i, key,
                          jtype(x));
    v->p = json_string_value(x);
    v->n = json_string_length(x);
    return DS_OK;
}

/* The parts of messages[i].tool_calls[k] that the templates concatenate. For R1-0528 a
 * non-string `arguments` is serialized like Jinja's tojson (json.dumps with ", " and ": "):
 * *owned then holds the malloc'd text (caller frees). */
static int get_call(size_t i, const json_t *call, size_t k, int allow_json, str *type, str *name,
                    str *args, char **owned) {
    *owned = NULL;
    if (!json_is_object(call))
        return ds_err_set(DS_ERR_ARG, "messages[%zu].tool_calls[%zu]: expected an object, got %s",
                          i, k, jtype(call));
    const json_t *t = json_object_get(call, "type"), *fn = json_object_get(call, "function");
    if (!json_is_string(t))
        return ds_err_set(DS_ERR_ARG,
                          "messages[%zu].tool_calls[%zu].type: expected a string, got %s", i, k,
                          jtype(t));
    if (!json_is_object(fn))
        return ds_err_set(DS_ERR_ARG,
                          "messages[%zu].tool_calls[%zu].function: expected an object, got %s", i,
                          k, jtype(fn));
    const json_t *nm = json_object_get(fn, "name"), *ar = json_object_get(fn, "arguments");
    if (!json_is_string(nm))
        return ds_err_set(DS_ERR_ARG,
                          "messages[%zu].tool_calls[%zu].function.name: expected a string, got %s",
                          i, k, jtype(nm));
    type->p = json_string_value(t);
    type->n = json_string_length(t);
    name->p = json_string_value(nm);
    name->n = json_string_length(nm);
    if (json_is_string(ar)) {
        args->p = json_string_value(ar);
        args->n = json_string_length(ar);
        return DS_OK;
    }
    if (allow_json && ar && !json_is_null(ar)) {
        /* jansson's default (non-compact) separators are Python's ", " and ": " */
        char *s = json_dumps(ar, JSON_ENCODE_ANY | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
        if (!s) return ds_err_set(DS_ERR_NOMEM, "out of memory serializing tool arguments");
        *owned = s;
        args->p = s;
        args->n = strlen(s);
        return DS_OK;
    }
    return ds_err_set(DS_ERR_ARG,
                      "messages[%zu].tool_calls[%zu].function.arguments: expected a string "
                      "(JSON text), got %s",
                      i, k, jtype(ar));
}

/* "<｜tool▁call▁begin｜>type<｜tool▁sep｜>name\n```json\nargs\n```<｜tool▁call▁end｜>" */
static void put_call(sink *s, str type, str name, str args) {
    puts_(s, BOC);
    put(s, type.p, type.n);
    puts_(s, SEP);
    put(s, name.p, name.n);
    puts_(s, "\n```json\n");
    put(s, args.p, args.n);
    puts_(s, "\n```" EOC);
}

/* content.split('</think>')[-1]: what follows the last "</think>" (all of it when none). */
static str after_think(str c) {
    static const char tag[] = "</think>";
    const size_t tn = sizeof tag - 1;
    str r = c;
    for (size_t j = 0; j + tn <= c.n; j++)
        if (memcmp(c.p + j, tag, tn) == 0) {
            r.p = c.p + j + tn;
            r.n = c.n - j - tn;
            j += tn - 1;
        }
    return r;
}

enum { R_SYSTEM, R_USER, R_ASSISTANT, R_TOOL };

/* Checks the array and every role; collects the system prompt (all templates join the system
 * messages' contents with "\n\n", in order). */
static int prepass(const json_t *messages, int *roles, ds_buf *sys) {
    size_t i;
    const json_t *m;
    int first = 1;
    json_array_foreach(messages, i, m) {
        if (!json_is_object(m))
            return ds_err_set(DS_ERR_ARG, "messages[%zu]: expected an object, got %s", i, jtype(m));
        const json_t *r = json_object_get(m, "role");
        if (!json_is_string(r))
            return ds_err_set(DS_ERR_ARG, "messages[%zu].role: expected a string, got %s", i,
                              jtype(r));
        const char *rs = json_string_value(r);
        if (!strcmp(rs, "system"))
            roles[i] = R_SYSTEM;
        else if (!strcmp(rs, "user"))
            roles[i] = R_USER;
        else if (!strcmp(rs, "assistant"))
            roles[i] = R_ASSISTANT;
        else if (!strcmp(rs, "tool"))
            roles[i] = R_TOOL;
        else
            return ds_err_set(DS_ERR_ARG,
                              "messages[%zu].role: '%s' is not one of system, user, assistant, "
                              "tool",
                              i, rs);
        if (roles[i] == R_SYSTEM) {
            str c;
            int rc = get_str(m, i, "content", &c);
            if (rc) return rc;
            if (!first && (rc = ds_buf_append(sys, "\n\n", 2))) return rc;
            if ((rc = ds_buf_append(sys, c.p, c.n))) return rc;
            first = 0;
        }
    }
    return DS_OK;
}

/* The DeepSeek-V3 template (and, with r1 = 1, the DeepSeek-R1 one, which differs in the
 * assistant branches, the tool-output separator and the generation prompt). */
static int render_v3_r1(int r1, const json_t *msgs, const int *roles, sink *s, int agp) {
    int is_first = 0, is_tool = 0, is_output_first = 1, rc;
    size_t i;
    const json_t *m;
    json_array_foreach(msgs, i, m) {
        str c;
        switch (roles[i]) {
        case R_SYSTEM:
            break;
        case R_USER:
            is_tool = 0;
            if ((rc = get_str(m, i, "content", &c))) return rc;
            puts_(s, USER);
            put(s, c.p, c.n);
            break;
        case R_ASSISTANT: {
            const json_t *content = json_object_get(m, "content");
            const json_t *tcs = json_object_get(m, "tool_calls");
            /* V3: `content is none` (a JSON null; a missing key is undefined, not none).
             * R1: `'tool_calls' in message` (the key, whatever its value). */
            int calls = r1 ? tcs != NULL : json_is_null(content);
            if (calls) {
                is_tool = 0;
                if (!json_is_array(tcs))
                    return ds_err_set(DS_ERR_ARG,
                                      "messages[%zu].tool_calls: expected an array (%s), got %s", i,
                                      r1 ? "the key is present"
                                         : "content is null, so the template iterates tool_calls",
                                      jtype(tcs));
                size_t k;
                const json_t *call;
                json_array_foreach(tcs, k, call) {
                    str ty, nm, ar;
                    char *owned;
                    if ((rc = get_call(i, call, k, 0, &ty, &nm, &ar, &owned))) return rc;
                    if (!is_first) {
                        if (r1 && !json_is_null(content)) {
                            if ((rc = get_str(m, i, "content", &c))) return rc;
                            puts_(s, ASST);
                            put(s, c.p, c.n);
                            puts_(s, BOS_TC);
                        } else {
                            puts_(s, ASST BOS_TC);
                        }
                        put_call(s, ty, nm, ar);
                        is_first = 1;
                    } else {
                        puts_(s, "\n");
                        put_call(s, ty, nm, ar);
                        if (!r1) puts_(s, EOS_TC EOS);
                    }
                }
                if (r1) puts_(s, EOS_TC EOS);
            } else {
                if ((rc = get_str(m, i, "content", &c))) return rc;
                if (is_tool) {
                    puts_(s, EOS_TO);
                    put(s, c.p, c.n);
                    puts_(s, EOS);
                    is_tool = 0;
                } else {
                    if (r1) c = after_think(c);
                    puts_(s, ASST);
                    put(s, c.p, c.n);
                    puts_(s, EOS);
                }
            }
            break;
        }
        case R_TOOL:
            is_tool = 1;
            if ((rc = get_str(m, i, "content", &c))) return rc;
            if (is_output_first) {
                puts_(s, BOS_TO BOO);
                is_output_first = 0;
            } else {
                puts_(s, r1 ? BOO : "\n" BOO);
            }
            put(s, c.p, c.n);
            puts_(s, EOO);
            break;
        }
        if (s->err) return s->err;
    }
    if (is_tool) puts_(s, EOS_TO);
    if (agp && !is_tool) puts_(s, r1 ? ASST "<think>\n" : ASST);
    return s->err;
}

/* The DeepSeek-R1-0528 template: the user turn already opens "<｜Assistant｜>", assistant
 * content follows it directly, tool state is reset per assistant tool-call message. */
static int render_r1_0528(const json_t *msgs, const int *roles, sink *s, int agp) {
    int is_first = 0, is_tool = 0, is_output_first = 1, is_last_user = 0, rc;
    size_t i;
    const json_t *m;
    json_array_foreach(msgs, i, m) {
        str c;
        switch (roles[i]) {
        case R_SYSTEM:
            break;
        case R_USER:
            is_tool = 0;
            is_first = 0;
            is_last_user = 1;
            if ((rc = get_str(m, i, "content", &c))) return rc;
            puts_(s, USER);
            put(s, c.p, c.n);
            puts_(s, ASST);
            break;
        case R_ASSISTANT: {
            /* `'</think>' in content` runs for every assistant message: content must be a
             * string even next to tool_calls (null fails in Jinja). */
            if ((rc = get_str(m, i, "content", &c))) return rc;
            c = after_think(c);
            const json_t *tcs = json_object_get(m, "tool_calls");
            is_last_user = 0;
            if (tcs && !json_is_null(tcs)) { /* `is defined and is not none` */
                if (!json_is_array(tcs))
                    return ds_err_set(DS_ERR_ARG,
                                      "messages[%zu].tool_calls: expected an array, "
                                      "got %s",
                                      i, jtype(tcs));
                if (is_tool) puts_(s, EOS_TO);
                is_first = 0;
                is_tool = 0;
                is_output_first = 1;
                size_t k;
                const json_t *call;
                json_array_foreach(tcs, k, call) {
                    str ty, nm, ar;
                    char *owned;
                    if ((rc = get_call(i, call, k, 1, &ty, &nm, &ar, &owned))) return rc;
                    if (!is_first) {
                        put(s, c.p, c.n);
                        puts_(s, BOS_TC);
                        is_first = 1;
                    } else {
                        puts_(s, "\n");
                    }
                    put_call(s, ty, nm, ar);
                    free(owned);
                }
                puts_(s, EOS_TC EOS);
            } else if (is_tool) {
                puts_(s, EOS_TO);
                put(s, c.p, c.n);
                puts_(s, EOS);
                is_tool = 0;
            } else {
                put(s, c.p, c.n);
                puts_(s, EOS);
            }
            break;
        }
        case R_TOOL:
            is_last_user = 0;
            is_tool = 1;
            if ((rc = get_str(m, i, "content", &c))) return rc;
            if (is_output_first) {
                puts_(s, BOS_TO BOO);
                is_output_first = 0;
            } else {
                puts_(s, "\n" BOO);
            }
            put(s, c.p, c.n);
            puts_(s, EOO);
            break;
        }
        if (s->err) return s->err;
    }
    if (is_tool) puts_(s, EOS_TO);
    if (agp && !is_last_user && !is_tool) puts_(s, ASST);
    return s->err;
}

int ds_chat_render(ds_chat_format f, const char *bos_token, const json_t *messages,
                   int add_generation_prompt, ds_buf *out) {
    if (!json_is_array(messages))
        return ds_err_set(DS_ERR_ARG, "messages: expected an array, got %s", jtype(messages));
    if (f != DS_CHAT_V3 && f != DS_CHAT_R1 && f != DS_CHAT_R1_0528)
        return ds_err_set(DS_ERR_ARG, "chat format %d is not a ds_chat_format", (int)f);
    size_t n = json_array_size(messages), start = out->len;
    int *roles = malloc((n ? n : 1) * sizeof *roles);
    if (!roles) return ds_err_set(DS_ERR_NOMEM, "out of memory (%zu messages)", n);
    ds_buf sys = {0};
    sink s = {out, 0};
    int rc = prepass(messages, roles, &sys);
    if (!rc) {
        puts_(&s, bos_token ? bos_token : "");
        if (sys.len) put(&s, sys.data, sys.len);
        rc = s.err;
    }
    if (!rc) {
        if (f == DS_CHAT_R1_0528)
            rc = render_r1_0528(messages, roles, &s, add_generation_prompt);
        else
            rc = render_v3_r1(f == DS_CHAT_R1, messages, roles, &s, add_generation_prompt);
    }
    if (rc && out->data) { /* leave out as it was */
        out->len = start;
        out->data[start] = '\0';
    }
    free(roles);
    ds_buf_free(&sys);
    return rc;
}
