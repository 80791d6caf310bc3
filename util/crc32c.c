/*
 * crc32c.c - CRC-32C, table-driven or SSE4.2 (three streams joined by a
 * tabulated zero-block shift). See crc32c.h.
 */
#include "util/crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u /* reflected Castagnoli */

static uint32_t sw_update(const uint32_t *tab, uint32_t crc, const unsigned char *p, size_t n) {
    while (n--)
        crc = tab[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t hw_one(uint32_t crc, const unsigned char *p,
                                                         size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}

static uint32_t shift(const crc32c_tab *t, uint32_t v) {
    return t->shift[0][v & 0xFF] ^ t->shift[1][(v >> 8) & 0xFF] ^ t->shift[2][(v >> 16) & 0xFF] ^
           t->shift[3][v >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t hw_update(const crc32c_tab *t, uint32_t crc,
                                                            const unsigned char *p, size_t n) {
    while (n >= 3 * CRC32C_LANE) {
        uint64_t a = crc, b = 0, c = 0;
        const unsigned char *p1 = p + CRC32C_LANE, *p2 = p + 2 * CRC32C_LANE;
        for (size_t i = 0; i < CRC32C_LANE; i += 8) {
            uint64_t x, y, z;
            memcpy(&x, p + i, 8);
            memcpy(&y, p1 + i, 8);
            memcpy(&z, p2 + i, 8);
            a = __builtin_ia32_crc32di(a, x);
            b = __builtin_ia32_crc32di(b, y);
            c = __builtin_ia32_crc32di(c, z);
        }
        /* register(A || B || C) = shift(shift(a) ^ b) ^ c */
        crc = shift(t, shift(t, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * CRC32C_LANE;
        n -= 3 * CRC32C_LANE;
    }
    return hw_one(crc, p, n);
}
#endif

void crc32c_init(crc32c_tab *t) {
    memset(t, 0, sizeof *t);
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        t->sw[i] = c;
    }
#if defined(__x86_64__)
    t->hw = __builtin_cpu_supports("sse4.2");
#endif
    /* The register after LANE zero bytes, for each single-bit start; by
     * linearity a byte's entry is the XOR of its bits' entries. */
    static const unsigned char zeros[CRC32C_LANE];
    uint32_t basis[32];
    for (int b = 0; b < 32; b++)
        basis[b] = sw_update(t->sw, 1u << b, zeros, sizeof zeros);
    for (int k = 0; k < 4; k++)
        for (uint32_t v = 0; v < 256; v++) {
            uint32_t s = 0;
            for (int b = 0; b < 8; b++)
                if (v & (1u << b)) s ^= basis[8 * k + b];
            t->shift[k][v] = s;
        }
}

uint32_t crc32c_update(const crc32c_tab *t, uint32_t crc, const void *p, size_t n) {
#if defined(__x86_64__)
    if (t->hw) return hw_update(t, crc, p, n);
#endif
    return sw_update(t->sw, crc, p, n);
}

uint32_t crc32c(const crc32c_tab *t, const void *p, size_t n) {
    return ~crc32c_update(t, ~0u, p, n);
}
