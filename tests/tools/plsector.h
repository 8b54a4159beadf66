/*
 * plsector.h — the self-describing sector pattern shared by plwriter (which
 * writes it) and plreplay (which recognises it after a simulated crash):
 * magic, write id, sector number, seed, filler derived from them, and a
 * hash over the sector.  One definition, so the two tools cannot disagree.
 */
#ifndef PLSECTOR_H
#define PLSECTOR_H

#include <stdint.h>

#define PL_MAGIC 0x3154434553574c50ULL  /* "PLWSECT1" little-endian */


static inline uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t sector_hash(const uint64_t *w)
{
    uint64_t h = 0x243f6a8885a308d3ULL;
    for (unsigned i = 0; i < 63; i++)
        h = mix64(h ^ w[i]) + i;
    return h;
}

static inline void fill_sector(uint64_t *w, uint64_t seed, uint64_t id, uint64_t sector)
{
    uint64_t s = mix64(seed ^ mix64(id ^ mix64(sector)));

    w[0] = PL_MAGIC;
    w[1] = id;
    w[2] = sector;
    w[3] = seed;
    for (unsigned i = 4; i < 63; i++) {
        s += 0x9e3779b97f4a7c15ULL;
        w[i] = mix64(s);
    }
    w[63] = sector_hash(w);
}

#endif
