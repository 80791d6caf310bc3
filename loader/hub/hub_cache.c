/*
 * hub_cache.c - huggingface_hub's cache layout: models--org--name/ with
 * blobs/<etag>, snapshots/<commit>/<path> as relative symlinks into blobs/,
 * refs/<revision> holding the commit; and SGLang's per-repo lock file.
 */
#include "loader/hub/hub.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "util/fsutil.h"

static bool all_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return s[n] == 0;
}

bool hub_is_commit(const char *s) {
    return s && strlen(s) == 40 && all_hex(s, 40);
}

bool hub_etag_valid(const char *s) {
    size_t n = s ? strlen(s) : 0;
    return (n == 40 || n == 64) && all_hex(s, n);
}

/* org/name with the hub's characters: letters, digits, '-', '_', '.'; no
 * component starting with '.' (so no "..") and at most 96 chars each. */
bool hub_repo_id_valid(const char *repo) {
    if (!repo) return false;
    const char *slash = strchr(repo, '/');
    if (!slash || strchr(slash + 1, '/')) return false;
    const char *parts[2] = {repo, slash + 1};
    size_t lens[2] = {(size_t)(slash - repo), strlen(slash + 1)};
    for (int p = 0; p < 2; p++) {
        if (lens[p] == 0 || lens[p] > 96 || parts[p][0] == '.' || parts[p][0] == '-') return false;
        for (size_t i = 0; i < lens[p]; i++) {
            char c = parts[p][i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_' || c == '.'))
                return false;
        }
    }
    /* "--" is the cache's separator; ".." is refused by the hub too */
    return !strstr(repo, "--") && !strstr(repo, "..");
}

int hub_repo_dir(char *buf, size_t n, const char *cache, const char *repo, mp_error *err) {
    if (!hub_repo_id_valid(repo)) return mp_err(err, "bad_request", "invalid repo id");
    const char *slash = strchr(repo, '/');
    int w = snprintf(buf, n, "%s/models--%.*s--%s", cache, (int)(slash - repo), repo, slash + 1);
    if (w < 0 || (size_t)w >= n) return mp_err(err, "bad_path", "cache path too long");
    return 0;
}

int hub_link_target(char *buf, size_t n, const char *path, const char *etag, mp_error *err) {
    if (!hub_path_safe(path, strlen(path)) || !hub_etag_valid(etag))
        return mp_err(err, "unsafe_path", "refusing path %s", path);
    /* snapshots/<commit>/<dirs...>/file: up once per dir, then commit, then snapshots */
    size_t ups = 2;
    for (const char *c = path; *c; c++)
        ups += (*c == '/');
    size_t need = ups * 3 + strlen("blobs/") + strlen(etag) + 1;
    if (need > n) return mp_err(err, "bad_path", "path too deep");
    buf[0] = 0;
    for (size_t i = 0; i < ups; i++)
        strcat(buf, "../");
    strcat(buf, "blobs/");
    strcat(buf, etag);
    return 0;
}

int hub_lock_path(char *buf, size_t n, const char *cache, const char *repo) {
    char name[256];
    int w = snprintf(name, sizeof name, "%s", repo);
    if (w < 0 || (size_t)w >= sizeof name) return -1;
    for (char *c = name; *c; c++)
        if (*c == '/') *c = '-';
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(name, strlen(name), md, &mdlen, EVP_sha256(), NULL)) return -1;
    char hex[65];
    fs_hex(md, mdlen, hex);
    w = snprintf(buf, n, "%s/.locks/%s%s.lock", cache, hex, name);
    return (w < 0 || (size_t)w >= n) ? -1 : 0;
}

int hub_lock_repo(const char *cache, const char *repo, hub_cancel_fn cancel, void *arg,
                  mp_error *err) {
    char path[4096];
    if (hub_lock_path(path, sizeof path, cache, repo) != 0)
        return mp_err(err, "bad_path", "lock path too long");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/.locks", cache);
    if (fs_mkdirs(dir, err) != 0) return -1;
    /* filelock opens with mode 0o666 so that users can share a cache */
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) return mp_err(err, "io_error", "open %s: %s", path, strerror(errno));
    for (;;) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return fd;
        if (errno != EWOULDBLOCK && errno != EINTR) {
            int e = errno;
            close(fd);
            return mp_err(err, "io_error", "flock %s: %s", path, strerror(e));
        }
        if (cancel && cancel(arg)) {
            close(fd);
            return mp_err(err, "cancelled", "cancelled while waiting for the repo lock");
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

int hub_write_ref(const char *repo_dir, const char *revision, const char *commit, mp_error *err) {
    if (!hub_path_safe(revision, strlen(revision)) || !hub_is_commit(commit))
        return mp_err(err, "bad_request", "invalid revision");
    char path[4096];
    int w = snprintf(path, sizeof path, "%s/refs/%s", repo_dir, revision);
    if (w < 0 || (size_t)w >= sizeof path) return mp_err(err, "bad_path", "ref path too long");
    char dir[4096];
    memcpy(dir, path, (size_t)w + 1);
    *strrchr(dir, '/') = 0;
    if (fs_mkdirs(dir, err) != 0) return -1;
    /* huggingface_hub writes the bare hash, no newline */
    return fs_write_atomic(path, commit, 40, err);
}

int hub_publish_link(const char *repo_dir, const char *commit, const char *path, const char *etag,
                     mp_error *err) {
    char target[4096], link[4096], tmp[4200];
    if (!hub_is_commit(commit)) return mp_err(err, "bad_response", "invalid commit");
    if (hub_link_target(target, sizeof target, path, etag, err) != 0) return -1;
    int w = snprintf(link, sizeof link, "%s/snapshots/%s/%s", repo_dir, commit, path);
    if (w < 0 || (size_t)w >= sizeof link) return mp_err(err, "bad_path", "path too long");
    char dir[4096];
    memcpy(dir, link, (size_t)w + 1);
    *strrchr(dir, '/') = 0;
    if (fs_mkdirs(dir, err) != 0) return -1;
    char cur[4096];
    ssize_t r = readlink(link, cur, sizeof cur - 1);
    if (r >= 0) {
        cur[r] = 0;
        if (strcmp(cur, target) == 0) return 0;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", link, (int)getpid());
    unlink(tmp);
    if (symlink(target, tmp) != 0)
        return mp_err(err, "io_error", "symlink %s: %s", tmp, strerror(errno));
    if (rename(tmp, link) != 0) {
        int e = errno;
        unlink(tmp);
        return mp_err(err, "io_error", "rename %s: %s", link, strerror(e));
    }
    return 0;
}

int hub_free_bytes(const char *path, uint64_t *out, mp_error *err) {
    struct statvfs sv;
    if (statvfs(path, &sv) != 0)
        return mp_err(err, "io_error", "statvfs %s: %s", path, strerror(errno));
    uint64_t v;
    if (__builtin_mul_overflow((uint64_t)sv.f_bavail, (uint64_t)sv.f_frsize, &v)) v = UINT64_MAX;
    *out = v;
    return 0;
}

int hub_check_space(uint64_t need, uint64_t free_bytes, const char *dir, mp_error *err) {
    uint64_t want = need > UINT64_MAX - HUB_SPACE_MARGIN ? UINT64_MAX : need + HUB_SPACE_MARGIN;
    if (want <= free_bytes) return 0;
    return mp_err(err, "insufficient_space",
                  "need %llu bytes + %llu MiB margin = %llu bytes in %s, %llu free; free up "
                  "space there or point HF_HUB_CACHE at a larger disk",
                  (unsigned long long)need, (unsigned long long)(HUB_SPACE_MARGIN >> 20),
                  (unsigned long long)want, dir, (unsigned long long)free_bytes);
}
