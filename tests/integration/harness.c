/* harness.c - see harness.h. */
#include "tests/integration/harness.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *server_bin(void) {
    const char *b = getenv("MODELPREPD");
    return b && *b ? b : "build/asan/modelprepd";
}

char *th_tmpdir(void) {
    char tmpl[] = "/tmp/mp-test-XXXXXX";
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void th_rmdir(const char *dir) {
    if (dir) nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

int th_start_env(mp_proc *p, const char *data_dir, const char *const *args,
                 const char *const *env) {
    if (!data_dir) {
        char *d = th_tmpdir();
        if (!d) return -1;
        snprintf(p->data_dir, sizeof p->data_dir, "%s", d);
        free(d);
    } else if (data_dir != p->data_dir) {
        snprintf(p->data_dir, sizeof p->data_dir, "%s", data_dir);
    }
    snprintf(p->log_path, sizeof p->log_path, "%s.log", p->data_dir);
    int out[2];
    if (pipe(out) != 0) return -1;
    const char *argv[64];
    int n = 0;
    argv[n++] = server_bin();
    argv[n++] = "--listen";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--data-dir";
    argv[n++] = p->data_dir;
    for (int i = 0; args && args[i] && n < 62; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(out[1], 1);
        int logfd = open(p->log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (logfd >= 0) dup2(logfd, 2);
        close(out[0]);
        close(out[1]);
        for (int i = 0; env && env[i]; i++)
            putenv((char *)env[i]);
        unsetenv("HF_HUB_CACHE");
        unsetenv("HF_HOME");
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(out[1]);
    p->pid = pid;
    char line[256];
    size_t len = 0;
    while (len < sizeof line - 1) {
        ssize_t r = read(out[0], line + len, 1);
        if (r <= 0) break;
        if (line[len] == '\n') break;
        len++;
    }
    line[len] = 0;
    close(out[0]);
    const char *pfx = "listening on ";
    if (strncmp(line, pfx, strlen(pfx)) != 0) {
        fprintf(stderr, "server did not start: '%s' (log %s)\n", line, p->log_path);
        th_kill9(p);
        return -1;
    }
    snprintf(p->base, sizeof p->base, "%s", line + strlen(pfx));
    return 0;
}

int th_start(mp_proc *p, const char *data_dir, const char *const *args) {
    return th_start_env(p, data_dir, args, NULL);
}

int th_stop(mp_proc *p) {
    if (p->pid <= 0) return 0;
    kill(p->pid, SIGTERM);
    int status = 0;
    for (int i = 0; i < 600; i++) {
        pid_t r = waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid) {
            p->pid = 0;
            if (WIFEXITED(status)) return WEXITSTATUS(status);
            return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        }
        usleep(100 * 1000);
    }
    th_kill9(p);
    return -1;
}

void th_kill9(mp_proc *p) {
    if (p->pid <= 0) return;
    kill(p->pid, SIGKILL);
    waitpid(p->pid, NULL, 0);
    p->pid = 0;
}

int th_run_expect_exit(const char *const *args, const char *const *env) {
    const char *argv[64];
    int n = 0;
    argv[n++] = server_bin();
    for (int i = 0; args && args[i] && n < 62; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        for (int i = 0; env && env[i]; i++)
            putenv((char *)env[i]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *arg) {
    http_result *r = arg;
    size_t n = size * nmemb;
    char *b = realloc(r->body, r->len + n + 1);
    if (!b) return 0;
    memcpy(b + r->len, ptr, n);
    r->body = b;
    r->len += n;
    r->body[r->len] = 0;
    return n;
}

static void header_value(const char *line, size_t n, const char *name, char *out, size_t outlen) {
    size_t nl = strlen(name);
    if (n <= nl || strncasecmp(line, name, nl) != 0) return;
    const char *v = line + nl;
    size_t vl = n - nl;
    while (vl && (*v == ' '))
        v++, vl--;
    while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n'))
        vl--;
    if (vl >= outlen) vl = outlen - 1;
    memcpy(out, v, vl);
    out[vl] = 0;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *arg) {
    http_result *r = arg;
    size_t n = size * nmemb;
    header_value(ptr, n, "Content-Type:", r->content_type, sizeof r->content_type);
    header_value(ptr, n, "Location:", r->location, sizeof r->location);
    header_value(ptr, n, "Allow:", r->allow, sizeof r->allow);
    return n;
}

int th_http(mp_proc *p, const char *method, const char *path, const char *body, size_t len,
            const char *const *headers, http_result *out) {
    memset(out, 0, sizeof *out);
    CURL *c = curl_easy_init();
    if (!c) return -1;
    char url[1024];
    snprintf(url, sizeof url, "%s%s", p->base, path);
    struct curl_slist *hl = NULL;
    char auth[256];
    if (p->token[0]) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", p->token);
        hl = curl_slist_append(hl, auth);
    }
    if (body) hl = curl_slist_append(hl, "Content-Type: application/json");
    for (int i = 0; headers && headers[i]; i++)
        hl = curl_slist_append(hl, headers[i]);
    hl = curl_slist_append(hl, "Expect:");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "HEAD") == 0) curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, out);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    CURLcode rc = curl_easy_perform(c);
    if (rc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out->status);
    curl_slist_free_all(hl);
    curl_easy_cleanup(c);
    if (rc != CURLE_OK) {
        fprintf(stderr, "curl %s %s: %s\n", method, url, curl_easy_strerror(rc));
        return -1;
    }
    if (out->body) out->json = json_loadb(out->body, out->len, 0, NULL);
    return 0;
}

void th_result_free(http_result *r) {
    free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

char *th_submit(mp_proc *p, const char *json_body) {
    http_result r;
    if (th_http(p, "POST", "/v1/jobs", json_body, strlen(json_body), NULL, &r) != 0) return NULL;
    char *id = NULL;
    if (r.status == 202 && r.json)
        id = strdup(json_string_value(json_object_get(r.json, "id")));
    else
        fprintf(stderr, "submit -> %ld %s\n", r.status, r.body ? r.body : "");
    th_result_free(&r);
    return id;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

json_t *th_wait_state(mp_proc *p, const char *id, const char *state, double timeout_s) {
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s", id);
    double deadline = now_s() + timeout_s;
    while (now_s() < deadline) {
        http_result r;
        if (th_http(p, "GET", path, NULL, 0, NULL, &r) != 0) return NULL;
        const char *st = json_string_value(json_object_get(r.json, "state"));
        bool terminal =
            st && (!strcmp(st, "succeeded") || !strcmp(st, "failed") || !strcmp(st, "cancelled"));
        if (st && (state ? strcmp(st, state) == 0 : terminal)) {
            json_t *doc = json_incref(r.json);
            th_result_free(&r);
            return doc;
        }
        th_result_free(&r);
        usleep(20 * 1000);
    }
    fprintf(stderr, "job %s did not reach %s in %.0fs\n", id, state ? state : "an end", timeout_s);
    return NULL;
}

json_t *th_wait_job(mp_proc *p, const char *id, double timeout_s) {
    return th_wait_state(p, id, NULL, timeout_s);
}

int th_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, len, f);
    return fclose(f) == 0 && w == len ? 0 : -1;
}
