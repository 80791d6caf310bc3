/*
 * test_pickle.c - the PyTorch loader against hostile and broken input:
 * the pkl_ machine's opcode semantics (memo references, signed LONG1,
 * big-endian BINFLOAT, SETITEMS order, protocol 4 framing), the torch
 * allowlist (forbidden globals are refused by name, nothing runs), limits
 * (nesting, memo indices, marks, absurd lengths: clean errors, no huge
 * allocation), the zip reader (zip64, prefixes, compressed records), and
 * pt_open on real torch.save bytes, truncated at every length and with
 * every byte flipped.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "loader/formats/pytorch/pickle_internal.h"
#include "loader/formats/pytorch/pytorch.h"
#include "loader/formats/pytorch/pt_zip_internal.h"
#include "loader/formats/weights.h"

/* torch 1.13 torch.save of {"w": arange(6).reshape(2,3) f32, "tied": w,
 * "t": w.t(), "h": tensor([1.5, -2.0], f16)}: zip (to a buffer, prefix
 * "archive"), legacy (_use_new_zipfile_serialization=False), and the zip's
 * data.pkl alone. */
static const unsigned char zip_small[] = {
    0x50, 0x4b, 0x03, 0x04, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x12, 0x00, 0x61, 0x72,
    0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2e, 0x70, 0x6b, 0x6c, 0x46, 0x42,
    0x0e, 0x00, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58, 0x01, 0x00, 0x00, 0x00, 0x77, 0x71, 0x01, 0x63, 0x74,
    0x6f, 0x72, 0x63, 0x68, 0x2e, 0x5f, 0x75, 0x74, 0x69, 0x6c, 0x73, 0x0a, 0x5f, 0x72, 0x65, 0x62,
    0x75, 0x69, 0x6c, 0x64, 0x5f, 0x74, 0x65, 0x6e, 0x73, 0x6f, 0x72, 0x5f, 0x76, 0x32, 0x0a, 0x71,
    0x02, 0x28, 0x28, 0x58, 0x07, 0x00, 0x00, 0x00, 0x73, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x71,
    0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x0a, 0x46, 0x6c, 0x6f, 0x61, 0x74, 0x53, 0x74, 0x6f,
    0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x04, 0x58, 0x01, 0x00, 0x00, 0x00, 0x30, 0x71, 0x05, 0x58,
    0x03, 0x00, 0x00, 0x00, 0x63, 0x70, 0x75, 0x71, 0x06, 0x4b, 0x06, 0x74, 0x71, 0x07, 0x51, 0x4b,
    0x00, 0x4b, 0x02, 0x4b, 0x03, 0x86, 0x71, 0x08, 0x4b, 0x03, 0x4b, 0x01, 0x86, 0x71, 0x09, 0x89,
    0x63, 0x63, 0x6f, 0x6c, 0x6c, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e, 0x73, 0x0a, 0x4f, 0x72, 0x64,
    0x65, 0x72, 0x65, 0x64, 0x44, 0x69, 0x63, 0x74, 0x0a, 0x71, 0x0a, 0x29, 0x52, 0x71, 0x0b, 0x74,
    0x71, 0x0c, 0x52, 0x71, 0x0d, 0x58, 0x04, 0x00, 0x00, 0x00, 0x74, 0x69, 0x65, 0x64, 0x71, 0x0e,
    0x68, 0x0d, 0x58, 0x01, 0x00, 0x00, 0x00, 0x74, 0x71, 0x0f, 0x68, 0x02, 0x28, 0x28, 0x68, 0x03,
    0x68, 0x04, 0x68, 0x05, 0x68, 0x06, 0x4b, 0x06, 0x74, 0x71, 0x10, 0x51, 0x4b, 0x00, 0x4b, 0x03,
    0x4b, 0x02, 0x86, 0x71, 0x11, 0x4b, 0x01, 0x4b, 0x03, 0x86, 0x71, 0x12, 0x89, 0x68, 0x0a, 0x29,
    0x52, 0x71, 0x13, 0x74, 0x71, 0x14, 0x52, 0x71, 0x15, 0x58, 0x01, 0x00, 0x00, 0x00, 0x68, 0x71,
    0x16, 0x68, 0x02, 0x28, 0x28, 0x68, 0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x0a, 0x48, 0x61,
    0x6c, 0x66, 0x53, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x17, 0x58, 0x01, 0x00, 0x00,
    0x00, 0x31, 0x71, 0x18, 0x68, 0x06, 0x4b, 0x02, 0x74, 0x71, 0x19, 0x51, 0x4b, 0x00, 0x4b, 0x02,
    0x85, 0x71, 0x1a, 0x4b, 0x01, 0x85, 0x71, 0x1b, 0x89, 0x68, 0x0a, 0x29, 0x52, 0x71, 0x1c, 0x74,
    0x71, 0x1d, 0x52, 0x71, 0x1e, 0x75, 0x2e, 0x50, 0x4b, 0x07, 0x08, 0xc9, 0x39, 0x03, 0x04, 0x37,
    0x01, 0x00, 0x00, 0x37, 0x01, 0x00, 0x00, 0x50, 0x4b, 0x03, 0x04, 0x00, 0x00, 0x08, 0x08, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x0e, 0x00, 0x0d, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74,
    0x61, 0x2f, 0x30, 0x46, 0x42, 0x09, 0x00, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40,
    0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0xa0, 0x40, 0x50, 0x4b, 0x07, 0x08, 0x17, 0x90, 0xe7, 0x91,
    0x18, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x50, 0x4b, 0x03, 0x04, 0x00, 0x00, 0x08, 0x08,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x0e, 0x00, 0x2c, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61,
    0x74, 0x61, 0x2f, 0x31, 0x46, 0x42, 0x28, 0x00, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x00, 0x3e, 0x00, 0xc0, 0x50, 0x4b, 0x07, 0x08, 0x36, 0xd5, 0xd5, 0x94, 0x04, 0x00, 0x00, 0x00,
    0x04, 0x00, 0x00, 0x00, 0x50, 0x4b, 0x03, 0x04, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x00,
    0x3f, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f,
    0x6e, 0x46, 0x42, 0x3b, 0x00, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x33, 0x0a, 0x50, 0x4b, 0x07, 0x08, 0xd1, 0x9e, 0x67, 0x55, 0x02, 0x00, 0x00, 0x00, 0x02, 0x00,
    0x00, 0x00, 0x50, 0x4b, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0xc9, 0x39, 0x03, 0x04, 0x37, 0x01, 0x00, 0x00, 0x37, 0x01, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2e, 0x70, 0x6b, 0x6c,
    0x50, 0x4b, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x17, 0x90, 0xe7, 0x91, 0x18, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x87, 0x01, 0x00, 0x00, 0x61, 0x72,
    0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2f, 0x30, 0x50, 0x4b, 0x01, 0x02,
    0x00, 0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x36, 0xd5, 0xd5, 0x94,
    0x04, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe8, 0x01, 0x00, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76,
    0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2f, 0x31, 0x50, 0x4b, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00,
    0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd1, 0x9e, 0x67, 0x55, 0x02, 0x00, 0x00, 0x00,
    0x02, 0x00, 0x00, 0x00, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x54, 0x02, 0x00, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x76, 0x65,
    0x72, 0x73, 0x69, 0x6f, 0x6e, 0x50, 0x4b, 0x06, 0x06, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x1e, 0x03, 0x2d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf3, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0xd2, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x50, 0x4b, 0x06,
    0x07, 0x00, 0x00, 0x00, 0x00, 0xc5, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
    0x00, 0x50, 0x4b, 0x05, 0x06, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x04, 0x00, 0xf3, 0x00, 0x00,
    0x00, 0xd2, 0x02, 0x00, 0x00, 0x00, 0x00,
};
static const unsigned char legacy_small[] = {
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e, 0x80,
    0x02, 0x4d, 0xe9, 0x03, 0x2e, 0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58, 0x10, 0x00, 0x00, 0x00,
    0x70, 0x72, 0x6f, 0x74, 0x6f, 0x63, 0x6f, 0x6c, 0x5f, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e,
    0x71, 0x01, 0x4d, 0xe9, 0x03, 0x58, 0x0d, 0x00, 0x00, 0x00, 0x6c, 0x69, 0x74, 0x74, 0x6c, 0x65,
    0x5f, 0x65, 0x6e, 0x64, 0x69, 0x61, 0x6e, 0x71, 0x02, 0x88, 0x58, 0x0a, 0x00, 0x00, 0x00, 0x74,
    0x79, 0x70, 0x65, 0x5f, 0x73, 0x69, 0x7a, 0x65, 0x73, 0x71, 0x03, 0x7d, 0x71, 0x04, 0x28, 0x58,
    0x05, 0x00, 0x00, 0x00, 0x73, 0x68, 0x6f, 0x72, 0x74, 0x71, 0x05, 0x4b, 0x02, 0x58, 0x03, 0x00,
    0x00, 0x00, 0x69, 0x6e, 0x74, 0x71, 0x06, 0x4b, 0x04, 0x58, 0x04, 0x00, 0x00, 0x00, 0x6c, 0x6f,
    0x6e, 0x67, 0x71, 0x07, 0x4b, 0x04, 0x75, 0x75, 0x2e, 0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58,
    0x01, 0x00, 0x00, 0x00, 0x77, 0x71, 0x01, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x2e, 0x5f, 0x75,
    0x74, 0x69, 0x6c, 0x73, 0x0a, 0x5f, 0x72, 0x65, 0x62, 0x75, 0x69, 0x6c, 0x64, 0x5f, 0x74, 0x65,
    0x6e, 0x73, 0x6f, 0x72, 0x5f, 0x76, 0x32, 0x0a, 0x71, 0x02, 0x28, 0x28, 0x58, 0x07, 0x00, 0x00,
    0x00, 0x73, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x71, 0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68,
    0x0a, 0x46, 0x6c, 0x6f, 0x61, 0x74, 0x53, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x04,
    0x58, 0x09, 0x00, 0x00, 0x00, 0x39, 0x32, 0x37, 0x38, 0x32, 0x32, 0x35, 0x36, 0x30, 0x71, 0x05,
    0x58, 0x03, 0x00, 0x00, 0x00, 0x63, 0x70, 0x75, 0x71, 0x06, 0x4b, 0x06, 0x4e, 0x74, 0x71, 0x07,
    0x51, 0x4b, 0x00, 0x4b, 0x02, 0x4b, 0x03, 0x86, 0x71, 0x08, 0x4b, 0x03, 0x4b, 0x01, 0x86, 0x71,
    0x09, 0x89, 0x63, 0x63, 0x6f, 0x6c, 0x6c, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e, 0x73, 0x0a, 0x4f,
    0x72, 0x64, 0x65, 0x72, 0x65, 0x64, 0x44, 0x69, 0x63, 0x74, 0x0a, 0x71, 0x0a, 0x29, 0x52, 0x71,
    0x0b, 0x74, 0x71, 0x0c, 0x52, 0x71, 0x0d, 0x58, 0x04, 0x00, 0x00, 0x00, 0x74, 0x69, 0x65, 0x64,
    0x71, 0x0e, 0x68, 0x0d, 0x58, 0x01, 0x00, 0x00, 0x00, 0x74, 0x71, 0x0f, 0x68, 0x02, 0x28, 0x28,
    0x68, 0x03, 0x68, 0x04, 0x58, 0x09, 0x00, 0x00, 0x00, 0x39, 0x32, 0x37, 0x38, 0x32, 0x32, 0x35,
    0x36, 0x30, 0x71, 0x10, 0x68, 0x06, 0x4b, 0x06, 0x4e, 0x74, 0x71, 0x11, 0x51, 0x4b, 0x00, 0x4b,
    0x03, 0x4b, 0x02, 0x86, 0x71, 0x12, 0x4b, 0x01, 0x4b, 0x03, 0x86, 0x71, 0x13, 0x89, 0x68, 0x0a,
    0x29, 0x52, 0x71, 0x14, 0x74, 0x71, 0x15, 0x52, 0x71, 0x16, 0x58, 0x01, 0x00, 0x00, 0x00, 0x68,
    0x71, 0x17, 0x68, 0x02, 0x28, 0x28, 0x68, 0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x0a, 0x48,
    0x61, 0x6c, 0x66, 0x53, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x18, 0x58, 0x09, 0x00,
    0x00, 0x00, 0x38, 0x36, 0x35, 0x31, 0x33, 0x33, 0x30, 0x32, 0x34, 0x71, 0x19, 0x68, 0x06, 0x4b,
    0x02, 0x4e, 0x74, 0x71, 0x1a, 0x51, 0x4b, 0x00, 0x4b, 0x02, 0x85, 0x71, 0x1b, 0x4b, 0x01, 0x85,
    0x71, 0x1c, 0x89, 0x68, 0x0a, 0x29, 0x52, 0x71, 0x1d, 0x74, 0x71, 0x1e, 0x52, 0x71, 0x1f, 0x75,
    0x2e, 0x80, 0x02, 0x5d, 0x71, 0x00, 0x28, 0x58, 0x09, 0x00, 0x00, 0x00, 0x38, 0x36, 0x35, 0x31,
    0x33, 0x33, 0x30, 0x32, 0x34, 0x71, 0x01, 0x58, 0x09, 0x00, 0x00, 0x00, 0x39, 0x32, 0x37, 0x38,
    0x32, 0x32, 0x35, 0x36, 0x30, 0x71, 0x02, 0x65, 0x2e, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x3e, 0x00, 0xc0, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80,
    0x40, 0x00, 0x00, 0xa0, 0x40,
};
static const unsigned char pkl_small[] = {
    0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58, 0x01, 0x00, 0x00, 0x00, 0x77, 0x71, 0x01, 0x63, 0x74,
    0x6f, 0x72, 0x63, 0x68, 0x2e, 0x5f, 0x75, 0x74, 0x69, 0x6c, 0x73, 0x0a, 0x5f, 0x72, 0x65, 0x62,
    0x75, 0x69, 0x6c, 0x64, 0x5f, 0x74, 0x65, 0x6e, 0x73, 0x6f, 0x72, 0x5f, 0x76, 0x32, 0x0a, 0x71,
    0x02, 0x28, 0x28, 0x58, 0x07, 0x00, 0x00, 0x00, 0x73, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x71,
    0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x0a, 0x46, 0x6c, 0x6f, 0x61, 0x74, 0x53, 0x74, 0x6f,
    0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x04, 0x58, 0x01, 0x00, 0x00, 0x00, 0x30, 0x71, 0x05, 0x58,
    0x03, 0x00, 0x00, 0x00, 0x63, 0x70, 0x75, 0x71, 0x06, 0x4b, 0x06, 0x74, 0x71, 0x07, 0x51, 0x4b,
    0x00, 0x4b, 0x02, 0x4b, 0x03, 0x86, 0x71, 0x08, 0x4b, 0x03, 0x4b, 0x01, 0x86, 0x71, 0x09, 0x89,
    0x63, 0x63, 0x6f, 0x6c, 0x6c, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e, 0x73, 0x0a, 0x4f, 0x72, 0x64,
    0x65, 0x72, 0x65, 0x64, 0x44, 0x69, 0x63, 0x74, 0x0a, 0x71, 0x0a, 0x29, 0x52, 0x71, 0x0b, 0x74,
    0x71, 0x0c, 0x52, 0x71, 0x0d, 0x58, 0x04, 0x00, 0x00, 0x00, 0x74, 0x69, 0x65, 0x64, 0x71, 0x0e,
    0x68, 0x0d, 0x58, 0x01, 0x00, 0x00, 0x00, 0x74, 0x71, 0x0f, 0x68, 0x02, 0x28, 0x28, 0x68, 0x03,
    0x68, 0x04, 0x68, 0x05, 0x68, 0x06, 0x4b, 0x06, 0x74, 0x71, 0x10, 0x51, 0x4b, 0x00, 0x4b, 0x03,
    0x4b, 0x02, 0x86, 0x71, 0x11, 0x4b, 0x01, 0x4b, 0x03, 0x86, 0x71, 0x12, 0x89, 0x68, 0x0a, 0x29,
    0x52, 0x71, 0x13, 0x74, 0x71, 0x14, 0x52, 0x71, 0x15, 0x58, 0x01, 0x00, 0x00, 0x00, 0x68, 0x71,
    0x16, 0x68, 0x02, 0x28, 0x28, 0x68, 0x03, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x0a, 0x48, 0x61,
    0x6c, 0x66, 0x53, 0x74, 0x6f, 0x72, 0x61, 0x67, 0x65, 0x0a, 0x71, 0x17, 0x58, 0x01, 0x00, 0x00,
    0x00, 0x31, 0x71, 0x18, 0x68, 0x06, 0x4b, 0x02, 0x74, 0x71, 0x19, 0x51, 0x4b, 0x00, 0x4b, 0x02,
    0x85, 0x71, 0x1a, 0x4b, 0x01, 0x85, 0x71, 0x1b, 0x89, 0x68, 0x0a, 0x29, 0x52, 0x71, 0x1c, 0x74,
    0x71, 0x1d, 0x52, 0x71, 0x1e, 0x75, 0x2e,
};

#define P(s) (const uint8_t *)(s), sizeof(s) - 1

/* ---- pickle machine, no policy ------------------------------------------ */

static pkl_value *run_plain(pkl_machine *m, const uint8_t *b, size_t n, mp_error *err) {
    pkl_value *v = NULL;
    if (pkl_run(m, b, n, NULL, &v, err)) return NULL;
    return v;
}

static void test_memo_is_reference(void **state) {
    (void)state;
    pkl_machine *m = pkl_new(NULL, NULL);
    mp_error err = {0};
    /* EMPTY_LIST BINPUT 0, BINGET 0, K 1, APPEND (to the fetched ref), POP via
     * STOP returns the fetched ref; the list under it is the same object */
    pkl_value *v = run_plain(m,
                             P("]q\x00h\x00K\x01"
                               "a."),
                             &err);
    assert_non_null(v);
    assert_int_equal(v->kind, PKL_LIST);
    assert_int_equal(v->u.seq.n, 1);
    /* dict memoized before SETITEMS is filled by it */
    v = run_plain(m,
                  P("\x80\x02}q\x00(X\x01\x00\x00\x00"
                    "aK\x01X\x01\x00\x00\x00"
                    "bK\x02uh\x00."),
                  &err);
    assert_non_null(v);
    assert_int_equal(v->kind, PKL_DICT);
    assert_int_equal(v->u.dict.n, 2);
    assert_true(pkl_is_str(v->u.dict.keys[0], "a")); /* SETITEMS keeps order */
    assert_true(pkl_is_str(v->u.dict.keys[1], "b"));
    assert_int_equal(v->u.dict.vals[1]->u.i, 2);
    pkl_free(m);
}

static void test_numbers(void **state) {
    (void)state;
    pkl_machine *m = pkl_new(NULL, NULL);
    mp_error err = {0};
    pkl_value *v;
    v = run_plain(m, P("\x8a\x01\xff."), &err);
    assert_int_equal(v->u.i, -1);
    v = run_plain(m, P("\x8a\x02\x00\x80."), &err);
    assert_int_equal(v->u.i, -32768);
    v = run_plain(m, P("\x8a\x00."), &err);
    assert_int_equal(v->u.i, 0);
    v = run_plain(m, P("\x8a\x05\x00\x00\x00\x00\x01."), &err); /* 2^32 */
    assert_int_equal(v->u.i, 4294967296LL);
    v = run_plain(m, P("\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff."), &err);
    assert_int_equal(v->u.i, -1); /* redundant sign byte */
    assert_null(run_plain(m, P("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."), &err));
    assert_string_equal(err.code, "too_large");
    v = run_plain(m, P("J\xfe\xff\xff\xff."), &err);
    assert_int_equal(v->u.i, -2);
    v = run_plain(m, P("M\xe9\x03."), &err);
    assert_int_equal(v->u.i, 1001);
    v = run_plain(m, P("G\x3f\xf8\x00\x00\x00\x00\x00\x00."), &err); /* big-endian 1.5 */
    assert_true(v->kind == PKL_FLOAT && v->u.f == 1.5);
    pkl_free(m);
}

static void test_protocol4_opcodes(void **state) {
    (void)state;
    pkl_machine *m = pkl_new(NULL, NULL);
    mp_error err = {0};
    /* PROTO 4, FRAME, SHORT_BINUNICODE + MEMOIZE, BINGET 0, TUPLE2 */
    pkl_value *v = run_plain(
        m, P("\x80\x04\x95\x0a\x00\x00\x00\x00\x00\x00\x00\x8c\x02hi\x94h\x00\x86\x94."), &err);
    assert_non_null(v);
    assert_int_equal(v->kind, PKL_TUPLE);
    assert_int_equal(v->u.seq.n, 2);
    assert_ptr_equal(v->u.seq.items[0], v->u.seq.items[1]);
    assert_true(pkl_is_str(v->u.seq.items[0], "hi"));
    v = run_plain(m, P("C\x03\x00\x01\x02."), &err);
    assert_true(v->kind == PKL_BYTES && v->u.str.len == 3 && v->u.str.s[2] == 2);
    pkl_free(m);
}

static void test_structural_errors(void **state) {
    (void)state;
    pkl_machine *m = pkl_new(NULL, NULL);
    mp_error err;
    struct {
        const char *p;
        size_t n;
        const char *code;
    } cases[] = {
        {"", 0, "truncated"},
        {"\x80\x02}", 3, "truncated"}, /* no STOP */
        {".", 1, "bad_header"},        /* STOP on empty stack */
        {"R.", 2, "bad_header"},       /* underflow */
        {"t.", 2, "bad_header"},       /* TUPLE without MARK */
        {"N(\x85.", 4, "bad_header"},  /* TUPLE1 reaching below MARK */
        {"\xff", 1, "bad_header"},     /* no such opcode */
        {"I1\n.", 4, "bad_header"},    /* text protocol */
        {"S'a'\n.", 6, "bad_header"},
        {"\x80\x09N.", 4, "bad_header"}, /* protocol 9 */
        {"h\x05.", 3, "bad_header"},     /* empty memo slot */
        {"j\xff\xff\xff\xff.", 6, "bad_header"},
        {"Nr\xff\xff\xff\xff.", 7, "too_large"}, /* huge memo index */
        {"Nq\x09.", 4, "too_large"},             /* index beyond ops seen */
        {"X\xff\xff\xff\x7f"
         "abc",
         8, "truncated"}, /* 2 GB string, 3 bytes given */
        {"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f"
         "a",
         10, "truncated"},
        {"\x8e\x00\x00\x00\x00\x00\x00\x00\x80", 9, "truncated"},
        {"\x8b\xff\xff\xff\x7f\x00", 6, "truncated"},        /* LONG4 of 2 GB */
        {"\x8b\xff\xff\xff\xff", 5, "bad_header"},           /* negative LONG4 */
        {"X\x02\x00\x00\x00\xc3\x28.", 8, "bad_header"},     /* bad UTF-8 */
        {"X\x03\x00\x00\x00\xed\xa0\x80.", 9, "bad_header"}, /* surrogate */
        {"cos", 3, "truncated"},
        {"cos\n\n.", 6, "bad_header"},
        {"c\x01x\ny\n.", 7, "bad_header"},
        {"}(K\x01u.", 6, "bad_header"}, /* odd SETITEMS */
        {"(K\x01"
         "d.",
         4, "bad_header"},         /* odd DICT */
        {"Ne(.", 4, "bad_header"}, /* APPENDS without mark */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memset(&err, 0, sizeof err);
        pkl_value *v = (pkl_value *)1;
        int rc = pkl_run(m, (const uint8_t *)cases[i].p, cases[i].n, NULL, &v, &err);
        if (rc == 0 || strcmp(err.code, cases[i].code) != 0)
            fail_msg("case %zu: rc %d code '%s' (%s), want %s", i, rc, err.code, err.message,
                     cases[i].code);
        assert_true(err.message[0] != 0);
    }
    pkl_free(m);
}

static void test_deep_nesting_and_limits(void **state) {
    (void)state;
    mp_error err = {0};
    pkl_value *v;
    size_t n = 200000;
    uint8_t *b = malloc(2 * n + 8);
    assert_non_null(b);
    pkl_machine *m = pkl_new(NULL, NULL);
    /* 200k nested TUPLE1s */
    b[0] = 'N';
    memset(b + 1, 0x85, n);
    b[n + 1] = '.';
    assert_int_equal(pkl_run(m, b, n + 2, NULL, &v, &err), -1);
    assert_string_equal(err.code, "too_large");
    assert_non_null(strstr(err.message, "nesting"));
    /* 200k lists appended into each other */
    memset(b, ']', n);
    memset(b + n, 'a', n - 1);
    b[2 * n - 1] = '.';
    assert_int_equal(pkl_run(m, b, 2 * n, NULL, &v, &err), -1);
    assert_string_equal(err.code, "too_large");
    /* 200k open MARKs */
    memset(b, '(', n);
    b[n] = '.';
    assert_int_equal(pkl_run(m, b, n + 1, NULL, &v, &err), -1);
    assert_string_equal(err.code, "too_large");
    /* a list that contains itself is fine to build and bounded to walk */
    v = run_plain(m,
                  P("]q\x00h\x00h\x00"
                    "a."),
                  &err);
    assert_non_null(v);
    assert_ptr_equal(v->u.seq.items[0], v);
    pkl_free(m);
    /* memory limit: a 3 MB string against a 1 MB arena */
    pkl_limits lim;
    pkl_limits_default(&lim);
    lim.max_arena_bytes = 1 << 20;
    lim.max_stack = 1000;
    m = pkl_new(&lim, NULL);
    size_t big = 3 << 20;
    uint8_t *s = malloc(big + 6);
    assert_non_null(s);
    s[0] = 'B';
    s[1] = 0;
    s[2] = 0;
    s[3] = 0x30;
    s[4] = 0;
    memset(s + 5, 'x', big);
    s[big + 5] = '.';
    assert_int_equal(pkl_run(m, s, big + 6, NULL, &v, &err), -1);
    assert_string_equal(err.code, "too_large");
    /* stack limit: 2000 NONEs */
    memset(s, 'N', 2000);
    s[2000] = '.';
    assert_int_equal(pkl_run(m, s, 2001, NULL, &v, &err), -1);
    assert_string_equal(err.code, "too_large");
    pkl_free(m);
    free(s);
    free(b);
}

static void test_no_policy_refuses(void **state) {
    (void)state;
    pkl_machine *m = pkl_new(NULL, NULL);
    mp_error err = {0};
    assert_null(run_plain(m, P("cos\nsystem\n."), &err));
    assert_string_equal(err.code, "unsafe_pickle");
    assert_string_equal(err.message, "forbidden global os.system");
    assert_null(run_plain(m, P("N)Q."), &err));
    assert_string_equal(err.code, "unsafe_pickle");
    pkl_free(m);
}

/* ---- the torch allowlist -------------------------------------------------- */

static void expect_refused(const uint8_t *b, size_t n, const char *code, const char *msg) {
    mp_error err = {0};
    long r = pt_check_pickle(b, n, false, &err);
    if (r != -1 || strcmp(err.code, code) != 0 || !strstr(err.message, msg))
        fail_msg("got %ld '%s' '%s', want %s '%s'", r, err.code, err.message, code, msg);
}

static void test_forbidden_globals(void **state) {
    (void)state;
    /* the canonical exploit: (os.system, ("id",)) REDUCE */
    expect_refused(P("\x80\x02"
                     "cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02R."),
                   "unsafe_pickle", "forbidden global os.system");
    expect_refused(P("\x80\x02"
                     "cposix\nsystem\nX\x02\x00\x00\x00id\x85R."),
                   "unsafe_pickle", "forbidden global posix.system");
    expect_refused(P("\x80\x02"
                     "cnt\nsystem\nX\x02\x00\x00\x00id\x85R."),
                   "unsafe_pickle", "forbidden global nt.system");
    expect_refused(P("\x80\x02"
                     "cbuiltins\neval\nX\x03\x00\x00\x00"
                     "1+1\x85R."),
                   "unsafe_pickle", "forbidden global builtins.eval");
    expect_refused(P("\x80\x02"
                     "c__builtin__\nexec\nX\x01\x00\x00\x00"
                     "1\x85R."),
                   "unsafe_pickle", "forbidden global __builtin__.exec");
    expect_refused(P("\x80\x02"
                     "csubprocess\nPopen\n]\x85R."),
                   "unsafe_pickle", "forbidden global subprocess.Popen");
    /* an unknown class, reduced, built and NEWOBJ'd */
    expect_refused(P("\x80\x02"
                     "cevil.mod\nThing\n)R}b."),
                   "unsafe_pickle", "forbidden global evil.mod.Thing");
    expect_refused(P("\x80\x02"
                     "ctorch.nn.modules.linear\nLinear\n)\x81."),
                   "unsafe_pickle", "forbidden global torch.nn.modules.linear.Linear");
    /* protocol 4 route to a global */
    expect_refused(P("\x80\x04\x8c\x02os\x8c\x06system\x93X\x02\x00\x00\x00id\x85R."),
                   "unsafe_pickle", "forbidden global os.system");
    /* opcodes that are never allowed */
    expect_refused(P("(X\x02\x00\x00\x00idios\nsystem\n."), "unsafe_pickle", "INST");
    expect_refused(P("\x82\x01."), "unsafe_pickle", "EXT");
    expect_refused(P("Pfoo\n."), "unsafe_pickle", "PERSID");
    expect_refused(P("(cos\nsystem\nX\x02\x00\x00\x00ido."), "unsafe_pickle",
                   "forbidden global os.system");
    /* allowed names used the wrong way */
    expect_refused(P("\x80\x02"
                     "ctorch\nFloatStorage\n)R."),
                   "unsafe_pickle", "calling torch.FloatStorage is not allowed");
    expect_refused(P("\x80\x02"
                     "ctorch._utils\n_rebuild_tensor_v2\n)\x81."),
                   "unsafe_pickle", "NEWOBJ");
    expect_refused(P("\x80\x02)K\x01R."), "unsafe_pickle", "REDUCE on a tuple");
    expect_refused(P("\x80\x02)}b."), "unsafe_pickle", "BUILD on a tuple");
    expect_refused(P("\x80\x02}K\x01"
                     "a."),
                   "unsafe_pickle", "APPEND to a dict");
    expect_refused(P("\x80\x02]K\x01K\x02s."), "unsafe_pickle", "SETITEM on a list");
    /* persistent ids: only ('storage', ...) tuples */
    expect_refused(P("\x80\x02X\x01\x00\x00\x00xQ."), "unsafe_pickle", "persistent id");
    expect_refused(P("\x80\x02(X\x04\x00\x00\x00"
                     "evilK\x01tQ."),
                   "unsafe_pickle", "persistent id");
    expect_refused(P("\x80\x02(X\x06\x00\x00\x00moduleK\x01tQ."), "unsupported_format",
                   "nn.Module");
}

/* storage pid ('storage', torch.FloatStorage, '0', 'cpu', numel) */
#define PID_F32(numel)                                                                             \
    "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"                            \
    "0X\x03\x00\x00\x00"                                                                           \
    "cpu" numel "tQ"
#define REBUILD "ctorch._utils\n_rebuild_tensor_v2\n"

static void test_tensor_args_checked(void **state) {
    (void)state;
    mp_error err = {0};
    /* {'w': _rebuild_tensor_v2(storage(6), 0, (2,3), (3,1), False, OrderedDict())} */
    long r = pt_check_pickle(
        P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32("K\x06") "K\x00K\x02K\x03\x86K\x03K\x01"
                                                                 "\x86\x89"
                                                                 "ccollections\nOrderedDict\n)Rt"
                                                                 "Rs."),
        false, &err);
    assert_int_equal(r, 1);
    /* the same tensor reaching past its storage of 5 elements */
    expect_refused(
        P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32("K\x05") "K\x00K\x02K\x03\x86K\x03K\x01"
                                                                 "\x86\x89}t"
                                                                 "Rs."),
        "bad_header", "reaches element 5");
    /* absurd size: (2^40, 2^40) with stride (2^40, 1) overflows / exceeds */
    expect_refused(
        P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32(
            "K\x06") "K\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\x01\x86"
                     "\x8a\x06\x00\x00\x00\x00\x00\x01K\x01\x86\x89}t"
                     "Rs."),
        "bad_header", "");
    /* negative offset, negative size */
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32(
                       "K\x06") "J\xff\xff\xff\xffK\x02\x85K\x01\x85\x89}t"
                                "Rs."),
                   "bad_header", "offset");
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32(
                       "K\x06") "K\x00J\xff\xff\xff\xff\x85K\x01\x85\x89}t"
                                "Rs."),
                   "bad_header", "negative");
    /* 9 dimensions */
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_F32(
                       "K\x06") "K\x00(K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01t"
                                "(K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01t\x89}t"
                                "Rs."),
                   "unsupported_format", "dimensions");
    /* one key, two storage types */
    expect_refused(P("\x80\x02}(X\x01\x00\x00\x00w" REBUILD PID_F32(
                       "K\x06") "K\x00K\x01\x85K\x01\x85\x89}t"
                                "RX\x01\x00\x00\x00v" REBUILD
                                "((X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x01\x00\x00\x00"
                                "0X\x03\x00\x00\x00"
                                "cpuK\x06tQ"
                                "K\x00K\x01\x85K\x01\x85\x89}t"
                                "Ru."),
                   "bad_header", "two different");
    /* duplicate names */
    expect_refused(P("\x80\x02}(X\x01\x00\x00\x00w" REBUILD PID_F32(
                       "K\x06") "K\x00K\x01\x85K\x01\x85\x89}t"
                                "Rq\x00X\x01\x00\x00\x00wh\x00u."),
                   "bad_header", "appears twice");
    /* values that are not tensors, and a single tensor at the top */
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00wK\x01s."), "unsupported_format",
                   "is a int, not a tensor");
    expect_refused(P("\x80\x02" REBUILD PID_F32("K\x06") "K\x00K\x01\x85K\x01\x85\x89}t"
                                                         "R."),
                   "unsupported_format", "single tensor");
    expect_refused(P("\x80\x02]."), "unsupported_format", "list");
    /* _rebuild_tensor_v3: UntypedStorage counts bytes, the dtype comes last */
#define PID_U8(numel)                                                                              \
    "((X\x07\x00\x00\x00storagectorch\nUntypedStorage\nX\x01\x00\x00\x00"                          \
    "0X\x03\x00\x00\x00"                                                                           \
    "cpu" numel "tQ"
#define REBUILD3 "ctorch._utils\n_rebuild_tensor_v3\n"
    r = pt_check_pickle(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD3 PID_U8(
                            "K\x04") "K\x00K\x02\x85K\x01\x85\x89}ctorch\nuint16\nt"
                                     "Rs."),
                        false, &err);
    assert_int_equal(r, 1);
    r = pt_check_pickle(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD3 PID_U8(
                            "K\x04") "K\x00K\x04\x85K\x01\x85\x89}ctorch\nfloat8_e4m3fn\nt"
                                     "Rs."),
                        false, &err);
    assert_int_equal(r, 1);
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD3 PID_U8(
                       "K\x04") "K\x00K\x03\x85K\x01\x85\x89}ctorch\nuint16\nt"
                                "Rs."),
                   "bad_header", "reaches element 2");
    expect_refused(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD3 PID_U8(
                       "K\x04") "K\x00K\x01\x85K\x01\x85\x89}ctorch\ncomplex128\nt"
                                "Rs."),
                   "unsupported_format", "complex128");
    /* v2 on an untyped storage has no dtype */
    expect_refused(
        P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_U8("K\x04") "K\x00K\x01\x85K\x01\x85\x89}t"
                                                                "Rs."),
        "bad_header", "untyped");
    /* legacy 6-field ids; a storage view ('v', offset 2, size 3) bounds the tensor */
#define PID_LEG(view)                                                                              \
    "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"                            \
    "9X\x03\x00\x00\x00"                                                                           \
    "cpuK\x06" view "tQ"
    r = pt_check_pickle(
        P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_LEG("N") "K\x00K\x06\x85K\x01\x85\x89}t"
                                                             "Rs."),
        true, &err);
    assert_int_equal(r, 1);
    r = pt_check_pickle(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_LEG(
                            "X\x01\x00\x00\x00vK\x02K\x03\x87") "K\x00K\x03\x85K\x01\x85\x89}t"
                                                                "Rs."),
                        true, &err);
    assert_int_equal(r, 1);
    mp_error e2 = {0};
    r = pt_check_pickle(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_LEG(
                            "X\x01\x00\x00\x00vK\x02K\x03\x87") "K\x00K\x04\x85K\x01\x85\x89}t"
                                                                "Rs."),
                        true, &e2);
    assert_int_equal(r, -1);
    assert_non_null(strstr(e2.message, "reaches element 3"));
    r = pt_check_pickle(P("\x80\x02}X\x01\x00\x00\x00w" REBUILD PID_LEG(
                            "X\x01\x00\x00\x00vK\x05K\x03\x87") "K\x00K\x01\x85K\x01\x85\x89}t"
                                                                "Rs."),
                        true, &e2);
    assert_int_equal(r, -1);
    assert_non_null(strstr(e2.message, "storage view"));
}

static void test_real_data_pkl(void **state) {
    (void)state;
    mp_error err = {0};
    assert_int_equal(pt_check_pickle(pkl_small, sizeof pkl_small, false, &err), 4);
    /* as a legacy pickle the 5-field persistent ids are wrong */
    assert_int_equal(pt_check_pickle(pkl_small, sizeof pkl_small, true, &err), -1);
    assert_string_equal(err.code, "bad_header");
    /* every truncation of it is a clean error */
    for (size_t n = 0; n < sizeof pkl_small; n++) {
        memset(&err, 0, sizeof err);
        assert_int_equal(pt_check_pickle(pkl_small, n, false, &err), -1);
        assert_true(err.code[0] != 0);
    }
    /* every single-byte change either parses or fails cleanly */
    uint8_t buf[sizeof pkl_small];
    for (size_t i = 0; i < sizeof pkl_small; i++) {
        for (int x = 1; x < 256; x <<= 1) {
            memcpy(buf, pkl_small, sizeof buf);
            buf[i] ^= (uint8_t)x;
            memset(&err, 0, sizeof err);
            long r = pt_check_pickle(buf, sizeof buf, false, &err);
            assert_true(r >= 0 || err.code[0] != 0);
        }
    }
}

/* ---- files ---------------------------------------------------------------- */

static char tmp_path[64];

static int setup_tmp(void **state) {
    (void)state;
    snprintf(tmp_path, sizeof tmp_path, "/tmp/test_pickle.XXXXXX");
    int fd = mkstemp(tmp_path);
    if (fd < 0) return -1;
    close(fd);
    return 0;
}

static int teardown_tmp(void **state) {
    (void)state;
    unlink(tmp_path);
    return 0;
}

static void write_file(const void *p, size_t n) {
    FILE *f = fopen(tmp_path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Opens tmp_path with pt_open; on success reads every tensor (which may
 * fail cleanly on a corrupted file). Returns pt_open's rc. */
static int open_and_read(mp_weights *w, mp_error *err) {
    memset(w, 0, sizeof *w);
    memset(err, 0, sizeof *err);
    if (pt_open(tmp_path, w, err) != 0) {
        assert_true(err->code[0] != 0);
        assert_int_equal(w->nfiles, 0); /* cleaned up */
        return -1;
    }
    for (size_t i = 0; i < w->ntensors; i++) {
        mp_error e2 = {0};
        void *b = malloc(w->tensors[i].nbytes + 1);
        assert_non_null(b);
        if (weights_read(w, &w->tensors[i], b, &e2) != 0) assert_true(e2.code[0] != 0);
        free(b);
    }
    return 0;
}

static void check_small(const mp_weights *w) {
    assert_int_equal(w->ntensors, 4);
    const mp_tensor *tw = &w->tensors[0], *tied = &w->tensors[1], *tt = &w->tensors[2],
                    *th = &w->tensors[3];
    assert_string_equal(tw->name, "w");
    assert_string_equal(tied->name, "tied");
    assert_string_equal(tt->name, "t");
    assert_string_equal(th->name, "h");
    assert_int_equal(tw->dtype, MP_DT_F32);
    assert_int_equal(th->dtype, MP_DT_F16);
    assert_int_equal(tw->ndim, 2);
    assert_int_equal(tw->shape[0], 2);
    assert_int_equal(tw->shape[1], 3);
    assert_false(tw->is_view);
    assert_false(tied->is_view);
    assert_true(tt->is_view);
    assert_int_equal(tt->strides[0], 1);
    assert_int_equal(tt->strides[1], 3);
    assert_true(pt_same_view(tw, tied));
    assert_true(pt_same_data_ptr(tw, tt));
    assert_false(pt_same_view(tw, tt));
    assert_true(pt_same_storage(tw, tt));
    assert_false(pt_same_storage(tw, th));
    assert_int_equal(tw->nbytes, 24);
    assert_int_equal(tw->data_bytes, 24);
    float f[6];
    mp_error err = {0};
    assert_int_equal(weights_read(w, tt, f, &err), 0);
    const float want[6] = {0, 3, 1, 4, 2, 5};
    assert_memory_equal(f, want, sizeof f);
    uint16_t h[2];
    assert_int_equal(weights_read(w, th, h, &err), 0);
    assert_int_equal(h[0], 0x3E00);
    assert_int_equal(h[1], 0xC000);
}

static void test_open_zip_and_legacy(void **state) {
    (void)state;
    mp_weights w;
    mp_error err;
    write_file(zip_small, sizeof zip_small);
    assert_int_equal(open_and_read(&w, &err), 0);
    assert_int_equal(w.format, MP_FMT_PT_ZIP);
    check_small(&w);
    weights_free_fields(&w);
    write_file(legacy_small, sizeof legacy_small);
    assert_int_equal(open_and_read(&w, &err), 0);
    assert_int_equal(w.format, MP_FMT_PT_LEGACY);
    check_small(&w);
    weights_free_fields(&w);
}

static void sweep(const unsigned char *data, size_t n) {
    mp_weights w;
    mp_error err;
    for (size_t k = 0; k < n; k++) {
        write_file(data, k);
        if (open_and_read(&w, &err) == 0) fail_msg("prefix of %zu bytes opened", k);
    }
    unsigned char *b = malloc(n);
    assert_non_null(b);
    for (size_t i = 0; i < n; i++) {
        memcpy(b, data, n);
        b[i] ^= 0xFF;
        write_file(b, n);
        if (open_and_read(&w, &err) == 0) weights_free_fields(&w);
    }
    free(b);
}

static void test_truncations_and_flips(void **state) {
    (void)state;
    sweep(zip_small, sizeof zip_small);
    sweep(legacy_small, sizeof legacy_small);
}

/* ---- hand-built zips ------------------------------------------------------- */

typedef struct zent {
    const char *name;
    const void *data;
    size_t len;
    uint16_t method;
} zent;

static size_t put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    return 2;
}
static size_t put32(uint8_t *p, uint32_t v) {
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
    return 4;
}
static size_t put64(uint8_t *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
    return 8;
}

/* torch-like layout: local headers with zero sizes and an odd 'FB' padding
 * extra, data descriptors, central directory; zip64 puts every size and
 * offset in zip64 extras and writes the zip64 end records. */
static size_t build_zip(const zent *e, size_t n, bool zip64, uint8_t *out) {
    size_t pos = 0;
    uint64_t offs[16];
    for (size_t i = 0; i < n; i++) {
        offs[i] = pos;
        size_t nl = strlen(e[i].name);
        pos += put32(out + pos, 0x04034b50);
        pos += put16(out + pos, 0);
        pos += put16(out + pos, 0x0808);
        pos += put16(out + pos, e[i].method);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put16(out + pos, (uint16_t)nl);
        pos += put16(out + pos, 4 + 7);
        memcpy(out + pos, e[i].name, nl);
        pos += nl;
        pos += put16(out + pos, 0x4246);
        pos += put16(out + pos, 7);
        memset(out + pos, 'Z', 7);
        pos += 7;
        memcpy(out + pos, e[i].data, e[i].len);
        pos += e[i].len;
        pos += put32(out + pos, 0x08074b50);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, (uint32_t)e[i].len);
        pos += put32(out + pos, (uint32_t)e[i].len);
    }
    size_t cd = pos;
    for (size_t i = 0; i < n; i++) {
        size_t nl = strlen(e[i].name);
        pos += put32(out + pos, 0x02014b50);
        pos += put16(out + pos, 45);
        pos += put16(out + pos, 45);
        pos += put16(out + pos, 0x0808);
        pos += put16(out + pos, e[i].method);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, zip64 ? 0xFFFFFFFFu : (uint32_t)e[i].len);
        pos += put32(out + pos, zip64 ? 0xFFFFFFFFu : (uint32_t)e[i].len);
        pos += put16(out + pos, (uint16_t)nl);
        pos += put16(out + pos, zip64 ? 28 : 0);
        pos += put16(out + pos, 0);
        pos += put16(out + pos, 0);
        pos += put16(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, zip64 ? 0xFFFFFFFFu : (uint32_t)offs[i]);
        memcpy(out + pos, e[i].name, nl);
        pos += nl;
        if (zip64) {
            pos += put16(out + pos, 1);
            pos += put16(out + pos, 24);
            pos += put64(out + pos, e[i].len);
            pos += put64(out + pos, e[i].len);
            pos += put64(out + pos, offs[i]);
        }
    }
    size_t cd_size = pos - cd;
    if (zip64) {
        size_t e64 = pos;
        pos += put32(out + pos, 0x06064b50);
        pos += put64(out + pos, 44);
        pos += put16(out + pos, 45);
        pos += put16(out + pos, 45);
        pos += put32(out + pos, 0);
        pos += put32(out + pos, 0);
        pos += put64(out + pos, n);
        pos += put64(out + pos, n);
        pos += put64(out + pos, cd_size);
        pos += put64(out + pos, cd);
        pos += put32(out + pos, 0x07064b50);
        pos += put32(out + pos, 0);
        pos += put64(out + pos, e64);
        pos += put32(out + pos, 1);
    }
    pos += put32(out + pos, 0x06054b50);
    pos += put16(out + pos, 0);
    pos += put16(out + pos, 0);
    pos += put16(out + pos, zip64 ? 0xFFFF : (uint16_t)n);
    pos += put16(out + pos, zip64 ? 0xFFFF : (uint16_t)n);
    pos += put32(out + pos, zip64 ? 0xFFFFFFFFu : (uint32_t)cd_size);
    pos += put32(out + pos, zip64 ? 0xFFFFFFFFu : (uint32_t)cd);
    pos += put16(out + pos, 0);
    return pos;
}

static const float st0[6] = {0, 1, 2, 3, 4, 5};
static const uint16_t st1[2] = {0x3E00, 0xC000};

static int open_zip_entries(zent *e, size_t n, bool zip64, mp_weights *w, mp_error *err) {
    static uint8_t buf[8192];
    size_t len = build_zip(e, n, zip64, buf);
    write_file(buf, len);
    return open_and_read(w, err);
}

static void test_zip_reader(void **state) {
    (void)state;
    mp_weights w;
    mp_error err;
    zent e[6] = {
        {"m/data.pkl", pkl_small, sizeof pkl_small, 0},
        {"m/data/0", st0, sizeof st0, 0},
        {"m/data/1", st1, sizeof st1, 0},
        {"m/version", "3\n", 2, 0},
    };
    for (int z64 = 0; z64 < 2; z64++) {
        assert_int_equal(open_zip_entries(e, 4, z64, &w, &err), 0);
        check_small(&w);
        weights_free_fields(&w);
    }
    /* the zip reader on its own: prefix, data offset past the local extra */
    {
        static uint8_t buf[8192];
        size_t len = build_zip(e, 4, true, buf);
        write_file(buf, len);
        FILE *f = fopen(tmp_path, "rb");
        pt_zip z;
        assert_int_equal(pt_zip_open(fileno(f), &z, &err), 0);
        assert_string_equal(z.prefix, "m");
        const pt_zip_entry *d0 = pt_zip_find(&z, "data/0");
        assert_non_null(d0);
        assert_int_equal(d0->size, sizeof st0);
        assert_memory_equal(buf + d0->data_off, st0, sizeof st0);
        assert_null(pt_zip_find(&z, "data/2"));
        pt_zip_close(&z);
        fclose(f);
    }
    /* compressed storage record */
    e[1].method = 8;
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
    assert_non_null(strstr(err.message, "compressed"));
    e[1].method = 0;
    /* record too short for its storage */
    e[1].len = 20;
    assert_int_equal(open_zip_entries(e, 4, true, &w, &err), -1);
    assert_string_equal(err.code, "truncated");
    e[1].len = sizeof st0;
    /* missing storage record */
    assert_int_equal(open_zip_entries(e, 2, false, &w, &err), -1);
    assert_string_equal(err.code, "bad_header");
    assert_non_null(strstr(err.message, "data/1"));
    /* entries outside the prefix, duplicates, no directory at all */
    e[3].name = "other/version";
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), -1);
    assert_string_equal(err.code, "bad_header");
    e[3].name = "m/data/0";
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), -1);
    assert_non_null(strstr(err.message, "twice"));
    e[3].name = "version";
    assert_int_equal(open_zip_entries(e + 3, 1, false, &w, &err), -1);
    assert_non_null(strstr(err.message, "subdirectory"));
    /* big-endian archives and TorchScript are refused */
    e[3].name = "m/byteorder";
    e[3].data = "big";
    e[3].len = 3;
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
    assert_non_null(strstr(err.message, "big-endian"));
    e[3].data = "little";
    e[3].len = 6;
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), 0);
    weights_free_fields(&w);
    e[3].name = "m/constants.pkl";
    assert_int_equal(open_zip_entries(e, 4, false, &w, &err), -1);
    assert_non_null(strstr(err.message, "TorchScript"));
    /* an empty tensor whose other dims multiply past int64, on an empty storage */
    static const char empty_pkl[] =
        "\x80\x02}X\x01\x00\x00\x00"
        "e" REBUILD "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"
        "0X\x03\x00\x00\x00"
        "cpuK\x00tQ"
        "K\x00(K\x02K\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\x01t"
        "(K\x01K\x01K\x01K\x01t\x89}tRs.";
    zent ez[2] = {{"m/data.pkl", empty_pkl, sizeof empty_pkl - 1, 0}, {"m/data/0", "", 0, 0}};
    assert_int_equal(open_zip_entries(ez, 2, false, &w, &err), 0);
    assert_int_equal(w.ntensors, 1);
    assert_int_equal(w.tensors[0].nbytes, 0);
    assert_false(w.tensors[0].is_view);
    assert_int_equal(w.tensors[0].strides[3], 1);
    assert_int_equal(w.tensors[0].strides[2], 1LL << 40);
    assert_int_equal(w.tensors[0].strides[1], 0); /* 2^80: past int64 */
    weights_free_fields(&w);
    /* a hostile data.pkl inside a valid zip */
    static const char evil[] = "\x80\x02"
                               "cos\nsystem\nX\x02\x00\x00\x00id\x85R.";
    e[0].data = evil;
    e[0].len = sizeof evil - 1;
    assert_int_equal(open_zip_entries(e, 3, false, &w, &err), -1);
    assert_string_equal(err.code, "unsafe_pickle");
    assert_string_equal(err.message, "forbidden global os.system");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memo_is_reference),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_protocol4_opcodes),
        cmocka_unit_test(test_structural_errors),
        cmocka_unit_test(test_deep_nesting_and_limits),
        cmocka_unit_test(test_no_policy_refuses),
        cmocka_unit_test(test_forbidden_globals),
        cmocka_unit_test(test_tensor_args_checked),
        cmocka_unit_test(test_real_data_pkl),
        cmocka_unit_test_setup_teardown(test_open_zip_and_legacy, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_truncations_and_flips, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_zip_reader, setup_tmp, teardown_tmp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
