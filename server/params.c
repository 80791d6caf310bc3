/* params.c - declarative checking of a job's "params" against its type's
 * mp_param_spec list: unknown names, wrong JSON types, enum values and
 * integer ranges are refused with the field named ("params.<name>"). */
#include "server/params.h"

#include <stdio.h>
#include <string.h>

static const mp_param_spec *spec_find(const mp_param_spec *specs, const char *name) {
    for (const mp_param_spec *s = specs; s && s->name; s++)
        if (strcmp(s->name, name) == 0) return s;
    return NULL;
}

static int check_int(const mp_param_spec *s, json_t *v, const char *field, mp_error *err) {
    if (!json_is_integer(v))
        return mp_err_field(err, field, "bad_type", "%s must be an integer", field);
    json_int_t n = json_integer_value(v);
    if ((s->min || s->max) && (n < s->min || n > s->max))
        return mp_err_field(err, field, "out_of_range", "%s must be in %lld..%lld", field,
                            (long long)s->min, (long long)s->max);
    return 0;
}

static int check_one(const mp_param_spec *s, json_t *v, mp_error *err) {
    char field[96];
    snprintf(field, sizeof field, "params.%s", s->name);
    switch (s->kind) {
    case MP_P_STRING:
        if (!json_is_string(v))
            return mp_err_field(err, field, "bad_type", "%s must be a string", field);
        if (json_string_length(v) != strlen(json_string_value(v)))
            return mp_err_field(err, field, "bad_value", "%s contains a NUL byte", field);
        if (s->enum_values) {
            for (const char *const *e = s->enum_values; *e; e++)
                if (strcmp(*e, json_string_value(v)) == 0) return 0;
            char allowed[256] = "";
            for (const char *const *e = s->enum_values; *e; e++) {
                size_t l = strlen(allowed);
                snprintf(allowed + l, sizeof allowed - l, "%s%s", l ? ", " : "", *e);
            }
            return mp_err_field(err, field, "bad_value", "%s must be one of: %s", field, allowed);
        }
        return 0;
    case MP_P_INT:
        return check_int(s, v, field, err);
    case MP_P_NUMBER:
        if (!json_is_number(v))
            return mp_err_field(err, field, "bad_type", "%s must be a number", field);
        return 0;
    case MP_P_BOOL:
        if (!json_is_boolean(v))
            return mp_err_field(err, field, "bad_type", "%s must be a boolean", field);
        return 0;
    case MP_P_STRING_ARRAY:
    case MP_P_INT_ARRAY: {
        if (!json_is_array(v))
            return mp_err_field(err, field, "bad_type", "%s must be an array", field);
        if (json_array_size(v) > 1024)
            return mp_err_field(err, field, "out_of_range", "%s has over 1024 items", field);
        size_t i;
        json_t *it;
        json_array_foreach(v, i, it) {
            if (s->kind == MP_P_INT_ARRAY) {
                if (check_int(s, it, field, err) != 0) return -1;
            } else if (!json_is_string(it) ||
                       json_string_length(it) != strlen(json_string_value(it))) {
                return mp_err_field(err, field, "bad_type", "%s must hold strings", field);
            }
        }
        return 0;
    }
    case MP_P_OBJECT:
        if (!json_is_object(v))
            return mp_err_field(err, field, "bad_type", "%s must be an object", field);
        return 0;
    }
    return mp_err_field(err, field, "internal", "unknown param kind");
}

int params_check(const mp_param_spec *specs, json_t *params, mp_error *err) {
    const char *key;
    json_t *v;
    json_object_foreach(params, key, v) {
        const mp_param_spec *s = spec_find(specs, key);
        if (!s) {
            /* Say what is accepted, so a typo is fixed from the answer alone. */
            char field[96], known[512] = "";
            snprintf(field, sizeof field, "params.%s", key);
            for (const mp_param_spec *k = specs; k && k->name; k++) {
                size_t l = strlen(known);
                snprintf(known + l, sizeof known - l, "%s%s", l ? ", " : "", k->name);
            }
            if (!known[0])
                return mp_err_field(err, field, "unknown_field",
                                    "unknown param %s: this job type takes no params", key);
            return mp_err_field(err, field, "unknown_field",
                                "unknown param %s: this job type takes %s", key, known);
        }
        if (check_one(s, v, err) != 0) return -1;
    }
    return 0;
}
