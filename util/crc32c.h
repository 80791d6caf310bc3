/*
 * crc32c.h - CRC-32C (Castagnoli, the iSCSI/ext4 polynomial) for checking
 * what the shard job writes. On x86-64 with SSE4.2 it runs three hardware
 * CRC streams side by side and joins them (a CRC is linear, so the register
 * after a block of zeros is a fixed 32x32 bit-matrix product, tabulated
 * here), which keeps the check well below the cost of the I/O it guards.
 */
#ifndef MP_LOADER_CRC32C_H
#define MP_LOADER_CRC32C_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CRC32C_LANE 4096 /* bytes per stream in a three-stream block */

typedef struct crc32c_tab {
    uint32_t sw[256];
    uint32_t shift[4][256]; /* register after CRC32C_LANE zero bytes, by byte */
    bool hw;
} crc32c_tab;

void crc32c_init(crc32c_tab *t);
/* Raw register update (no pre/post inversion): feed any chunking, the
 * result is the same. The standard CRC-32C of a message m is
 * ~crc32c_update(t, ~0u, m, len). */
uint32_t crc32c_update(const crc32c_tab *t, uint32_t crc, const void *p, size_t n);
uint32_t crc32c(const crc32c_tab *t, const void *p, size_t n);

#endif
