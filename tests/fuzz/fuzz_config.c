/* libFuzzer target for config.json validation (ds_config_from_json).
 *
 * The bytes are parsed as JSON by jansson (duplicates refused, as the engine loads it); any
 * object is handed to ds_config_from_json, which must refuse bad values with an error and never
 * crash, leak or hit undefined behaviour. An accepted config is also walked (layer kinds,
 * printing) so that values it let through are exercised. */
#include "core/core.h"
#include "io/io.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds_log_set_level(DS_LOG_ERROR);
    devnull = fopen("/dev/null", "w");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    json_error_t err;
    json_t *root = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &err);
    if (!root) return 0;
    if (json_is_object(root)) {
        ds_config cfg;
        memset(&cfg, 0, sizeof cfg);
        if (ds_config_from_json(root, "fuzz", &cfg) == 0) {
            int64_t n = cfg.n_layers < 4096 ? cfg.n_layers : 4096;
            int moe = 0;
            for (int64_t l = 0; l < n; l++) moe += ds_config_layer_is_moe(&cfg, l);
            (void)moe;
            if (devnull) ds_config_print(&cfg, devnull);
        }
    }
    json_decref(root);
    return 0;
}
