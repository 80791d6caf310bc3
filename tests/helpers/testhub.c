/*
 * testhub.c - a Hugging Face Hub look-alike for tests and benchmarks.
 *
 *   testhub [options] ROOT
 *
 * Serves every ROOT/<org>/<name>/ directory as a model repo at one commit
 * (the sha1 of its file list), revision "main" or that commit, with the
 * endpoints huggingface_hub uses:
 *   GET  /api/models/{repo}[/revision/{rev}][?blobs=true]
 *   GET  /api/models/{repo}/tree/{rev}[?recursive=true]
 *   HEAD|GET /{repo}/resolve/{rev}/{path}   LFS files: 302 to /cdn/{sha256}
 *   HEAD|GET /cdn/{sha256}                  with Range, on a second port
 *   GET  /_stats                            counters as JSON
 * Weight files (and anything >= 1 MiB) are LFS files: ETag/X-Linked-Etag is
 * their sha256; other files' ETag is their git blob sha1, as on the hub.
 *
 * Faults: --fail-500 N, --fail-429 N [--retry-after S], --cut N (the first N
 * body responses stop half-way and drop the connection), --api-fail-500 N,
 * --corrupt PATH (serve PATH with one byte flipped), --slow BYTES_PER_S,
 * --token T (API and resolve need "Bearer T"), --gated ORG/NAME,
 * --evil (lists a sibling "../../evil"), --huge (lists a 1 PiB file),
 * --cdn-host HOST (redirect to
 * another origin, e.g. localhost, so auth must not follow).
 * With --port 0 (default) the first stdout line is
 * "listening on http://127.0.0.1:PORT".
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <microhttpd.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/fsutil.h"

typedef struct tfile {
    char *path; /* in the repo */
    char *abs;
    uint64_t size;
    bool lfs;
    char sha256[65];
    char blob_id[41];
} tfile;

typedef struct trepo {
    char id[520];
    char commit[41];
    tfile *files;
    size_t n, cap;
} trepo;

typedef struct hub {
    trepo *repos;
    size_t nrepos;
    int port, cdn_port;
    const char *token, *gated, *corrupt, *cdn_host;
    bool evil, huge;
    long slow_bps;
    int retry_after;
    atomic_int fail500, fail429, cut, api_fail500;
    atomic_long requests, api_requests, heads, data_gets, range_gets, cdn_auth, bytes_sent,
        cuts_done, active, max_active, errors_sent;
} hub;

/* ---- repo scan ----------------------------------------------------------------- */

static bool is_lfs(const char *path, uint64_t size) {
    static const char *const ext[] = {".safetensors", ".bin",  ".pt", ".pth",
                                      ".gguf",        ".ckpt", ".h5"};
    size_t n = strlen(path);
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++) {
        size_t m = strlen(ext[i]);
        if (n >= m && strcmp(path + n - m, ext[i]) == 0) return true;
    }
    return size >= (1u << 20);
}

static int hash_file(tfile *f) {
    int fd = open(f->abs, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    EVP_MD_CTX *a = EVP_MD_CTX_new(), *b = EVP_MD_CTX_new();
    EVP_DigestInit_ex(a, EVP_sha256(), NULL);
    EVP_DigestInit_ex(b, EVP_sha1(), NULL);
    char hdr[48];
    int hn = snprintf(hdr, sizeof hdr, "blob %llu", (unsigned long long)f->size);
    EVP_DigestUpdate(b, hdr, (size_t)hn + 1);
    static __thread unsigned char buf[1 << 20];
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0) {
        EVP_DigestUpdate(a, buf, (size_t)r);
        if (!f->lfs) EVP_DigestUpdate(b, buf, (size_t)r);
    }
    close(fd);
    unsigned char md[64];
    unsigned int ml;
    EVP_DigestFinal_ex(a, md, &ml);
    fs_hex(md, ml, f->sha256);
    EVP_DigestFinal_ex(b, md, &ml);
    char h1[65];
    fs_hex(md, ml, h1);
    memcpy(f->blob_id, f->lfs ? f->sha256 : h1, 40); /* LFS: any stable 40 hex */
    f->blob_id[40] = 0;
    EVP_MD_CTX_free(a);
    EVP_MD_CTX_free(b);
    return r < 0 ? -1 : 0;
}

static void scan_dir(trepo *r, const char *base, const char *rel) {
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s%s%s", base, rel[0] ? "/" : "", rel);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char sub[PATH_MAX], abs[PATH_MAX + 16];
        snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name);
        snprintf(abs, sizeof abs, "%s/%s", base, sub);
        struct stat st;
        if (stat(abs, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            scan_dir(r, base, sub);
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        if (r->n == r->cap) {
            r->cap = r->cap ? r->cap * 2 : 16;
            r->files = realloc(r->files, r->cap * sizeof *r->files);
            if (!r->files) abort();
        }
        tfile *f = &r->files[r->n++];
        memset(f, 0, sizeof *f);
        f->path = strdup(sub);
        f->abs = strdup(abs);
        f->size = (uint64_t)st.st_size;
        f->lfs = is_lfs(sub, f->size);
        if (!f->path || !f->abs || hash_file(f) != 0) {
            fprintf(stderr, "testhub: cannot read %s\n", abs);
            exit(2);
        }
    }
    closedir(d);
}

static int cmp_tfile(const void *a, const void *b) {
    return strcmp(((const tfile *)a)->path, ((const tfile *)b)->path);
}

static void scan_root(hub *h, const char *root) {
    DIR *d = opendir(root);
    if (!d) {
        fprintf(stderr, "testhub: cannot open %s\n", root);
        exit(2);
    }
    struct dirent *org;
    while ((org = readdir(d))) {
        if (org->d_name[0] == '.') continue;
        char od[PATH_MAX];
        snprintf(od, sizeof od, "%s/%s", root, org->d_name);
        DIR *d2 = opendir(od);
        if (!d2) continue;
        struct dirent *nm;
        while ((nm = readdir(d2))) {
            if (nm->d_name[0] == '.') continue;
            char rd[PATH_MAX + 256];
            snprintf(rd, sizeof rd, "%s/%s", od, nm->d_name);
            struct stat st;
            if (stat(rd, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
            h->repos = realloc(h->repos, (h->nrepos + 1) * sizeof *h->repos);
            if (!h->repos) abort();
            trepo *r = &h->repos[h->nrepos++];
            memset(r, 0, sizeof *r);
            snprintf(r->id, sizeof r->id, "%s/%s", org->d_name, nm->d_name);
            scan_dir(r, rd, "");
            qsort(r->files, r->n, sizeof *r->files, cmp_tfile);
            EVP_MD_CTX *c = EVP_MD_CTX_new();
            EVP_DigestInit_ex(c, EVP_sha1(), NULL);
            for (size_t i = 0; i < r->n; i++) {
                EVP_DigestUpdate(c, r->files[i].path, strlen(r->files[i].path) + 1);
                EVP_DigestUpdate(c, r->files[i].sha256, 64);
            }
            unsigned char md[64];
            unsigned int ml;
            EVP_DigestFinal_ex(c, md, &ml);
            EVP_MD_CTX_free(c);
            fs_hex(md, ml, r->commit);
        }
        closedir(d2);
    }
    closedir(d);
}

static trepo *find_repo(hub *h, const char *org, size_t olen, const char *name, size_t nlen) {
    for (size_t i = 0; i < h->nrepos; i++) {
        const char *id = h->repos[i].id;
        if (strlen(id) == olen + 1 + nlen && strncmp(id, org, olen) == 0 && id[olen] == '/' &&
            strncmp(id + olen + 1, name, nlen) == 0)
            return &h->repos[i];
    }
    return NULL;
}

/* ---- responses ------------------------------------------------------------------ */

static enum MHD_Result send_buf(struct MHD_Connection *c, unsigned status, const char *ctype,
                                char *body, const trepo *r, const char *xerr) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", ctype);
    if (r) MHD_add_response_header(resp, "X-Repo-Commit", r->commit);
    if (xerr) {
        MHD_add_response_header(resp, "X-Error-Code", xerr);
        MHD_add_response_header(resp, "X-Error-Message", xerr);
    }
    enum MHD_Result ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *doc,
                                 const trepo *r) {
    char *s = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    return send_buf(c, status, "application/json", s ? s : strdup("null"), r, NULL);
}

static enum MHD_Result send_error(hub *h, struct MHD_Connection *c, unsigned status,
                                  const char *xerr, const trepo *r) {
    atomic_fetch_add(&h->errors_sent, 1);
    char *b = NULL;
    if (asprintf(&b, "{\"error\":\"%s\"}", xerr ? xerr : "error") < 0) return MHD_NO;
    return send_buf(c, status, "application/json", b, r, xerr);
}

/* Body served through a callback: slow, cut or corrupt. */
typedef struct slow_body {
    hub *h;
    int fd;
    uint64_t off, len, sent, cut_at, flip_at; /* flip_at: absolute offset or UINT64_MAX */
    double t0;
} slow_body;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static ssize_t slow_read(void *cls, uint64_t pos, char *buf, size_t max) {
    slow_body *b = cls;
    if (pos >= b->len) return MHD_CONTENT_READER_END_OF_STREAM;
    if (b->cut_at != UINT64_MAX && pos >= b->cut_at) {
        atomic_fetch_add(&b->h->cuts_done, 1);
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    uint64_t lim = b->len - pos;
    if (b->cut_at != UINT64_MAX && b->cut_at - pos < lim) lim = b->cut_at - pos;
    if (b->h->slow_bps > 0) {
        /* pace to the rate: at most 1/20 s of data per call */
        size_t step = (size_t)(b->h->slow_bps / 20) + 1;
        if (max > step) max = step;
        double due = b->t0 + (double)pos / (double)b->h->slow_bps;
        double wait = due - now_s();
        if (wait > 0) usleep((useconds_t)(wait * 1e6));
    }
    if (max > lim) max = (size_t)lim;
    ssize_t r = pread(b->fd, buf, max, (off_t)(b->off + pos));
    if (r <= 0) return MHD_CONTENT_READER_END_WITH_ERROR;
    uint64_t a = b->off + pos;
    if (b->flip_at >= a && b->flip_at < a + (uint64_t)r) buf[b->flip_at - a] ^= 0x5a;
    atomic_fetch_add(&b->h->bytes_sent, r);
    return r;
}

static void slow_free(void *cls) {
    slow_body *b = cls;
    close(b->fd);
    free(b);
}

static int parse_range(const char *v, uint64_t size, uint64_t *a, uint64_t *b) {
    unsigned long long x, y;
    if (!v || strncmp(v, "bytes=", 6) != 0) return -1;
    v += 6;
    if (sscanf(v, "%llu-%llu", &x, &y) == 2) {
        if (y >= size) y = size - 1;
    } else if (sscanf(v, "%llu-", &x) == 1) {
        y = size - 1;
    } else {
        return -1;
    }
    if (x > y || x >= size) return -2;
    *a = x;
    *b = y;
    return 0;
}

/* The bytes of a file, whole or a Range, with the hub's headers. */
static enum MHD_Result send_file(hub *h, struct MHD_Connection *c, const trepo *r, const tfile *f,
                                 bool head) {
    const char *range = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Range");
    uint64_t a = 0, b = f->size ? f->size - 1 : 0, len = f->size;
    unsigned status = MHD_HTTP_OK;
    if (!head) {
        atomic_fetch_add(&h->data_gets, 1);
        if (atomic_fetch_sub(&h->fail500, 1) > 0) return send_error(h, c, 500, NULL, r);
        if (atomic_fetch_sub(&h->fail429, 1) > 0) {
            struct MHD_Response *resp =
                MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
            char ra[16];
            snprintf(ra, sizeof ra, "%d", h->retry_after);
            MHD_add_response_header(resp, "Retry-After", ra);
            atomic_fetch_add(&h->errors_sent, 1);
            enum MHD_Result ret = MHD_queue_response(c, 429, resp);
            MHD_destroy_response(resp);
            return ret;
        }
    }
    if (range && f->size > 0) {
        int pr = parse_range(range, f->size, &a, &b);
        if (pr == -2) {
            struct MHD_Response *resp =
                MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
            char cr[64];
            snprintf(cr, sizeof cr, "bytes */%llu", (unsigned long long)f->size);
            MHD_add_response_header(resp, "Content-Range", cr);
            enum MHD_Result ret = MHD_queue_response(c, 416, resp);
            MHD_destroy_response(resp);
            return ret;
        }
        if (pr == 0) {
            status = MHD_HTTP_PARTIAL_CONTENT;
            len = b - a + 1;
            if (!head) atomic_fetch_add(&h->range_gets, 1);
        }
    }
    int fd = open(f->abs, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return send_error(h, c, 500, NULL, r);
    bool corrupt = h->corrupt && strcmp(h->corrupt, f->path) == 0;
    bool cut = !head && len > 1 && atomic_fetch_sub(&h->cut, 1) > 0;
    struct MHD_Response *resp;
    if (!head && (corrupt || cut || h->slow_bps > 0)) {
        slow_body *sb = calloc(1, sizeof *sb);
        if (!sb) {
            close(fd);
            return MHD_NO;
        }
        *sb = (slow_body){
            h,      fd, a, len, 0, cut ? len / 2 : UINT64_MAX, corrupt ? f->size / 2 : UINT64_MAX,
            now_s()};
        resp = MHD_create_response_from_callback(len, 64 * 1024, slow_read, sb, slow_free);
    } else {
        if (!head) atomic_fetch_add(&h->bytes_sent, (long)len);
        resp = MHD_create_response_from_fd_at_offset64(len, fd, a);
    }
    if (!resp) return MHD_NO;
    char etag[80], cr[96];
    snprintf(etag, sizeof etag, "\"%s\"", f->lfs ? f->sha256 : f->blob_id);
    MHD_add_response_header(resp, "ETag", etag);
    MHD_add_response_header(resp, "Accept-Ranges", "bytes");
    MHD_add_response_header(resp, "Content-Type", "application/octet-stream");
    if (r) MHD_add_response_header(resp, "X-Repo-Commit", r->commit);
    if (status == MHD_HTTP_PARTIAL_CONTENT) {
        snprintf(cr, sizeof cr, "bytes %llu-%llu/%llu", (unsigned long long)a,
                 (unsigned long long)b, (unsigned long long)f->size);
        MHD_add_response_header(resp, "Content-Range", cr);
    }
    enum MHD_Result ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* ---- endpoints ---------------------------------------------------------------------- */

static bool rev_ok(const trepo *r, const char *rev, size_t n) {
    return (n == 4 && strncmp(rev, "main", 4) == 0) ||
           (n == 40 && strncmp(rev, r->commit, 40) == 0);
}

static json_t *sibling_json(const tfile *f, bool blobs) {
    json_t *o = json_pack("{s:s}", "rfilename", f->path);
    if (blobs) {
        json_object_set_new(o, "size", json_integer((json_int_t)f->size));
        json_object_set_new(o, "blobId", json_string(f->blob_id));
        if (f->lfs)
            json_object_set_new(o, "lfs",
                                json_pack("{s:s,s:I,s:i}", "sha256", f->sha256, "size",
                                          (json_int_t)f->size, "pointerSize", 134));
    }
    return o;
}

static enum MHD_Result api_info(hub *h, struct MHD_Connection *c, const trepo *r, bool blobs) {
    json_t *sib = json_array();
    for (size_t i = 0; i < r->n; i++)
        json_array_append_new(sib, sibling_json(&r->files[i], blobs));
    if (h->evil) {
        tfile ev = {.path = "../../evil", .size = 4, .lfs = false};
        memcpy(ev.blob_id, "e0f39e5c1a6b2bb0b9f5d0b0d0c0a0b0c0d0e0f0", 41);
        json_array_append_new(sib, sibling_json(&ev, blobs));
    }
    if (h->huge) {
        /* advertised only: a client must refuse it for lack of disk space */
        tfile big = {.path = "huge.safetensors", .size = 1ull << 50, .lfs = true};
        memset(big.sha256, 'a', 64);
        memset(big.blob_id, 'b', 40);
        json_array_append_new(sib, sibling_json(&big, blobs));
    }
    json_t *doc = json_pack("{s:s,s:s,s:s,s:b,s:b,s:b,s:o,s:[],s:s}", "id", r->id, "modelId", r->id,
                            "sha", r->commit, "private", 0, "gated", 0, "disabled", 0, "siblings",
                            sib, "tags", "lastModified", "2026-01-01T00:00:00.000Z");
    return send_json(c, 200, doc, r);
}

static enum MHD_Result api_tree(struct MHD_Connection *c, const trepo *r, bool recursive) {
    json_t *arr = json_array();
    for (size_t i = 0; i < r->n; i++) {
        const tfile *f = &r->files[i];
        if (!recursive && strchr(f->path, '/')) continue;
        json_t *e = json_pack("{s:s,s:s,s:I,s:s}", "type", "file", "oid", f->blob_id, "size",
                              (json_int_t)f->size, "path", f->path);
        if (f->lfs)
            json_object_set_new(e, "lfs",
                                json_pack("{s:s,s:I,s:i}", "oid", f->sha256, "size",
                                          (json_int_t)f->size, "pointerSize", 134));
        json_array_append_new(arr, e);
    }
    return send_json(c, 200, arr, r);
}

static bool authorized(hub *h, struct MHD_Connection *c) {
    if (!h->token) return true;
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    return a && strncmp(a, "Bearer ", 7) == 0 && strcmp(a + 7, h->token) == 0;
}

static enum MHD_Result route(hub *h, struct MHD_Connection *c, const char *url, bool head) {
    if (strcmp(url, "/_stats") == 0) {
        json_t *doc = json_pack(
            "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "requests", (json_int_t)h->requests,
            "api_requests", (json_int_t)h->api_requests, "heads", (json_int_t)h->heads, "data_gets",
            (json_int_t)h->data_gets, "range_gets", (json_int_t)h->range_gets, "cdn_auth",
            (json_int_t)h->cdn_auth, "bytes_sent", (json_int_t)h->bytes_sent, "cuts_done",
            (json_int_t)h->cuts_done, "max_active", (json_int_t)h->max_active, "errors_sent",
            (json_int_t)h->errors_sent);
        return send_json(c, 200, doc, NULL);
    }
    if (strncmp(url, "/cdn/", 5) == 0) {
        if (MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization"))
            atomic_fetch_add(&h->cdn_auth, 1);
        const char *sha = url + 5;
        for (size_t i = 0; i < h->nrepos; i++)
            for (size_t k = 0; k < h->repos[i].n; k++)
                if (h->repos[i].files[k].lfs && strcmp(h->repos[i].files[k].sha256, sha) == 0)
                    return send_file(h, c, NULL, &h->repos[i].files[k], head);
        return send_error(h, c, 404, NULL, NULL);
    }
    bool api = strncmp(url, "/api/models/", 12) == 0;
    const char *p = api ? url + 12 : url + 1;
    const char *s1 = strchr(p, '/');
    if (!s1) return send_error(h, c, 404, "RepoNotFound", NULL);
    const char *name = s1 + 1;
    const char *s2 = strchr(name, '/');
    size_t nlen = s2 ? (size_t)(s2 - name) : strlen(name);
    trepo *r = find_repo(h, p, (size_t)(s1 - p), name, nlen);
    if (api) atomic_fetch_add(&h->api_requests, 1);
    if (!authorized(h, c)) {
        atomic_fetch_add(&h->errors_sent, 1);
        char *b = strdup("{\"error\":\"Invalid credentials in Authorization header\"}");
        struct MHD_Response *resp =
            MHD_create_response_from_buffer(strlen(b), b, MHD_RESPMEM_MUST_FREE);
        MHD_add_response_header(resp, "X-Error-Message",
                                "Invalid credentials in Authorization header");
        enum MHD_Result ret = MHD_queue_response(c, 401, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (!r) return send_error(h, c, 404, "RepoNotFound", NULL);
    if (h->gated && strcmp(h->gated, r->id) == 0) return send_error(h, c, 403, "GatedRepo", r);
    const char *rest = s2 ? s2 : "";
    if (api) {
        if (atomic_fetch_sub(&h->api_fail500, 1) > 0) return send_error(h, c, 500, NULL, r);
        const char *blobs = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "blobs");
        bool want_blobs = blobs && (strcmp(blobs, "true") == 0 || strcmp(blobs, "1") == 0);
        if (*rest == 0) return api_info(h, c, r, want_blobs);
        if (strncmp(rest, "/revision/", 10) == 0) {
            const char *rev = rest + 10;
            if (!rev_ok(r, rev, strlen(rev))) return send_error(h, c, 404, "RevisionNotFound", r);
            return api_info(h, c, r, want_blobs);
        }
        if (strncmp(rest, "/tree/", 6) == 0) {
            const char *rev = rest + 6;
            const char *sl = strchr(rev, '/');
            if (!rev_ok(r, rev, sl ? (size_t)(sl - rev) : strlen(rev)))
                return send_error(h, c, 404, "RevisionNotFound", r);
            const char *rec = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "recursive");
            return api_tree(c, r, rec && (strcmp(rec, "true") == 0 || strcmp(rec, "True") == 0));
        }
        return send_error(h, c, 404, NULL, r);
    }
    if (strncmp(rest, "/resolve/", 9) != 0) return send_error(h, c, 404, NULL, r);
    const char *rev = rest + 9;
    const char *sl = strchr(rev, '/');
    if (!sl) return send_error(h, c, 404, "EntryNotFound", r);
    if (!rev_ok(r, rev, (size_t)(sl - rev))) return send_error(h, c, 404, "RevisionNotFound", r);
    const char *path = sl + 1;
    if (h->evil && strcmp(path, "../../evil") == 0) {
        return send_buf(c, 200, "text/plain", strdup("evil"), r, NULL);
    }
    for (size_t i = 0; i < r->n; i++) {
        const tfile *f = &r->files[i];
        if (strcmp(f->path, path) != 0) continue;
        if (!f->lfs) return send_file(h, c, r, f, head);
        /* LFS: redirect to the "CDN" with the linked etag and size */
        struct MHD_Response *resp =
            MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        char loc[512], etag[80], size[32];
        snprintf(loc, sizeof loc, "http://%s:%d/cdn/%s", h->cdn_host, h->cdn_port, f->sha256);
        snprintf(etag, sizeof etag, "\"%s\"", f->sha256);
        snprintf(size, sizeof size, "%llu", (unsigned long long)f->size);
        MHD_add_response_header(resp, "Location", loc);
        MHD_add_response_header(resp, "X-Linked-Etag", etag);
        MHD_add_response_header(resp, "X-Linked-Size", size);
        MHD_add_response_header(resp, "ETag", "\"0000000000000000000000000000000000000000\"");
        MHD_add_response_header(resp, "X-Repo-Commit", r->commit);
        enum MHD_Result ret = MHD_queue_response(c, 302, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    return send_error(h, c, 404, "EntryNotFound", r);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls) {
    hub *h = cls;
    (void)version;
    (void)upload;
    (void)upload_size;
    if (*con_cls == NULL) {
        static int marker;
        *con_cls = &marker;
        long a = atomic_fetch_add(&h->active, 1) + 1;
        long m = atomic_load(&h->max_active);
        while (a > m && !atomic_compare_exchange_weak(&h->max_active, &m, a)) {
        }
    }
    atomic_fetch_add(&h->requests, 1);
    bool head = strcmp(method, "HEAD") == 0;
    if (head) atomic_fetch_add(&h->heads, 1);
    if (!head && strcmp(method, "GET") != 0) return send_error(h, c, 405, NULL, NULL);
    return route(h, c, url, head);
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe) {
    hub *h = cls;
    (void)c;
    (void)toe;
    if (*con_cls) atomic_fetch_sub(&h->active, 1);
    *con_cls = NULL;
}

int main(int argc, char **argv) {
    static hub h;
    h.cdn_host = "127.0.0.1";
    h.retry_after = 1;
    int port = 0;
    const char *root = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (OPT("--port"))
            port = atoi(v);
        else if (OPT("--fail-500"))
            h.fail500 = atoi(v);
        else if (OPT("--api-fail-500"))
            h.api_fail500 = atoi(v);
        else if (OPT("--fail-429"))
            h.fail429 = atoi(v);
        else if (OPT("--retry-after"))
            h.retry_after = atoi(v);
        else if (OPT("--cut"))
            h.cut = atoi(v);
        else if (OPT("--corrupt"))
            h.corrupt = v;
        else if (OPT("--slow"))
            h.slow_bps = atol(v);
        else if (OPT("--token"))
            h.token = v;
        else if (OPT("--gated"))
            h.gated = v;
        else if (OPT("--cdn-host"))
            h.cdn_host = v;
        else if (strcmp(a, "--evil") == 0)
            h.evil = true;
        else if (strcmp(a, "--huge") == 0)
            h.huge = true;
        else if (a[0] != '-' && !root)
            root = a;
        else {
            fprintf(stderr, "usage: testhub [options] ROOT (bad argument %s)\n", a);
            return 2;
        }
#undef OPT
    }
    if (!root) {
        fprintf(stderr, "usage: testhub [options] ROOT\n");
        return 2;
    }
    scan_root(&h, root);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG,
        (uint16_t)port, NULL, NULL, handler, &h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_NOTIFY_COMPLETED, completed, &h, MHD_OPTION_CONNECTION_TIMEOUT, 120u,
        MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "testhub: cannot start\n");
        return 1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    h.port = info ? info->port : port;
    /* The "CDN" is another origin (its own port), as on the real hub, so
     * clients must neither follow it on HEAD nor send it the token. */
    sa.sin_port = 0;
    struct MHD_Daemon *cdn = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG, 0,
        NULL, NULL, handler, &h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_NOTIFY_COMPLETED, completed, &h, MHD_OPTION_CONNECTION_TIMEOUT, 120u,
        MHD_OPTION_END);
    info = cdn ? MHD_get_daemon_info(cdn, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    if (!info) {
        fprintf(stderr, "testhub: cannot start the cdn listener\n");
        return 1;
    }
    h.cdn_port = info->port;
    printf("listening on http://127.0.0.1:%d\n", h.port);
    fflush(stdout);
    int sig;
    sigwait(&set, &sig);
    MHD_stop_daemon(cdn);
    MHD_stop_daemon(d);
    for (size_t i = 0; i < h.nrepos; i++) {
        for (size_t k = 0; k < h.repos[i].n; k++) {
            free(h.repos[i].files[k].path);
            free(h.repos[i].files[k].abs);
        }
        free(h.repos[i].files);
    }
    free(h.repos);
    return 0;
}
