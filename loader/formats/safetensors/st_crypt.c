/* st_crypt.c - see the encrypted-safetensors section of safetensors.h. The writer lets st_writer
 * produce the file (so header and ordering are the reference's) with a placeholder of zeros for
 * enc_tags, then patches the real tags into the header in place before the final rename: the tags'
 * hex has a fixed width, so the header's length never changes. */
#include "loader/formats/safetensors/safetensors.h"

#include <ctype.h>
#include <limits.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/fsutil.h"

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool unhex(const char *s, size_t nbytes, unsigned char *out) {
    for (size_t i = 0; i < nbytes; i++) {
        int hi = hexval((unsigned char)s[2 * i]), lo = hexval((unsigned char)s[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return true;
}

int stc_key_load(const char *path, unsigned char key[STC_KEY_BYTES], mp_error *err) {
    char *data = NULL;
    size_t len = 0;
    if (fs_read_all(path, 4096, &data, &len, err) != 0) {
        if (err && strcmp(err->code, "not_found") != 0)
            snprintf(err->code, sizeof err->code, "%s", "bad_key");
        return -1;
    }
    int rc = 0;
    if (len == STC_KEY_BYTES) {
        memcpy(key, data, STC_KEY_BYTES);
    } else {
        size_t a = 0, b = len;
        while (a < b && isspace((unsigned char)data[a]))
            a++;
        while (b > a && isspace((unsigned char)data[b - 1]))
            b--;
        if (b - a != 2 * STC_KEY_BYTES || !unhex(data + a, STC_KEY_BYTES, key))
            rc = mp_err(err, "bad_key", "key file must hold 32 raw bytes or 64 hex digits");
    }
    if (data) {
        memset(data, 0, len);
        free(data);
    }
    return rc;
}

/* IV of chunk idx: the file nonce with idx XORed into its last 8 bytes. */
static void chunk_iv(const unsigned char nonce[STC_NONCE_BYTES], uint64_t idx,
                     unsigned char iv[STC_NONCE_BYTES]) {
    memcpy(iv, nonce, STC_NONCE_BYTES);
    for (int i = 0; i < 8; i++)
        iv[STC_NONCE_BYTES - 1 - i] ^= (unsigned char)(idx >> (8 * i));
}

/* AES-256-GCM of one chunk. enc: tag is written; !enc: tag is checked. */
static int gcm(bool enc, const unsigned char *key, const unsigned char nonce[STC_NONCE_BYTES],
               uint64_t idx, const unsigned char aad[32], const void *in, size_t n, void *out,
               unsigned char tag[STC_TAG_BYTES], mp_error *err) {
    unsigned char iv[STC_NONCE_BYTES];
    chunk_iv(nonce, idx, iv);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int ok = c != NULL, outl = 0;
    if (ok)
        ok = (enc ? EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, iv)
                  : EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, iv)) == 1;
    if (ok)
        ok = (enc ? EVP_EncryptUpdate(c, NULL, &outl, aad, 32)
                  : EVP_DecryptUpdate(c, NULL, &outl, aad, 32)) == 1;
    /* EVP takes int lengths; chunks are at most STC_MAX_CHUNK. */
    if (ok && n > 0)
        ok = (enc ? EVP_EncryptUpdate(c, out, &outl, in, (int)n)
                  : EVP_DecryptUpdate(c, out, &outl, in, (int)n)) == 1;
    int fin = 0;
    if (ok && enc) {
        ok = EVP_EncryptFinal_ex(c, (unsigned char *)out + (size_t)outl, &fin) == 1 &&
             EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, STC_TAG_BYTES, tag) == 1;
    } else if (ok) {
        ok = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, STC_TAG_BYTES, tag) == 1;
        if (ok && EVP_DecryptFinal_ex(c, (unsigned char *)out + (size_t)outl, &fin) != 1) {
            EVP_CIPHER_CTX_free(c);
            /* Never leave unverified plaintext behind. */
            memset(out, 0, n);
            return mp_err(err, "decryption_failed",
                          "chunk %llu does not verify: wrong key or tampered file",
                          (unsigned long long)idx);
        }
    }
    EVP_CIPHER_CTX_free(c);
    if (!ok) return mp_err(err, "internal", "AES-GCM setup failed");
    return 0;
}

/* The header digest (see safetensors.h) from a tensor list in data order. */
static int header_digest(json_t *tensors, const json_t *metadata, unsigned char out[32],
                         mp_error *err) {
    json_t *meta = metadata ? json_deep_copy(metadata) : json_object();
    if (meta) json_object_del(meta, "enc_tags");
    json_t *doc = json_pack("{s:o,s:o}", "metadata", meta, "tensors", tensors);
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    unsigned int l = 0;
    int ok = EVP_Digest(text, strlen(text), out, &l, EVP_sha256(), NULL);
    free(text);
    return ok == 1 ? 0 : mp_err(err, "internal", "sha256 failed");
}

static json_t *tensor_row(const char *name, mp_dtype dt, const int64_t *shape, int ndim,
                          uint64_t begin, uint64_t end) {
    json_t *sh = json_array();
    for (int d = 0; d < ndim; d++)
        json_array_append_new(sh, json_integer(shape[d]));
    return json_pack("[s,s,o,I,I]", name, mp_dtype_name(dt), sh, (json_int_t)begin,
                     (json_int_t)end);
}

/* ---- writer ---- */

struct stc_writer {
    st_writer *st;
    char *path, *enc_path;
    unsigned char key[STC_KEY_BYTES], nonce[STC_NONCE_BYTES], aad[32];
    uint64_t chunk, nchunks, idx;
    unsigned char *buf, *tags;
    size_t fill;
};

static void writer_free(stc_writer *w) {
    memset(w->key, 0, sizeof w->key);
    free(w->buf);
    free(w->tags);
    free(w->path);
    free(w->enc_path);
    free(w);
}

int stc_writer_open(const char *path, const st_wtensor *ts, size_t n, const json_t *metadata,
                    const unsigned char key[STC_KEY_BYTES], uint64_t chunk_bytes, stc_writer **out,
                    mp_error *err) {
    *out = NULL;
    if (chunk_bytes == 0) chunk_bytes = STC_DEFAULT_CHUNK;
    if (chunk_bytes < STC_MIN_CHUNK || chunk_bytes > STC_MAX_CHUNK ||
        (chunk_bytes & (chunk_bytes - 1)))
        return mp_err(err, "bad_request", "enc_chunk_bytes must be a power of two in 4K..64M");
    static const char *const reserved[] = {"encryption", "enc_chunk_bytes", "enc_nonce",
                                           "enc_tags"};
    for (size_t i = 0; metadata && i < 4; i++)
        if (json_object_get(metadata, reserved[i]))
            return mp_err(err, "bad_request", "metadata key %s is reserved", reserved[i]);
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t b;
        if (!mp_tensor_bytes(ts[i].dtype, ts[i].shape, ts[i].ndim, &b) ||
            __builtin_add_overflow(total, b, &total))
            return mp_err(err, "bad_request", "tensor %s: bad dtype or shape", ts[i].name);
    }
    stc_writer *w = calloc(1, sizeof *w);
    if (!w) return mp_err(err, "no_memory", "out of memory");
    memcpy(w->key, key, STC_KEY_BYTES);
    w->chunk = chunk_bytes;
    w->nchunks = (total + chunk_bytes - 1) / chunk_bytes;
    size_t plen = strlen(path);
    w->path = strdup(path);
    w->enc_path = malloc(plen + 5);
    w->buf = malloc(chunk_bytes);
    w->tags = w->nchunks ? malloc(w->nchunks * STC_TAG_BYTES) : NULL;
    char *zeros = malloc(w->nchunks * 2 * STC_TAG_BYTES + 1);
    json_t *meta = metadata ? json_deep_copy(metadata) : json_object();
    int rc = 0;
    if (!w->path || !w->enc_path || !w->buf || (w->nchunks && !w->tags) || !zeros || !meta) {
        rc = mp_err(err, "no_memory", "out of memory");
        goto done;
    }
    snprintf(w->enc_path, plen + 5, "%s.enc", path);
    if (getrandom(w->nonce, sizeof w->nonce, 0) != (ssize_t)sizeof w->nonce) {
        rc = mp_err(err, "internal", "getrandom failed");
        goto done;
    }
    char nhex[2 * STC_NONCE_BYTES + 1], cb[24];
    fs_hex(w->nonce, STC_NONCE_BYTES, nhex);
    snprintf(cb, sizeof cb, "%llu", (unsigned long long)chunk_bytes);
    memset(zeros, '0', w->nchunks * 2 * STC_TAG_BYTES);
    zeros[w->nchunks * 2 * STC_TAG_BYTES] = 0;
    json_object_set_new(meta, "encryption", json_string(STC_SCHEME));
    json_object_set_new(meta, "enc_chunk_bytes", json_string(cb));
    json_object_set_new(meta, "enc_nonce", json_string(nhex));
    json_object_set_new(meta, "enc_tags", json_string(zeros));
    if ((rc = st_writer_open(w->enc_path, ts, n, meta, &w->st, err)) != 0) goto done;
    /* AAD over the table in file order, exactly as a reader will rebuild it. */
    json_t *rows = json_array();
    uint64_t off = 0;
    for (size_t k = 0; k < n && rows; k++) {
        const st_wtensor *t = &ts[st_writer_order(w->st, k)];
        uint64_t b = 0;
        mp_tensor_bytes(t->dtype, t->shape, t->ndim, &b);
        json_array_append_new(rows, tensor_row(t->name, t->dtype, t->shape, t->ndim, off, off + b));
        off += b;
    }
    if (!rows || (rc = header_digest(rows, meta, w->aad, err)) != 0) {
        if (!rows) rc = mp_err(err, "no_memory", "out of memory");
        st_writer_abort(w->st);
        w->st = NULL;
        goto done;
    }
done:
    json_decref(meta);
    free(zeros);
    if (rc != 0) {
        writer_free(w);
        return -1;
    }
    *out = w;
    return 0;
}

size_t stc_writer_order(const stc_writer *w, size_t k) {
    return st_writer_order(w->st, k);
}

static int flush_chunk(stc_writer *w, mp_error *err) {
    if (w->idx >= w->nchunks) return mp_err(err, "bad_request", "more data than the tensors hold");
    if (gcm(true, w->key, w->nonce, w->idx, w->aad, w->buf, w->fill, w->buf,
            w->tags + w->idx * STC_TAG_BYTES, err) != 0 ||
        st_writer_write(w->st, w->buf, w->fill, err) != 0)
        return -1;
    w->idx++;
    w->fill = 0;
    return 0;
}

int stc_writer_write(stc_writer *w, const void *buf, size_t len, mp_error *err) {
    const unsigned char *p = buf;
    while (len > 0) {
        size_t n = w->chunk - w->fill < len ? (size_t)(w->chunk - w->fill) : len;
        memcpy(w->buf + w->fill, p, n);
        w->fill += n;
        p += n;
        len -= n;
        if (w->fill == w->chunk && flush_chunk(w, err) != 0) return -1;
    }
    return 0;
}

/* Writes the tags' hex over the placeholder of zeros in the header. */
static int patch_tags(stc_writer *w, mp_error *err) {
    int fd = open(w->enc_path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return mp_err(err, "io_error", "open %s: %s", w->enc_path, strerror(errno));
    unsigned char pre[8];
    int rc = weights_pread(fd, pre, 8, 0, err);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)pre[i] << (8 * i);
    char *hdr = NULL;
    if (rc == 0 && (hlen > ST_MAX_HEADER || !(hdr = malloc(hlen + 1))))
        rc = mp_err(err, "no_memory", "header too large");
    if (rc == 0) rc = weights_pread(fd, hdr, hlen, 8, err);
    size_t tl = w->nchunks * 2 * STC_TAG_BYTES;
    char *val = NULL;
    if (rc == 0) {
        hdr[hlen] = 0;
        char *k = strstr(hdr, "\"enc_tags\"");
        if (k) {
            k += strlen("\"enc_tags\"");
            while (*k == ' ' || *k == ':')
                k++;
            if (*k == '"') val = k + 1;
        }
        if (!val || (size_t)(hdr + hlen - val) < tl + 1 || val[tl] != '"')
            rc = mp_err(err, "internal", "enc_tags placeholder not found in the header");
    }
    if (rc == 0) {
        char *hex = malloc(tl + 1);
        if (!hex) {
            rc = mp_err(err, "no_memory", "out of memory");
        } else {
            fs_hex(w->tags, w->nchunks * STC_TAG_BYTES, hex);
            ssize_t put = pwrite(fd, hex, tl, (off_t)(8 + (uint64_t)(val - hdr)));
            free(hex);
            if (put != (ssize_t)tl || fsync(fd) != 0)
                rc = mp_err(err, "io_error", "write %s: %s", w->enc_path, strerror(errno));
        }
    }
    free(hdr);
    close(fd);
    return rc;
}

int stc_writer_finish(stc_writer *w, mp_error *err) {
    int rc = 0;
    if (w->fill > 0) rc = flush_chunk(w, err);
    if (rc == 0 && w->idx != w->nchunks)
        rc = mp_err(err, "bad_request", "fewer data bytes than the tensors hold");
    if (rc != 0) {
        st_writer_abort(w->st);
        writer_free(w);
        return -1;
    }
    rc = st_writer_finish(w->st, err);
    if (rc == 0) rc = patch_tags(w, err);
    if (rc == 0 && rename(w->enc_path, w->path) != 0)
        rc = mp_err(err, "io_error", "rename %s: %s", w->path, strerror(errno));
    if (rc == 0)
        rc = fs_sync_parent(w->path, err);
    else
        unlink(w->enc_path);
    writer_free(w);
    return rc;
}

void stc_writer_abort(stc_writer *w) {
    if (!w) return;
    st_writer_abort(w->st);
    writer_free(w);
}

/* ---- reader ---- */

bool stc_is_encrypted(const mp_weights *w) {
    return w && w->metadata && json_object_get(w->metadata, "encryption") != NULL;
}

void stc_file_free(stc_file *f) {
    free(f->tags);
    memset(f, 0, sizeof *f);
}

static int cmp_by_offset(const void *a, const void *b) {
    const mp_tensor *x = *(const mp_tensor *const *)a, *y = *(const mp_tensor *const *)b;
    if (x->data_offset != y->data_offset) return x->data_offset < y->data_offset ? -1 : 1;
    return x->data_bytes < y->data_bytes ? -1 : x->data_bytes > y->data_bytes;
}

int stc_file_open(const mp_weights *w, stc_file *f, mp_error *err) {
    memset(f, 0, sizeof *f);
    if (!stc_is_encrypted(w)) return 0;
    const json_t *m = w->metadata;
    const char *scheme = json_string_value(json_object_get(m, "encryption"));
    const char *cb = json_string_value(json_object_get(m, "enc_chunk_bytes"));
    const char *nonce = json_string_value(json_object_get(m, "enc_nonce"));
    const char *tags = json_string_value(json_object_get(m, "enc_tags"));
    if (!scheme || strcmp(scheme, STC_SCHEME) != 0)
        return mp_err(err, "bad_header", "unknown encryption scheme %s", scheme ? scheme : "?");
    char *end = NULL;
    errno = 0;
    unsigned long long chunk = cb ? strtoull(cb, &end, 10) : 0;
    if (!cb || errno || *end || chunk < STC_MIN_CHUNK || chunk > STC_MAX_CHUNK ||
        (chunk & (chunk - 1)))
        return mp_err(err, "bad_header", "bad enc_chunk_bytes");
    if (!nonce || strlen(nonce) != 2 * STC_NONCE_BYTES || !unhex(nonce, STC_NONCE_BYTES, f->nonce))
        return mp_err(err, "bad_header", "bad enc_nonce");
    if (w->nfiles != 1) return mp_err(err, "bad_header", "an encrypted file is one file");
    unsigned char pre[8];
    if (weights_pread(w->fds[0], pre, 8, 0, err) != 0) return -1;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)pre[i] << (8 * i);
    struct stat st;
    if (fstat(w->fds[0], &st) != 0 || hlen > ST_MAX_HEADER || (uint64_t)st.st_size < 8 + hlen)
        return mp_err(err, "bad_header", "bad header length");
    f->chunk_bytes = chunk;
    f->data_start = 8 + hlen;
    f->data_len = (uint64_t)st.st_size - f->data_start;
    f->nchunks = (f->data_len + chunk - 1) / chunk;
    if (!tags || strlen(tags) != f->nchunks * 2 * STC_TAG_BYTES)
        return mp_err(err, "bad_header", "enc_tags does not hold one tag per chunk");
    f->tags = malloc(f->nchunks ? f->nchunks * STC_TAG_BYTES : 1);
    const mp_tensor **order = malloc((w->ntensors ? w->ntensors : 1) * sizeof *order);
    json_t *rows = json_array();
    int rc = 0;
    if (!f->tags || !order || !rows) {
        rc = mp_err(err, "no_memory", "out of memory");
    } else if (!unhex(tags, f->nchunks * STC_TAG_BYTES, f->tags)) {
        rc = mp_err(err, "bad_header", "enc_tags is not hex");
    } else {
        for (size_t i = 0; i < w->ntensors; i++)
            order[i] = &w->tensors[i];
        qsort(order, w->ntensors, sizeof *order, cmp_by_offset);
        for (size_t i = 0; i < w->ntensors; i++) {
            const mp_tensor *t = order[i];
            uint64_t b = t->data_offset - f->data_start;
            json_array_append_new(
                rows, tensor_row(t->name, t->dtype, t->shape, t->ndim, b, b + t->data_bytes));
        }
        rc = header_digest(rows, m, f->aad, err);
        rows = NULL; /* header_digest took it */
    }
    json_decref(rows);
    free(order);
    if (rc != 0)
        stc_file_free(f);
    else
        f->encrypted = true;
    return rc;
}

size_t stc_chunk_len(const stc_file *f, uint64_t idx) {
    uint64_t start = idx * f->chunk_bytes;
    uint64_t left = f->data_len - start;
    return (size_t)(left < f->chunk_bytes ? left : f->chunk_bytes);
}

int stc_decrypt_chunk(const stc_file *f, const unsigned char key[STC_KEY_BYTES], uint64_t idx,
                      const void *ct, size_t n, void *pt, mp_error *err) {
    if (idx >= f->nchunks || n != stc_chunk_len(f, idx))
        return mp_err(err, "internal", "chunk %llu out of range", (unsigned long long)idx);
    return gcm(false, key, f->nonce, idx, f->aad, ct, n, pt,
               (unsigned char *)f->tags + idx * STC_TAG_BYTES, err);
}

void stc_cache_free(stc_cache *c) {
    free(c->buf);
    memset(c, 0, sizeof *c);
}

int stc_read(const stc_file *f, int fd, const unsigned char key[STC_KEY_BYTES], uint64_t off,
             void *dst, size_t len, stc_cache *cache, mp_error *err) {
    if (off < f->data_start || off - f->data_start > f->data_len ||
        len > f->data_len - (off - f->data_start))
        return mp_err(err, "bad_header", "read outside the data region");
    if (!cache->buf && !(cache->buf = malloc(f->chunk_bytes)))
        return mp_err(err, "no_memory", "out of memory");
    uint64_t rel = off - f->data_start;
    unsigned char *out = dst;
    while (len > 0) {
        uint64_t idx = rel / f->chunk_bytes, in = rel % f->chunk_bytes;
        size_t clen = stc_chunk_len(f, idx);
        if (!cache->valid || cache->idx != idx) {
            cache->valid = false;
            if (weights_pread(fd, cache->buf, clen, f->data_start + idx * f->chunk_bytes, err) !=
                    0 ||
                stc_decrypt_chunk(f, key, idx, cache->buf, clen, cache->buf, err) != 0)
                return -1;
            cache->idx = idx;
            cache->valid = true;
        }
        size_t n = clen - in < len ? (size_t)(clen - in) : len;
        memcpy(out, cache->buf + in, n);
        out += n;
        rel += n;
        len -= n;
    }
    return 0;
}

/* ---- helpers for jobs and tools ---- */

static bool path_under(const char *path, const char *root) {
    size_t n = root ? strlen(root) : 0;
    if (n == 0 || strncmp(path, root, n) != 0) return false;
    return path[n] == '/' || root[n - 1] == '/';
}

int stc_key_resolve(const char *given, const char *base_dir, const char *data_dir,
                    const char *const *roots, const char *field, char *out, mp_error *err) {
    char joined[PATH_MAX];
    int n = given[0] == '/' || !base_dir
                ? snprintf(joined, sizeof joined, "%s", given)
                : snprintf(joined, sizeof joined, "%s/%s", base_dir, given);
    if (n < 0 || n >= (int)sizeof joined)
        return mp_err_field(err, field, "bad_path", "key file path too long");
    if (!realpath(joined, out)) return mp_err_field(err, field, "not_found", "key file not found");
    char *data_real = data_dir ? realpath(data_dir, NULL) : NULL;
    bool ok = data_real && path_under(out, data_real);
    free(data_real);
    for (const char *const *r = roots; r && *r && !ok; r++)
        ok = path_under(out, *r);
    if (!ok)
        return mp_err_field(err, field, "bad_path",
                            "the key file must lie under a model root or the data dir");
    return 0;
}

int stc_encrypt_file(const char *in, const char *out, const unsigned char key[STC_KEY_BYTES],
                     uint64_t chunk_bytes, mp_error *err) {
    mp_weights w = {0};
    if (st_open(in, &w, err) != 0) return -1;
    if (stc_is_encrypted(&w)) {
        weights_free_fields(&w);
        return mp_err(err, "bad_request", "%s is already encrypted", in);
    }
    st_wtensor *ts = calloc(w.ntensors ? w.ntensors : 1, sizeof *ts);
    if (!ts) {
        weights_free_fields(&w);
        return mp_err(err, "no_memory", "out of memory");
    }
    for (size_t i = 0; i < w.ntensors; i++) {
        ts[i].name = w.tensors[i].name;
        ts[i].dtype = w.tensors[i].dtype;
        ts[i].ndim = w.tensors[i].ndim;
        memcpy(ts[i].shape, w.tensors[i].shape, sizeof ts[i].shape);
    }
    stc_writer *sw = NULL;
    int rc = stc_writer_open(out, ts, w.ntensors, w.metadata, key, chunk_bytes, &sw, err);
    unsigned char *buf = rc == 0 ? malloc(STC_DEFAULT_CHUNK) : NULL;
    if (rc == 0 && !buf) rc = mp_err(err, "no_memory", "out of memory");
    for (size_t k = 0; rc == 0 && k < w.ntensors; k++) {
        const mp_tensor *t = &w.tensors[stc_writer_order(sw, k)];
        for (uint64_t off = 0; rc == 0 && off < t->nbytes; off += STC_DEFAULT_CHUNK) {
            size_t len =
                t->nbytes - off < STC_DEFAULT_CHUNK ? (size_t)(t->nbytes - off) : STC_DEFAULT_CHUNK;
            rc = weights_pread(w.fds[0], buf, len, t->data_offset + off, err);
            if (rc == 0) rc = stc_writer_write(sw, buf, len, err);
        }
    }
    free(buf);
    if (rc == 0)
        rc = stc_writer_finish(sw, err);
    else if (sw)
        stc_writer_abort(sw);
    free(ts);
    weights_free_fields(&w);
    return rc;
}
