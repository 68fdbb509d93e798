/* bind_quant.c - bindings of the int8 / int4 weight quantization kernels. */
#include "bind_util.h"

#include "../csrc/expert_mlp.h"
#include "../csrc/gemm_bf16dp.h"
#include "../csrc/gemv.h"
#include "../csrc/int4.h"
#include "../csrc/linear.h"
#include "../csrc/quant.h"
#include "../csrc/threadpool.h"

/* quantize_int8(q [rows, cols] int8 out, scales [rows, cols / group] f32 out, w [rows, cols] f32|BF16, group) */
static PyObject *py_quantize_int8(PyObject *self, PyObject *args) {
    PyObject *o_q, *o_s, *o_w;
    long long group;
    if (!PyArg_ParseTuple(args, "OOOL:quantize_int8", &o_q, &o_s, &o_w, &group)) return NULL;
    int64_t any2[2] = {DSV2PY_ANY, DSV2PY_ANY};
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "w", 2, any2, &w) < 0) return NULL;
    if (w.dtype != DSV2_F32 && w.dtype != DSV2_BF16)
        return PyErr_Format(PyExc_TypeError, "w: expected float32 or BF16 values to quantize, got a quantized weight");
    const int64_t rows = w.shape[0], cols = w.shape[1];
    if (group < 1 || cols % group)
        return PyErr_Format(PyExc_ValueError, "group: expected a block size >= 1 dividing the %lld columns of w, got %lld",
                            (long long)cols, group);
    int64_t qshape[2] = {rows, cols}, sshape[2] = {rows, cols / group};
    PyArrayObject *q = dsv2py_array(o_q, "q", NPY_INT8, 2, qshape, 1);
    if (!q) return NULL;
    PyArrayObject *s = dsv2py_array(o_s, "scales", NPY_FLOAT32, 2, sshape, 1);
    if (!s) return NULL;
    if (dsv2py_no_overlap(q, "q", s, "scales") < 0) return NULL;
    const char *w0 = (const char *)w.data, *w1 = w0 + (size_t)rows * (size_t)cols * dsv2_dtype_size(w.dtype);
    PyArrayObject *outs[2] = {q, s};
    for (int i = 0; i < 2; i++) {
        const char *a0 = (const char *)PyArray_DATA(outs[i]), *a1 = a0 + PyArray_NBYTES(outs[i]);
        if (a0 < w1 && w0 < a1)
            return PyErr_Format(PyExc_ValueError, "%s and w must not share memory", i ? "scales" : "q");
    }
    dsv2_mat wm = dsv2py_mat(&w);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_quantize_i8((int8_t *)dsv2py_data(q), (float *)dsv2py_data(s), &wm, (int64_t)group);
    Py_END_ALLOW_THREADS
    if (rc == DSV2_ERR_NONFINITE)
        return PyErr_Format(PyExc_ValueError, "w: holds NaN or Inf values; they cannot be quantized");
    if (rc) return dsv2py_raise(rc, "quantize_int8");
    Py_RETURN_NONE;
}

/* quantize_int4(q [rows, row_bytes(cols)] uint8 out, w [rows, cols] f32|BF16) */
static PyObject *py_quantize_int4(PyObject *self, PyObject *args) {
    PyObject *o_q, *o_w;
    if (!PyArg_ParseTuple(args, "OO:quantize_int4", &o_q, &o_w)) return NULL;
    int64_t any2[2] = {DSV2PY_ANY, DSV2PY_ANY};
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "w", 2, any2, &w) < 0) return NULL;
    if (w.dtype != DSV2_F32 && w.dtype != DSV2_BF16)
        return PyErr_Format(PyExc_TypeError, "w: expected float32 or BF16 values to quantize, got a quantized weight");
    int64_t qshape[2] = {w.shape[0], dsv2_i4_row_bytes(w.shape[1])};
    PyArrayObject *q = dsv2py_array(o_q, "q", NPY_UINT8, 2, qshape, 1);
    if (!q) return NULL;
    const char *w0 = (const char *)w.data, *w1 = w0 + dsv2py_tensor_bytes(&w);
    const char *a0 = (const char *)PyArray_DATA(q), *a1 = a0 + PyArray_NBYTES(q);
    if (a0 < w1 && w0 < a1) return PyErr_Format(PyExc_ValueError, "q and w must not share memory");
    dsv2_mat wm = dsv2py_mat(&w);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_quantize_i4((uint8_t *)dsv2py_data(q), &wm);
    Py_END_ALLOW_THREADS
    if (rc == DSV2_ERR_NONFINITE)
        return PyErr_Format(PyExc_ValueError, "w: holds NaN or Inf values; they cannot be quantized");
    if (rc) return dsv2py_raise(rc, "quantize_int4");
    Py_RETURN_NONE;
}

typedef struct {
    float *out;
    const dsv2_mat *W;
} widen_job;

static void widen_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    widen_job *j = (widen_job *)ctx;
    dsv2_mat_rows_to_f32(j->out + b * j->W->cols, j->W, b, e);
}

/* dequantize(out [rows, cols] f32, w [rows, cols] int8 | int4 | fp8 | BF16 | f32): out = the fp32 values of w */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_w;
    if (!PyArg_ParseTuple(args, "OO:dequantize", &o_out, &o_w)) return NULL;
    int64_t any2[2] = {DSV2PY_ANY, DSV2PY_ANY};
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "w", 2, any2, &w) < 0) return NULL;
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, w.shape, 1);
    if (!out) return NULL;
    const char *w0 = (const char *)w.data, *w1 = w0 + dsv2py_tensor_bytes(&w);
    const char *a0 = (const char *)PyArray_DATA(out), *a1 = a0 + PyArray_NBYTES(out);
    if (a0 < w1 && w0 < a1) return PyErr_Format(PyExc_ValueError, "out and w must not share memory");
    dsv2_mat wm = dsv2py_mat(&w);
    widen_job j = {(float *)dsv2py_data(out), &wm};
    int64_t grain = (int64_t)(1 << 16) / wm.cols;
    if (grain < 1) grain = 1;
    Py_BEGIN_ALLOW_THREADS
    dsv2_parallel_for(wm.rows, grain, widen_task, &j);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* quantize_act8(q [T, Kp] int8 out, s [T, nsb] f32 out, gsum [T, 8 nsb] int16 out, x [T, K] f32):
 * the int8 activations of the int4 kernels (gemv.h), q in the kernels' layout */
static PyObject *py_quantize_act8(PyObject *self, PyObject *args) {
    PyObject *o_q, *o_s, *o_g, *o_x;
    if (!PyArg_ParseTuple(args, "OOOO:quantize_act8", &o_q, &o_s, &o_g, &o_x)) return NULL;
    PyArrayObject *x = dsv2py_array(o_x, "x", NPY_FLOAT32, 2, NULL, 0);
    if (!x) return NULL;
    const int64_t T = dsv2py_dim(x, 0), K = dsv2py_dim(x, 1);
    int64_t qs[2] = {T, dsv2_i4_kp(K)}, ss[2] = {T, dsv2_i4_nsb(K)}, gs[2] = {T, 8 * dsv2_i4_nsb(K)};
    PyArrayObject *q = dsv2py_array(o_q, "q", NPY_INT8, 2, qs, 1);
    if (!q) return NULL;
    PyArrayObject *s = dsv2py_array(o_s, "s", NPY_FLOAT32, 2, ss, 1);
    if (!s) return NULL;
    PyArrayObject *g = dsv2py_array(o_g, "gsum", NPY_INT16, 2, gs, 1);
    if (!g) return NULL;
    if (dsv2py_no_overlap(q, "q", s, "s") < 0 || dsv2py_no_overlap(q, "q", g, "gsum") < 0 ||
        dsv2py_no_overlap(s, "s", g, "gsum") < 0 || dsv2py_no_overlap(q, "q", x, "x") < 0 ||
        dsv2py_no_overlap(s, "s", x, "x") < 0 || dsv2py_no_overlap(g, "gsum", x, "x") < 0)
        return NULL;
    dsv2_xq xq;
    memset(&xq, 0, sizeof xq);
    xq.q8 = (const int8_t *)dsv2py_data(q);
    xq.s8 = (const float *)dsv2py_data(s);
    xq.gsum8 = (const int16_t *)dsv2py_data(g);
    Py_BEGIN_ALLOW_THREADS
    dsv2_quantize_act8(&xq, (const float *)dsv2py_data(x), K, T, K);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_get_int4_activations(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(dsv2_get_i4_act() == DSV2_I4_ACT_FP32 ? "fp32" : "int8");
}

static PyObject *py_set_int4_activations(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_int4_activations", &name)) return NULL;
    int mode;
    if (!strcmp(name, "int8")) mode = DSV2_I4_ACT_INT8;
    else if (!strcmp(name, "fp32")) mode = DSV2_I4_ACT_FP32;
    else return PyErr_Format(PyExc_ValueError, "mode: expected 'int8' or 'fp32', got '%s'", name);
    dsv2_set_i4_act(mode);
    Py_RETURN_NONE;
}

static PyObject *py_get_int8_activations(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(dsv2_get_i8_act() == DSV2_I8_ACT_FP32 ? "fp32" : "int16");
}

static PyObject *py_set_int8_activations(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_int8_activations", &name)) return NULL;
    int mode;
    if (!strcmp(name, "int16")) mode = DSV2_I8_ACT_INT16;
    else if (!strcmp(name, "fp32")) mode = DSV2_I8_ACT_FP32;
    else return PyErr_Format(PyExc_ValueError, "mode: expected 'int16' or 'fp32', got '%s'", name);
    dsv2_set_i8_act(mode);
    Py_RETURN_NONE;
}

/* row_dot_limits() -> (linear, mlp): most activation rows a call sends through the row-dot
 * kernels (more: sgemm on dequantized panels) */
static PyObject *py_row_dot_limits(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("(ii)", (int)DSV2_LINEAR_GEMV_MAX_T, (int)DSV2_MLP_GEMV_MAX_T);
}

static PyObject *py_get_bf16_compute(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(dsv2_get_bf16_compute());
}

static PyObject *py_set_bf16_compute(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p:set_bf16_compute", &on)) return NULL;
    dsv2_set_bf16_compute(on);
    Py_RETURN_NONE;
}

static PyObject *py_bf16_compute_available(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(dsv2_bf16dp_available());
}

PyMethodDef dsv2py_quant_methods[] = {
    {"get_bf16_compute", py_get_bf16_compute, METH_NOARGS, "get_bf16_compute() -> bool"},
    {"set_bf16_compute", py_set_bf16_compute, METH_VARARGS,
     "set_bf16_compute(on): bf16 weights x bf16-rounded activations on vdpbf16ps for products of 2+ rows"},
    {"bf16_compute_available", py_bf16_compute_available, METH_NOARGS,
     "bf16_compute_available() -> bool: the CPU (and the ISA cap) allow the bf16 dot-product kernels"},
    {"row_dot_limits", py_row_dot_limits, METH_NOARGS,
     "row_dot_limits() -> (linear, mlp): most activation rows per call on the row-dot kernels for fp32 / int8 "
     "weights (bf16 MLPs on AVX-512 take them at every count)"},
    {"get_int8_activations", py_get_int8_activations, METH_NOARGS, "get_int8_activations() -> 'int16' | 'fp32'"},
    {"set_int8_activations", py_set_int8_activations, METH_VARARGS,
     "set_int8_activations(mode): activations of int8 row-dot products, 'int16' (fast) or 'fp32' (exact)"},
    {"quantize_int8", py_quantize_int8, METH_VARARGS,
     "quantize_int8(q, scales, w, group): int8 codes q [rows, cols] and fp32 scales [rows, cols / group] of w"},
    {"quantize_act8", py_quantize_act8, METH_VARARGS,
     "quantize_act8(q, s, gsum, x): int8 activations of the int4 kernels (q in the kernels' layout)"},
    {"get_int4_activations", py_get_int4_activations, METH_NOARGS, "get_int4_activations() -> 'int8' | 'fp32'"},
    {"set_int4_activations", py_set_int4_activations, METH_VARARGS,
     "set_int4_activations(mode): activations of int4 row-dot products, 'int8' (fast) or 'fp32' (exact)"},
    {"quantize_int4", py_quantize_int4, METH_VARARGS,
     "quantize_int4(q, w): packed int4 rows q [rows, row_bytes] of w [rows, cols] (csrc/int4.h)"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(out, w): out [rows, cols] float32 = the values of w"},
    {NULL, NULL, 0, NULL}};
