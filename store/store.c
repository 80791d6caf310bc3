/*
 * store.c - opening the database: pragmas, migrations (PRAGMA user_version),
 * the connection pool and the statement cache. Statement text for every
 * query lives here, in one table, so the schema and its uses are read together.
 */
#include "store/store_db.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* Each migration moves user_version from its index to index+1. Never edit a
 * released step; append a new one. */
static const char *const MIGRATIONS[] = {
    "CREATE TABLE jobs("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id TEXT UNIQUE NOT NULL, type TEXT NOT NULL, model TEXT NOT NULL,"
    " revision TEXT NOT NULL, state TEXT NOT NULL, doc TEXT NOT NULL,"
    " checkpoint TEXT, created_at TEXT NOT NULL);"
    "CREATE INDEX jobs_state ON jobs(state, seq);"
    "CREATE INDEX jobs_model ON jobs(model, seq);"
    "CREATE TABLE job_events(id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " job_id TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL, at TEXT NOT NULL);"
    "CREATE INDEX job_events_job ON job_events(job_id, id);"
    "CREATE TABLE idempotency(key TEXT PRIMARY KEY, job_id TEXT NOT NULL,"
    " request_hash TEXT NOT NULL, created_at TEXT NOT NULL);"
    "CREATE TABLE file_hashes(model TEXT NOT NULL, revision TEXT NOT NULL, name TEXT NOT NULL,"
    " size INTEGER NOT NULL, sha256 TEXT NOT NULL, recorded_at TEXT NOT NULL,"
    " PRIMARY KEY(model, revision, name));"
    "CREATE TABLE inspections(model TEXT NOT NULL, revision TEXT NOT NULL, job_id TEXT,"
    " result TEXT NOT NULL, at TEXT NOT NULL, PRIMARY KEY(model, revision));"
    "CREATE TABLE residents(id TEXT PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL,"
    " state TEXT NOT NULL, doc TEXT NOT NULL, created_at TEXT NOT NULL);",
    /* 2: child jobs (a prepare's steps) name their parent; jobs that write a
     * model folder name it, so two active jobs never target the same one. */
    "ALTER TABLE jobs ADD COLUMN parent TEXT;"
    "ALTER TABLE jobs ADD COLUMN output TEXT;"
    "CREATE INDEX jobs_parent ON jobs(parent, seq);"
    "CREATE INDEX jobs_output ON jobs(output, state) WHERE output IS NOT NULL;",
};
enum { N_MIGRATIONS = sizeof MIGRATIONS / sizeof MIGRATIONS[0] };

static const char *const SQL[Q_COUNT] = {
    [Q_JOB_INSERT] = "INSERT INTO jobs(id,type,model,revision,state,doc,created_at,parent,output)"
                     " VALUES(?1,?2,?3,?4,?7,?5,?6,?8,?9)",
    [Q_JOB_OUTPUT_BUSY] = "SELECT id FROM jobs WHERE output=?1 AND state IN ('queued','running')"
                          " LIMIT 1",
    [Q_JOB_GET] = "SELECT doc FROM jobs WHERE id=?1",
    [Q_JOB_UPDATE] = "UPDATE jobs SET state=?2, doc=?3 WHERE id=?1",
    [Q_JOB_CLAIM] = "UPDATE jobs SET state='running' WHERE seq=(SELECT seq FROM jobs"
                    " WHERE state='queued' ORDER BY seq LIMIT 1) RETURNING id, doc, checkpoint",
    [Q_JOB_CHECKPOINT_GET] = "SELECT checkpoint FROM jobs WHERE id=?1",
    [Q_JOB_CANCEL_QUEUED] = "UPDATE jobs SET state='cancelled' WHERE id=?1 AND state='queued'"
                            " RETURNING doc",
    [Q_JOB_SET_CHECKPOINT] = "UPDATE jobs SET checkpoint=?2 WHERE id=?1",
    [Q_JOB_LIST] = "SELECT seq, doc FROM jobs WHERE seq < ?1"
                   " AND (?2 IS NULL OR state=?2) AND (?3 IS NULL OR type=?3)"
                   " AND (?4 IS NULL OR model=?4) AND (?6 IS NULL OR parent=?6)"
                   " ORDER BY seq DESC LIMIT ?5",
    [Q_JOB_RUNNING] = "SELECT id, type, doc FROM jobs WHERE state='running'",
    [Q_JOB_COUNTS] = "SELECT type, state, count(*) FROM jobs GROUP BY type, state",
    [Q_JOB_ACTIVE_MODEL] = "SELECT 1 FROM jobs WHERE model=?1 AND state IN ('queued','running')"
                           " LIMIT 1",
    [Q_IDEM_GET] = "SELECT job_id, request_hash FROM idempotency WHERE key=?1",
    [Q_IDEM_PUT] = "INSERT INTO idempotency(key,job_id,request_hash,created_at)"
                   " VALUES(?1,?2,?3,?4)",
    [Q_EVENT_APPEND] = "INSERT INTO job_events(job_id,kind,data,at) VALUES(?1,?2,?3,?4)",
    [Q_EVENT_EACH] = "SELECT id, kind, data FROM job_events WHERE job_id=?1 ORDER BY id",
    [Q_HASH_GET] = "SELECT name, size, sha256 FROM file_hashes WHERE model=?1 AND revision=?2",
    [Q_HASH_PUT] = "INSERT OR REPLACE INTO file_hashes(model,revision,name,size,sha256,"
                   "recorded_at) VALUES(?1,?2,?3,?4,?5,strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
    [Q_INSP_PUT] = "INSERT OR REPLACE INTO inspections(model,revision,job_id,result,at)"
                   " VALUES(?1,?2,?3,?4,strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
    [Q_INSP_GET] = "SELECT result, job_id, at FROM inspections WHERE model=?1 AND revision=?2",
    [Q_RES_PUT] = "INSERT OR REPLACE INTO residents(id,model,revision,state,doc,created_at)"
                  " VALUES(?1,?2,?3,?4,?5,strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
    [Q_RES_STATE] = "UPDATE residents SET state=?2 WHERE id=?1",
    [Q_RES_ALL_GONE] = "UPDATE residents SET state='gone' WHERE state='resident'",
    [Q_RES_LIST] = "SELECT doc, state FROM residents ORDER BY created_at DESC, id",
    [Q_RES_GET] = "SELECT doc, state FROM residents WHERE id=?1",
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SAVEPOINT] = "SAVEPOINT one_job",
    [Q_RELEASE] = "RELEASE one_job",
    [Q_ROLLBACK_TO] = "ROLLBACK TO one_job",
};

static int db_exec(sqlite3 *db, const char *sql, mp_error *err) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        mp_err(err, "store_error", "%s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

static int db_migrate(sqlite3 *db, mp_error *err) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
        return mp_err(err, "store_error", "%s", sqlite3_errmsg(db));
    int version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : -1;
    sqlite3_finalize(st);
    if (version < 0) return mp_err(err, "store_error", "cannot read user_version");
    if (version > N_MIGRATIONS)
        return mp_err(err, "store_error",
                      "database schema version %d is newer than this build (%d)", version,
                      N_MIGRATIONS);
    for (int v = version; v < N_MIGRATIONS; v++) {
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version=%d;", v + 1);
        if (db_exec(db, "BEGIN IMMEDIATE", err) != 0) return -1;
        if (db_exec(db, MIGRATIONS[v], err) != 0 || db_exec(db, pragma, err) != 0) {
            db_exec(db, "ROLLBACK", NULL);
            return -1;
        }
        if (db_exec(db, "COMMIT", err) != 0) return -1;
    }
    return 0;
}

static int conn_open(const char *path, sqlite3 **out, mp_error *err) {
    sqlite3 *db = NULL;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(path, &db, flags, NULL) != SQLITE_OK) {
        mp_err(err, "store_error", "open %s: %s", path, db ? sqlite3_errmsg(db) : "no memory");
        sqlite3_close(db);
        return -1;
    }
    /* WAL lets the HTTP threads read while a worker writes; NORMAL sync is
     * durable across process crashes, which is what job recovery needs. */
    sqlite3_busy_timeout(db, 5000);
    if (db_exec(db,
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                " PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;",
                err) != 0) {
        sqlite3_close(db);
        return -1;
    }
    *out = db;
    return 0;
}

#define CKPT_INTERVAL_MS 500

static void *store_checkpointer(void *arg) {
    store *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->ckpt_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += CKPT_INTERVAL_MS * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->ckpt_cv, &s->mu, &ts);
        if (s->ckpt_stop) break;
        pthread_mutex_unlock(&s->mu);
        /* PASSIVE never waits for readers or writers. */
        sqlite3_wal_checkpoint_v2(s->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int store_open(const char *path, int pool_size, store **out, mp_error *err) {
    if (pool_size < 1) pool_size = 1;
    store *s = calloc(1, sizeof *s);
    if (!s) return mp_err(err, "no_memory", "out of memory");
    s->path = strdup(path);
    s->conns = calloc((size_t)pool_size, sizeof *s->conns);
    if (!s->path || !s->conns) {
        free(s->path);
        free(s->conns);
        free(s);
        return mp_err(err, "no_memory", "out of memory");
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->wmu, NULL);
    pthread_mutex_init(&s->gmu, NULL);
    pthread_cond_init(&s->gcv, NULL);
    s->gtail = &s->ghead;
    pthread_cond_init(&s->ckpt_cv, NULL);
    for (int i = 0; i < pool_size; i++) {
        if (conn_open(path, &s->conns[i].db, err) != 0) goto fail;
        s->nconns++;
        if (i == 0 && db_migrate(s->conns[0].db, err) != 0) goto fail;
    }
    if (conn_open(path, &s->ckpt_db, err) != 0) goto fail;
    if (pthread_create(&s->ckpt_thread, NULL, store_checkpointer, s) != 0) {
        mp_err(err, "store_error", "cannot start the checkpointer");
        goto fail;
    }
    s->ckpt_running = true;
    *out = s;
    return 0;
fail:
    store_close(s);
    return -1;
}

void store_close(store *s) {
    if (!s) return;
    if (s->ckpt_running) {
        pthread_mutex_lock(&s->mu);
        s->ckpt_stop = true;
        pthread_cond_signal(&s->ckpt_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->ckpt_thread, NULL);
    }
    if (s->ckpt_db) {
        sqlite3_wal_checkpoint_v2(s->ckpt_db, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL);
        sqlite3_close(s->ckpt_db);
    }
    for (int i = 0; i < s->nconns; i++) {
        for (int q = 0; q < Q_COUNT; q++)
            sqlite3_finalize(s->conns[i].stmt[q]);
        /* The last connection to close checkpoints the WAL into the main file. */
        sqlite3_close(s->conns[i].db);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->wmu);
    pthread_mutex_destroy(&s->gmu);
    pthread_cond_destroy(&s->gcv);
    pthread_cond_destroy(&s->ckpt_cv);
    free(s->conns);
    free(s->path);
    free(s);
}

store_conn *store_acquire(store *s) {
    pthread_mutex_lock(&s->mu);
    for (;;) {
        for (int i = 0; i < s->nconns; i++) {
            if (!s->conns[i].busy) {
                s->conns[i].busy = 1;
                pthread_mutex_unlock(&s->mu);
                return &s->conns[i];
            }
        }
        pthread_cond_wait(&s->cv, &s->mu);
    }
}

void store_release(store *s, store_conn *c) {
    pthread_mutex_lock(&s->mu);
    c->busy = 0;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

store_conn *store_acquire_write(store *s) {
    /* Writer mutex first, then a connection: readers never wait on it. */
    pthread_mutex_lock(&s->wmu);
    return store_acquire(s);
}

void store_release_write(store *s, store_conn *c) {
    store_release(s, c);
    pthread_mutex_unlock(&s->wmu);
}

sqlite3_stmt *store_stmt(store_conn *c, stmt_id id) {
    if (!c->stmt[id]) {
        if (sqlite3_prepare_v3(c->db, SQL[id], -1, SQLITE_PREPARE_PERSISTENT, &c->stmt[id], NULL) !=
            SQLITE_OK)
            return NULL;
    }
    sqlite3_reset(c->stmt[id]);
    sqlite3_clear_bindings(c->stmt[id]);
    return c->stmt[id];
}

bool store_ping(store *s) {
    store_conn *c = store_acquire(s);
    bool ok = sqlite3_exec(c->db, "SELECT 1", NULL, NULL, NULL) == SQLITE_OK;
    store_release(s, c);
    return ok;
}

int64_t store_size_bytes(store *s) {
    struct stat st;
    int64_t total = 0;
    char wal[4096];
    if (stat(s->path, &st) == 0) total += st.st_size;
    snprintf(wal, sizeof wal, "%s-wal", s->path);
    if (stat(wal, &st) == 0) total += st.st_size;
    return total;
}
