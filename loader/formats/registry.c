/*
 * registry.c - the table of weight-file formats weights_open knows, in the
 * order their detectors are tried. A format is added here, by one line,
 * once its folder defines its handler (see formats_internal.h).
 */
#include "loader/formats/formats_internal.h"

/* Defined in each family's folder. */
extern const mp_format_handler mp_format_safetensors, mp_format_pytorch_zip,
    mp_format_pytorch_legacy, mp_format_gguf, mp_format_npy;

/* First match wins, so order matters where two formats' signatures can
 * overlap: safetensors starts with a free-form 8-byte length, which a zip's
 * "PK\3\4" (67 MB, if four zero bytes follow) and a legacy pickle's 80 02
 * (640 bytes) can both read as. The zip's four-byte magic goes first, the
 * legacy stream's two-byte one last. */
const mp_format_handler *const mp_format_handlers[] = {
    &mp_format_pytorch_zip,    /* "PK\3\4", or "PK\5\6" (an empty zip) */
    &mp_format_gguf,           /* "GGUF" */
    &mp_format_npy,            /* "\x93NUMPY" */
    &mp_format_safetensors,    /* a plausible length, then '{' */
    &mp_format_pytorch_legacy, /* 80 02..05: a pickle's PROTO opcode */
    NULL,
};
