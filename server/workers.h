/* workers.h - the worker pool: N threads that claim queued jobs from the
 * store and run them through their type's run function (util/task.h). */
#ifndef MP_SERVER_WORKERS_H
#define MP_SERVER_WORKERS_H
#include "server/context.h"

typedef struct worker_pool worker_pool;

int workers_start(mp_server *srv, int n, worker_pool **out);
/* A job was queued: wake an idle worker. */
void workers_notify(worker_pool *p);
/* Requests cancellation of a running job (or one being claimed right now). */
void workers_cancel(worker_pool *p, const char *job_id);
/* Drain: running jobs see task_cancelled()/task_draining(); waits for every
 * worker to return, then frees the pool. */
void workers_stop(worker_pool *p);
int workers_busy(worker_pool *p);
int workers_count(worker_pool *p);
#endif
