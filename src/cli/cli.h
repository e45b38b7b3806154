/* cli: the `dsinfer` subcommands. Each takes the arguments after its name (argv[0] is the
 * subcommand name) and returns the process exit status: 0 ok, 1 runtime error, 2 usage error.
 * Results go to stdout; logs, progress and errors to stderr. */
#ifndef DS_CLI_H
#define DS_CLI_H

#include <stdint.h>

int ds_cmd_generate(int argc, char **argv);
int ds_cmd_make_tiny(int argc, char **argv);
int ds_cmd_info(int argc, char **argv);
int ds_cmd_bench_model(int argc, char **argv);
int ds_cmd_tokenize(int argc, char **argv);
int ds_cmd_detokenize(int argc, char **argv);
int ds_cmd_chat_template(int argc, char **argv);

/* Helpers shared by the subcommands. */
/* Parses "1,2,3" or "1 2 3" into a malloc'd array; -1 and a message on bad input. */
int ds_cli_parse_ids(const char *s, int32_t **ids, int64_t *n);
/* The directory of the built-in demo model (DSINFER_MODEL env, else the build's demo-model). */
const char *ds_cli_default_model(void);
/* The directory of the real DeepSeek-V3 tokenizer files (DSINFER_TOKENIZER_DIR env, else the
 * path scripts/setup.sh fetched them to). */
const char *ds_cli_default_tokenizer_dir(void);

#endif
