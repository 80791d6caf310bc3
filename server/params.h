/* params.h - checking request params against a job type's spec. */
#ifndef MP_SERVER_PARAMS_H
#define MP_SERVER_PARAMS_H
#include <jansson.h>
#include "util/error.h"
#include "util/jobtype.h"
int params_check(const mp_param_spec *specs, json_t *params, mp_error *err);
#endif
