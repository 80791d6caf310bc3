/* export.h - the unix socket (--export-socket) over which an inference
 * process on the same node obtains a resident's arenas without loading the
 * weights again. Protocol: the client writes "<resident id>\n"; the server
 * answers with one JSON line (tensor table, arenas, CUDA IPC handles) whose
 * first bytes carry the host arenas' memfds as SCM_RIGHTS, then closes. */
#ifndef MP_SERVER_EXPORT_H
#define MP_SERVER_EXPORT_H
#include "server/context.h"
typedef struct export_server export_server;
int export_start(mp_server *srv, const char *path, export_server **out, mp_error *err);
void export_stop(export_server *e);
#endif
