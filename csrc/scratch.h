/* scratch.h - reusable work buffers for the kernels.
 *
 * Large temporaries (decompressed keys, absorbed queries, ...) freed back here are
 * kept (up to a total cap) and handed out again, so repeated calls do not pay the
 * kernel's page faults of fresh mmap'ed memory on every call.  Thread-safe. */
#ifndef DSV2_SCRATCH_H
#define DSV2_SCRATCH_H

#include <stddef.h>

/* Blocks smaller than this are plain malloc/free. */
#define DSV2_SCRATCH_MIN_KEEP ((size_t)256 << 10)
/* Most bytes kept cached. */
#define DSV2_SCRATCH_MAX_CACHED ((size_t)256 << 20)

// -> a 64-byte aligned block of at least `bytes` bytes, or NULL
void *dsv2_scratch_alloc(size_t bytes);
// p from dsv2_scratch_alloc (or NULL)
void dsv2_scratch_free(void *p);
// release every cached block
void dsv2_scratch_trim(void);

#endif
