// A CPU memory pool for the length of a RIM call (rim_fast/cpu_pool.py opens and closes it).
//
// Why: a RIM's T steps allocate and free the same large activations over and over. glibc's malloc gives freed
// memory at the top of its heap back to the kernel once more than its trim threshold (a few MiB) lies free, and
// takes it again for the next step: every page then faults and is zeroed anew. Measured on a 2-core Xeon, one
// eager predict: S2 ~110,000 minor page faults (620 ms), S3 ~20,000 (254 ms), where the same calls with malloc's
// trimming switched off (MALLOC_TRIM_THRESHOLD_) fault a few thousand times and run 500 / 224 ms.
//
// What: while open, the pool is torch's CPU allocator (c10::SetCPUAllocator). Blocks of at least a page are handed
// out from a list of freed blocks of the same (page-rounded) size or allocated by the allocator it replaced; a
// block is listed when it is freed, whether the pool is open then or not (a training step's activations and
// gradients are freed by the backward pass and the optimizer, after the RIM call; rim_fast/cpu_pool.py opens the
// pool during that backward pass too). Smaller requests go straight to that allocator (malloc's bins serve them
// without faults). Closing the last open restores the allocator; with ``keep`` the blocks listed since the
// previous call opened stay listed (a training step is two calls, forward and backward, each reusing what the
// other freed) and those listed earlier and not reused since are freed, without ``keep`` all are. A block's data
// pointer is its context (a "simple" DataPtr), so raw_allocate / raw_deleter work too.
#pragma once

#include <cstdint>

namespace rim_fast {
namespace cpu_pool {

// Opens the pool (nested opens count). False when it could not become torch's CPU allocator (an allocator of
// higher priority is registered): then nothing changed and close() must not be called.
bool open();

// Closes one open; the last restores the allocator and frees the listed blocks (with ``keep``, those listed before
// the previous call opened).
void close(bool keep);

// Frees every listed block (nothing while the pool is open).
void release();

// Counters since the process started: {open depth, blocks listed now, bytes listed now, blocks handed out from
// the list (hits), blocks allocated anew (misses), blocks in use}.
void stats(int64_t out[6]);

}  // namespace cpu_pool
}  // namespace rim_fast
