/* errors.c - messages for the kernels' error codes. */
#include "dsv2.h"

const char *dsv2_strerror(int code) {
    switch (code) {
    case DSV2_OK: return "ok";
    case DSV2_ERR_NOMEM: return "out of memory";
    case DSV2_ERR_ARG: return "inconsistent arguments";
    case DSV2_ERR_DTYPE: return "unsupported dtype";
    case DSV2_ERR_RANGE: return "index out of range";
    case DSV2_ERR_NONFINITE: return "non-finite value";
    default: return "unknown error";
    }
}
