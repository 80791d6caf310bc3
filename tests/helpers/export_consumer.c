/*
 * export_consumer.c - a stand-in for an inference process: connects to
 * modelprepd's --export-socket, asks for a resident, receives its host
 * arenas as file descriptors (SCM_RIGHTS), maps them, and prints
 * "<name> <sha256>" for every tensor in the resident's tensor table, read
 * from the mapping. Tests compare that with the file's digests.
 *   export_consumer SOCKET RESIDENT_ID
 */
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 64

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: export_consumer SOCKET RESIDENT_ID\n");
        return 2;
    }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", argv[1]);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    char req[128];
    int rl = snprintf(req, sizeof req, "%s\n", argv[2]);
    if (write(s, req, (size_t)rl) != rl) return 1;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    int fds[MAX_FDS], nfds = 0;
    char ctrl[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    for (;;) {
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        struct iovec iov = {buf + len, cap - len - 1};
        struct msghdr msg = {
            .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl, .msg_controllen = sizeof ctrl};
        ssize_t n = recvmsg(s, &msg, 0);
        if (n <= 0) break;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                memcpy(fds + nfds, CMSG_DATA(c), sizeof(int) * (size_t)k);
                nfds += k;
            }
        }
        len += (size_t)n;
    }
    buf[len] = 0;
    json_error_t jerr;
    json_t *desc = json_loads(buf, 0, &jerr);
    if (!desc || json_object_get(desc, "error")) {
        fprintf(stderr, "export failed: %s\n", buf);
        return 1;
    }
    /* device index -> mapping */
    void *maps[MAX_FDS] = {0};
    size_t sizes[MAX_FDS] = {0};
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(desc, "arenas"), i, a) {
        int dev = (int)json_integer_value(json_object_get(a, "device"));
        json_t *fi = json_object_get(a, "fd_index");
        if (!fi || dev < 0 || dev >= MAX_FDS) continue;
        int k = (int)json_integer_value(fi);
        if (k < 0 || k >= nfds) return 1;
        sizes[dev] = (size_t)json_integer_value(json_object_get(a, "size"));
        maps[dev] = mmap(NULL, sizes[dev], PROT_READ, MAP_SHARED, fds[k], 0);
        if (maps[dev] == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
    }
    json_t *t;
    json_array_foreach(json_object_get(desc, "tensor_table"), i, t) {
        int dev = (int)json_integer_value(json_object_get(t, "device"));
        size_t off = (size_t)json_integer_value(json_object_get(t, "offset"));
        size_t n = (size_t)json_integer_value(json_object_get(t, "bytes"));
        if (dev < 0 || dev >= MAX_FDS || !maps[dev] || off + n > sizes[dev]) {
            fprintf(stderr, "tensor outside its arena\n");
            return 1;
        }
        unsigned char md[32];
        unsigned int mdlen = 0;
        EVP_Digest((char *)maps[dev] + off, n, md, &mdlen, EVP_sha256(), NULL);
        printf("%s ", json_string_value(json_object_get(t, "name")));
        for (int k = 0; k < 32; k++)
            printf("%02x", md[k]);
        printf("\n");
    }
    for (int d = 0; d < MAX_FDS; d++)
        if (maps[d]) munmap(maps[d], sizes[d]);
    for (int k = 0; k < nfds; k++)
        close(fds[k]);
    json_decref(desc);
    free(buf);
    close(s);
    return 0;
}
