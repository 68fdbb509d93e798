/* bind_fp8.c - bindings of the float8 e4m3fn kernels: block quantization of weights
 * and encode / decode of arrays. */
#include "bind_util.h"

#include "../csrc/quant_f8.h"

/* a (rows x cols of elsize) and the bytes of array o must not overlap; 0 or -1 */
static int disjoint(PyArrayObject *o, const char *oname, const void *a, size_t bytes, const char *aname) {
    const char *o0 = (const char *)PyArray_DATA(o), *o1 = o0 + PyArray_NBYTES(o);
    const char *a0 = (const char *)a, *a1 = a0 + bytes;
    if (o0 < a1 && a0 < o1) {
        PyErr_Format(PyExc_ValueError, "%s and %s must not share memory", oname, aname);
        return -1;
    }
    return 0;
}

/* quantize_fp8(q [rows, cols] u8 out, scale_inv [ceil(rows/b0), ceil(cols/b1)] f32 out,
 *              w [rows, cols] f32|BF16, block_rows b0, block_cols b1) */
static PyObject *py_quantize_fp8(PyObject *self, PyObject *args) {
    PyObject *o_q, *o_s, *o_w;
    long long b0, b1;
    if (!PyArg_ParseTuple(args, "OOOLL:quantize_fp8", &o_q, &o_s, &o_w, &b0, &b1)) return NULL;
    int64_t any2[2] = {DSV2PY_ANY, DSV2PY_ANY};
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "w", 2, any2, &w) < 0) return NULL;
    if (w.dtype != DSV2_F32 && w.dtype != DSV2_BF16)
        return PyErr_Format(PyExc_TypeError, "w: expected float32 or BF16 values to quantize");
    if (b0 < 1 || b1 < 1)
        return PyErr_Format(PyExc_ValueError, "block: expected two positive ints, got (%lld, %lld)", b0, b1);
    const int64_t rows = w.shape[0], cols = w.shape[1];
    int64_t qshape[2] = {rows, cols}, sshape[2] = {(rows + b0 - 1) / b0, (cols + b1 - 1) / b1};
    PyArrayObject *q = dsv2py_array(o_q, "q", NPY_UINT8, 2, qshape, 1);
    if (!q) return NULL;
    PyArrayObject *s = dsv2py_array(o_s, "scale_inv", NPY_FLOAT32, 2, sshape, 1);
    if (!s) return NULL;
    const size_t wbytes = (size_t)rows * (size_t)cols * dsv2_dtype_size(w.dtype);
    if (dsv2py_no_overlap(q, "q", s, "scale_inv") < 0 || disjoint(q, "q", w.data, wbytes, "w") < 0 ||
        disjoint(s, "scale_inv", w.data, wbytes, "w") < 0)
        return NULL;
    dsv2_mat wm = dsv2py_mat(&w);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_quantize_f8((uint8_t *)dsv2py_data(q), (float *)dsv2py_data(s), &wm, (int64_t)b0, (int64_t)b1);
    Py_END_ALLOW_THREADS
    if (rc == DSV2_ERR_NONFINITE)
        return PyErr_Format(PyExc_ValueError, "w: holds NaN or Inf values; they cannot be quantized");
    if (rc) return dsv2py_raise(rc, "quantize_fp8");
    Py_RETURN_NONE;
}

/* e4m3_encode(out [n] u8, x [n] f32) / e4m3_decode(out [n] f32, codes [n] u8) */
static PyObject *py_e4m3_encode(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x;
    if (!PyArg_ParseTuple(args, "OO:e4m3_encode", &o_out, &o_x)) return NULL;
    PyArrayObject *x = dsv2py_array(o_x, "x", NPY_FLOAT32, 1, NULL, 0);
    if (!x) return NULL;
    int64_t shape[1] = {dsv2py_dim(x, 0)};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_UINT8, 1, shape, 1);
    if (!out || dsv2py_no_overlap(out, "out", x, "x") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dsv2_e4m3_encode((uint8_t *)dsv2py_data(out), (const float *)dsv2py_data(x), shape[0]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_e4m3_decode(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_c;
    if (!PyArg_ParseTuple(args, "OO:e4m3_decode", &o_out, &o_c)) return NULL;
    PyArrayObject *c = dsv2py_array(o_c, "codes", NPY_UINT8, 1, NULL, 0);
    if (!c) return NULL;
    int64_t shape[1] = {dsv2py_dim(c, 0)};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 1, shape, 1);
    if (!out || dsv2py_no_overlap(out, "out", c, "codes") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dsv2_e4m3_decode((float *)dsv2py_data(out), (const uint8_t *)dsv2py_data(c), shape[0]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef dsv2py_fp8_methods[] = {
    {"quantize_fp8", py_quantize_fp8, METH_VARARGS,
     "quantize_fp8(q, scale_inv, w, block_rows, block_cols): e4m3fn codes q [rows, cols] and fp32 block scales "
     "scale_inv [ceil(rows/block_rows), ceil(cols/block_cols)] of w (amax / 448 per block)"},
    {"e4m3_encode", py_e4m3_encode, METH_VARARGS,
     "e4m3_encode(out, x): float8 e4m3fn codes of float32 x (round to nearest even, saturating at 448)"},
    {"e4m3_decode", py_e4m3_decode, METH_VARARGS, "e4m3_decode(out, codes): exact float32 values of e4m3fn codes"},
    {NULL, NULL, 0, NULL}};
