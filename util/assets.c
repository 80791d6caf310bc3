/* assets.c - lookup in the generated table of built-in files. */
#include "util/assets.h"
#include <string.h>

const mp_asset *mp_asset_find(const char *name) {
    for (const mp_asset *a = mp_assets; a->name; a++)
        if (strcmp(a->name, name) == 0) return a;
    return NULL;
}
