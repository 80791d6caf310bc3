/* store_db.h - private to store/: the connection pool and statement cache
 * that store_*.c files share. */
#ifndef MP_STORE_DB_H
#define MP_STORE_DB_H
#include <pthread.h>
#include <stdbool.h>
#include <sqlite3.h>
#include "store/store.h"

typedef enum stmt_id {
    Q_JOB_INSERT,
    Q_JOB_OUTPUT_BUSY,
    Q_JOB_GET,
    Q_JOB_UPDATE,
    Q_JOB_CLAIM,
    Q_JOB_CHECKPOINT_GET,
    Q_JOB_CANCEL_QUEUED,
    Q_JOB_SET_CHECKPOINT,
    Q_JOB_LIST,
    Q_JOB_RUNNING,
    Q_JOB_COUNTS,
    Q_JOB_ACTIVE_MODEL,
    Q_IDEM_GET,
    Q_IDEM_PUT,
    Q_EVENT_APPEND,
    Q_EVENT_EACH,
    Q_HASH_GET,
    Q_HASH_PUT,
    Q_INSP_PUT,
    Q_INSP_GET,
    Q_RES_PUT,
    Q_RES_STATE,
    Q_RES_ALL_GONE,
    Q_RES_LIST,
    Q_RES_GET,
    Q_BEGIN,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SAVEPOINT,
    Q_RELEASE,
    Q_ROLLBACK_TO,
    Q_COUNT
} stmt_id;

typedef struct store_conn {
    sqlite3 *db;
    sqlite3_stmt *stmt[Q_COUNT];
    int busy;
} store_conn;

struct store {
    char *path;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* One writer at a time inside the process: SQLite's own busy handler
     * sleeps in steps of milliseconds, which shows up as tail latency. */
    pthread_mutex_t wmu;
    /* group commit of job inserts (store_jobs.c) */
    pthread_mutex_t gmu;
    pthread_cond_t gcv;
    struct insert_req *ghead, **gtail;
    bool gleader;
    /* background WAL checkpointer (store.c) */
    sqlite3 *ckpt_db;
    pthread_t ckpt_thread;
    bool ckpt_running, ckpt_stop;
    pthread_cond_t ckpt_cv;
    store_conn *conns;
    int nconns;
};

store_conn *store_acquire(store *s);
/* A connection for a write: also holds the store's writer mutex. */
store_conn *store_acquire_write(store *s);
void store_release_write(store *s, store_conn *c);
void store_release(store *s, store_conn *c);
/* The prepared statement for id on this connection, reset and unbound. */
sqlite3_stmt *store_stmt(store_conn *c, stmt_id id);
#endif
