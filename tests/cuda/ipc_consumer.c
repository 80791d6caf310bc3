/*
 * ipc_consumer.c - a second process standing in for an inference server:
 * opens a CUDA arena exported by modelprep (gpu_arena_export's IPC handle as
 * hex), copies a byte range back to the host and prints its sha256. The
 * CUDA tests compare that with the exporter's own digest of the range.
 *   ipc_consumer HANDLE_HEX OFFSET LENGTH [CUDA_ORDINAL]
 * Built only by `make cuda`; needs a GPU.
 */
#include <cuda_runtime_api.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int fail(const char *what, cudaError_t e) {
    fprintf(stderr, "ipc_consumer: %s: %s\n", what, cudaGetErrorString(e));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: ipc_consumer HANDLE_HEX OFFSET LENGTH [CUDA_ORDINAL]\n");
        return 2;
    }
    cudaIpcMemHandle_t h;
    if (strlen(argv[1]) != 2 * sizeof h.reserved) {
        fprintf(stderr, "ipc_consumer: handle must be %zu hex digits\n", 2 * sizeof h.reserved);
        return 2;
    }
    for (size_t i = 0; i < sizeof h.reserved; i++) {
        int hi = hexval(argv[1][2 * i]), lo = hexval(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "ipc_consumer: bad hex digit\n");
            return 2;
        }
        h.reserved[i] = (char)(hi << 4 | lo);
    }
    char *end;
    unsigned long long off = strtoull(argv[2], &end, 10);
    if (*end) return 2;
    unsigned long long len = strtoull(argv[3], &end, 10);
    if (*end) return 2;
    int ord = argc == 5 ? atoi(argv[4]) : 0;

    cudaError_t e = cudaSetDevice(ord);
    if (e != cudaSuccess) return fail("cudaSetDevice", e);
    void *base = NULL;
    e = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) return fail("cudaIpcOpenMemHandle", e);

    const size_t chunk = 64u << 20;
    void *buf = NULL;
    e = cudaMallocHost(&buf, chunk);
    if (e != cudaSuccess) return fail("cudaMallocHost", e);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) return 1;
    for (unsigned long long done = 0; done < len;) {
        size_t n = len - done < chunk ? (size_t)(len - done) : chunk;
        e = cudaMemcpy(buf, (char *)base + off + done, n, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) return fail("cudaMemcpy", e);
        if (EVP_DigestUpdate(md, buf, n) != 1) return 1;
        done += n;
    }
    unsigned char dig[32];
    unsigned int dl = 0;
    if (EVP_DigestFinal_ex(md, dig, &dl) != 1) return 1;
    EVP_MD_CTX_free(md);
    for (unsigned i = 0; i < dl; i++)
        printf("%02x", dig[i]);
    printf("\n");
    cudaFreeHost(buf);
    e = cudaIpcCloseMemHandle(base);
    if (e != cudaSuccess) return fail("cudaIpcCloseMemHandle", e);
    return 0;
}
