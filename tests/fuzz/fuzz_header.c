/*
 * libFuzzer target: header and header-extension decoding, and the
 * encode/decode round trip of whatever decodes.
 */
#include "header.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct qcow2_header h, h2;
    char err[512];
    uint8_t *buf;

    if (header_decode(data, size, size, &h, err, sizeof(err)) < 0)
        return 0;
    /* Whatever decodes must encode into one cluster and decode again. */
    buf = malloc(1u << h.cluster_bits);
    if (buf && header_encode(&h, buf, 1u << h.cluster_bits) >= 0) {
        if (header_decode(buf, 1u << h.cluster_bits, (uint64_t)-1 >> 8, &h2, err,
                          sizeof(err)) == 0) {
            if (h2.size != h.size || h2.l1_size != h.l1_size ||
                h2.nb_exts != h.nb_exts)
                abort();
            header_free(&h2);
        }
    }
    free(buf);
    header_free(&h);
    return 0;
}
