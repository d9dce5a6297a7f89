/* Every native kernel in one library, so that they share one thread pool (parallel.h):
 * decode_step.c includes the layer ops, paged attention and the quantized matmuls;
 * gguf_rows.c decodes an embedding's rows from a file's blocks. */
#include "decode_step.c"
#include "gguf_rows.c"
