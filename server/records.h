/*
 * records.h - the store behind the narrow recording interfaces that loader/
 * code is given instead of the store itself: the resident set's res_records
 * (so that residents of a dead process are listed as gone after a restart).
 * The task records (file hashes, inspections) are the task_* calls of
 * util/task.h, implemented by the worker pool on top of the same store.
 *
 * Failures are logged here, once, with what they cost, because the callers
 * cannot do anything better with them than go on.
 */
#ifndef MP_SERVER_RECORDS_H
#define MP_SERVER_RECORDS_H

#include "loader/residents/residents.h"
#include "server/context.h"

/* Recorders for srv->store, logging to srv->log; srv must outlive them. */
res_records records_residents(mp_server *srv);

#endif
