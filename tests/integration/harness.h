/* harness.h - integration-test support: start the real modelprepd on an
 * ephemeral loopback port with a fresh data dir, and speak HTTP to it with
 * libcurl. */
#ifndef MP_TESTS_HARNESS_H
#define MP_TESTS_HARNESS_H
#include <jansson.h>
#include <stdbool.h>
#include <sys/types.h>

typedef struct mp_proc {
    pid_t pid;
    char base[128]; /* http://127.0.0.1:PORT */
    char data_dir[512];
    char log_path[600];
    char token[128]; /* sent as bearer when non-empty */
} mp_proc;

typedef struct http_result {
    long status;
    char *body;
    size_t len;
    json_t *json; /* parsed body, or NULL */
    char content_type[128];
    char location[256];
    char allow[128];
} http_result;

/* A fresh temp dir (caller frees with th_rmdir). */
char *th_tmpdir(void);
void th_rmdir(const char *dir);
/* Starts modelprepd with --data-dir data_dir (NULL: a fresh temp dir) and
 * the given extra args (NULL-terminated). Returns 0 when it printed its
 * listening line. */
int th_start(mp_proc *p, const char *data_dir, const char *const *args);
int th_start_env(mp_proc *p, const char *data_dir, const char *const *args, const char *const *env);
/* SIGTERM and wait; returns the exit status (0 clean). */
int th_stop(mp_proc *p);
void th_kill9(mp_proc *p);
/* Runs the binary to completion, returns its exit status. */
int th_run_expect_exit(const char *const *args, const char *const *env);

/* HTTP. headers: NULL-terminated "Name: value" strings or NULL. */
int th_http(mp_proc *p, const char *method, const char *path, const char *body, size_t len,
            const char *const *headers, http_result *out);
void th_result_free(http_result *r);
/* Convenience: submit a job JSON, assert 202, return the job id (caller frees). */
char *th_submit(mp_proc *p, const char *json_body);
/* Polls until the job ends; returns its final object (caller decrefs). */
json_t *th_wait_job(mp_proc *p, const char *id, double timeout_s);
/* Polls until the job reaches `state`. */
json_t *th_wait_state(mp_proc *p, const char *id, const char *state, double timeout_s);
/* Writes a file with given bytes. */
int th_write_file(const char *path, const void *data, size_t len);
#endif
