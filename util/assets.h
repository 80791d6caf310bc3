/* assets.h - files built into the binary (dashboard, OpenAPI document). */
#ifndef MP_UTIL_ASSETS_H
#define MP_UTIL_ASSETS_H
#include <stddef.h>
typedef struct mp_asset {
    const char *name;
    const unsigned char *data; /* NUL-terminated for convenience */
    size_t size;
} mp_asset;
extern const mp_asset mp_assets[]; /* terminated by a NULL name */
const mp_asset *mp_asset_find(const char *name);
#endif
