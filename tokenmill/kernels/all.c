/* Every native kernel in one library, so that they share one thread pool (parallel.h):
 * decode_step.c includes the layer ops, paged attention and the quantized matmuls. */
#include "decode_step.c"
