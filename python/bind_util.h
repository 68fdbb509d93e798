/* bind_util.h - argument checking shared by the binding files.
 *
 * The binding does argument checks, array conversion and GIL release, nothing
 * else.  Arrays are never converted silently: every array argument must be a
 * NumPy array of the stated dtype, C-contiguous, aligned, non-empty and of the
 * stated shape, and outputs must be writeable. */
#ifndef DSV2PY_BIND_UTIL_H
#define DSV2PY_BIND_UTIL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL DSV2PY_ARRAY_API
#ifndef DSV2PY_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdio.h>

#include "../csrc/dsv2.h"

/* shape entries: >= 0 must match exactly, DSV2PY_ANY accepts any size >= 1 */
#define DSV2PY_ANY (-1)

/* Check an array argument; returns it (borrowed) or NULL with TypeError /
 * ValueError set.  `name` is the argument's name used in messages. */
PyArrayObject *dsv2py_array(PyObject *obj, const char *name, int typenum, int ndim,
                            const int64_t *shape, int writable);

/* Like dsv2py_array, but None is accepted and returns NULL without error
 * (check PyErr_Occurred()). */
PyArrayObject *dsv2py_array_opt(PyObject *obj, const char *name, int typenum, int ndim,
                                const int64_t *shape, int writable);

/* A weight tensor: a float32 ndarray, or a dtype-tagged wrapper object with
 * `__dsv2_dtype__` ("bf16": `.data` uint16 ndarray; "int8": `.data` int8
 * ndarray and `.scales` float32 [..., rows, cols / group]; "int4": `.data`
 * uint8 [..., rows, dsv2_i4_row_bytes(cols)] and `.cols`, see csrc/int4.h; "fp8": `.data`
 * uint8 ndarray of float8 e4m3fn codes [..., rows, cols], `.scale_inv` float32
 * [..., ceil(rows / B0), ceil(cols / B1)] and `.block` = (B0, B1)).
 * `shape` is the logical shape [..., rows, cols]. */
typedef struct {
    dsv2_dtype dtype;
    const void *data;
    const float *scale;
    int ndim;
    int64_t shape[4];
    int64_t group;      /* int8: columns per scale; fp8: B1 */
    int64_t block_rows; /* fp8: B0 (rows per scale block) */
} dsv2py_tensor;

/* Parse and check a weight of rank `ndim` and given shape (DSV2PY_ANY allowed).
 * Returns 0, or -1 with an exception set.  The object must be kept alive by
 * the caller (it is an argument of the call, so it is). */
int dsv2py_weight(PyObject *obj, const char *name, int ndim, const int64_t *shape, dsv2py_tensor *out);
/* Same, None accepted: returns 1 when None (out untouched), 0 when parsed. */
int dsv2py_weight_opt(PyObject *obj, const char *name, int ndim, const int64_t *shape, dsv2py_tensor *out);

/* Keep `obj` alive until the current dsv2ext._C call returns (module.c runs
 * every binding with a per-call keep list).  Returns 0, or -1 with an
 * exception set; 1 when called outside a _C call (nothing kept). */
int dsv2py_keep(PyObject *obj);

/* The 2-D weight as a matrix; for a 3-D stacked weight, matrix e. */
dsv2_mat dsv2py_mat(const dsv2py_tensor *t);
dsv2_mat dsv2py_mat_at(const dsv2py_tensor *t, int64_t e);
/* Bytes of a weight's data (codes; int8 scales not included). */
size_t dsv2py_tensor_bytes(const dsv2py_tensor *t);

/* Raise ValueError if the memory of arrays a and b overlaps. Returns 0/-1. */
int dsv2py_no_overlap(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn);

/* dsv2ext._C.NonFiniteError(ValueError, FloatingPointError): NaN/Inf where a kernel's
 * policy rejects it (router logits).  Created by the module init. */
extern PyObject *dsv2py_NonFiniteError;

/* Turn a kernel error code into an exception; returns NULL. */
PyObject *dsv2py_raise(int code, const char *func);

/* Format a shape for messages: "[T, 2048]" (DSV2PY_ANY printed as '?'). */
void dsv2py_fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape);

/* x formatted with "%g" into buf, for messages: PyErr_Format has no float
 * conversions (a "%g" there is printed literally and the value dropped). */
static inline const char *dsv2py_g(char *buf, size_t n, double x) {
    snprintf(buf, n, "%g", x);
    return buf;
}

static inline void *dsv2py_data(PyArrayObject *a) { return PyArray_DATA(a); }
static inline int64_t dsv2py_dim(PyArrayObject *a, int i) { return (int64_t)PyArray_DIM(a, i); }

#endif
