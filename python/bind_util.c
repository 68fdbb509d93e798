/* bind_util.c - argument checks for the dsv2ext._C functions. */
#include "bind_util.h"

#include <stdio.h>

void dsv2py_fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t off = 0;
    off += (size_t)snprintf(buf + off, n - off, "[");
    for (int i = 0; i < ndim && off < n; i++) {
        if (!shape || shape[i] < 0) /* NULL: no sizes given, any rank-ndim shape */
            off += (size_t)snprintf(buf + off, n - off, "%s?", i ? ", " : "");
        else
            off += (size_t)snprintf(buf + off, n - off, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    if (off < n) snprintf(buf + off, n - off, "]");
}

static void fmt_np_shape(char *buf, size_t n, PyArrayObject *a) {
    int64_t s[NPY_MAXDIMS];
    int nd = PyArray_NDIM(a);
    for (int i = 0; i < nd; i++) s[i] = (int64_t)PyArray_DIM(a, i);
    dsv2py_fmt_shape(buf, n, nd, s);
}

static const char *typename_of(int typenum) {
    switch (typenum) {
    case NPY_FLOAT32: return "float32";
    case NPY_INT64: return "int64";
    case NPY_INT32: return "int32";
    case NPY_UINT16: return "uint16";
    case NPY_INT8: return "int8";
    case NPY_UINT8: return "uint8";
    default: return "?";
    }
}

static PyArrayObject *check_array(PyObject *obj, const char *name, int typenum, int ndim,
                                  const int64_t *shape, int writable, const char *dtype_hint) {
    char want[128], got[128];
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype %s, got %s", name,
                     dtype_hint ? dtype_hint : typename_of(typenum), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum || !PyArray_ISNBO(PyArray_DESCR(a)->byteorder)) {
        PyObject *s = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s%s", name,
                     dtype_hint ? dtype_hint : typename_of(typenum), s ? PyUnicode_AsUTF8(s) : "?",
                     (typenum == NPY_FLOAT32 && PyArray_TYPE(a) == NPY_UINT16)
                         ? " (bfloat16 weights must be wrapped as dsv2ext.BF16(array))"
                         : "");
        Py_XDECREF(s);
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        dsv2py_fmt_shape(want, sizeof want, ndim, shape);
        fmt_np_shape(got, sizeof got, a);
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions %s, got %d dimensions %s", name, ndim,
                     want, PyArray_NDIM(a), got);
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        int64_t d = (int64_t)PyArray_DIM(a, i);
        if (d == 0) {
            fmt_np_shape(got, sizeof got, a);
            PyErr_Format(PyExc_ValueError, "%s: empty arrays are not accepted (shape %s)", name, got);
            return NULL;
        }
        if (shape && shape[i] >= 0 && d != shape[i]) {
            dsv2py_fmt_shape(want, sizeof want, ndim, shape);
            fmt_np_shape(got, sizeof got, a);
            PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", name, want, got);
            return NULL;
        }
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous array (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: the array's data is not aligned to its dtype", name);
        return NULL;
    }
    if (writable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: the output array is read-only", name);
        return NULL;
    }
    return a;
}

PyArrayObject *dsv2py_array(PyObject *obj, const char *name, int typenum, int ndim,
                            const int64_t *shape, int writable) {
    if (obj == NULL || obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype %s, got None", name,
                     typename_of(typenum));
        return NULL;
    }
    return check_array(obj, name, typenum, ndim, shape, writable, NULL);
}

PyArrayObject *dsv2py_array_opt(PyObject *obj, const char *name, int typenum, int ndim,
                                const int64_t *shape, int writable) {
    if (obj == NULL || obj == Py_None) return NULL;
    return check_array(obj, name, typenum, ndim, shape, writable, NULL);
}

static int fill_tensor(PyArrayObject *a, dsv2_dtype dt, dsv2py_tensor *out) {
    out->dtype = dt;
    out->data = PyArray_DATA(a);
    out->scale = NULL;
    out->group = 0;
    out->block_rows = 0;
    out->ndim = PyArray_NDIM(a);
    for (int i = 0; i < out->ndim; i++) out->shape[i] = (int64_t)PyArray_DIM(a, i);
    return 0;
}

/* The arrays behind a dtype-tagged weight come from getattr: hold them for the
 * whole call (a computed attribute may return a temporary, and another thread
 * may rebind the attribute while the kernel runs without the GIL). */
static int hold(PyObject *arr, const char *name, const char *attr) {
    int rc = dsv2py_keep(arr);
    if (rc <= 0) return rc;
    if (Py_REFCNT(arr) < 2) { /* no call frame to hold it, and we hold the only reference */
        PyErr_Format(PyExc_TypeError, "%s.%s: must be an array stored on the weight object, not a temporary",
                     name, attr);
        return -1;
    }
    return 0;
}

/* "int4": .data uint8 [..., rows, dsv2_i4_row_bytes(cols)] (csrc/int4.h) and .cols, the
 * logical column count; the tensor's shape is [..., rows, cols]. */
static int int4_weight(PyObject *obj, PyObject *data, const char *name, int ndim, const int64_t *shape,
                       dsv2py_tensor *out) {
    char buf[256];
    PyObject *oc = PyObject_GetAttrString(obj, "cols");
    if (!oc) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: an int4 weight needs .cols (its number of columns)", name);
        }
        return -1;
    }
    long long cols = PyLong_Check(oc) ? PyLong_AsLongLong(oc) : -1;
    Py_DECREF(oc);
    if (cols == -1 && PyErr_Occurred()) return -1;
    if (cols < 1 || cols > ((int64_t)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "%s.cols: expected a positive int, got %lld", name, cols);
        return -1;
    }
    int64_t want[4];
    for (int i = 0; i < ndim; i++) want[i] = shape ? shape[i] : DSV2PY_ANY;
    if (want[ndim - 1] >= 0 && want[ndim - 1] != cols) {
        char ws[128];
        dsv2py_fmt_shape(ws, sizeof ws, ndim, shape);
        PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got an int4 weight of %lld columns", name, ws, cols);
        return -1;
    }
    want[ndim - 1] = dsv2_i4_row_bytes(cols);
    snprintf(buf, sizeof buf, "%s.data", name);
    PyArrayObject *a = check_array(data, buf, NPY_UINT8, ndim, want, 0, "uint8 (packed int4 rows)");
    if (!a || hold(data, name, "data") < 0) return -1;
    fill_tensor(a, DSV2_I4, out);
    out->shape[ndim - 1] = cols;
    out->group = 32;
    return 0;
}

/* fp8: `.block` (B0, B1) and `.scale_inv` float32 [..., ceil(rows / B0), ceil(cols / B1)] of a
 * weight whose codes are parsed into `out`.  Returns 0, or -1 with an exception set. */
static int parse_fp8_scales(PyObject *obj, const char *name, int ndim, dsv2py_tensor *out) {
    char buf[256], want[128];
    long long blk[2] = {0, 0};
    PyObject *bo = PyObject_GetAttrString(obj, "block");
    if (!bo) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: an fp8 weight needs a .block = (rows, cols) of its scale blocks", name);
        }
        return -1;
    }
    PyObject *bt = PySequence_Check(bo) ? PySequence_Tuple(bo) : NULL;
    Py_DECREF(bo);
    int ok = bt && PyTuple_GET_SIZE(bt) == 2;
    for (int i = 0; ok && i < 2; i++) {
        PyObject *v = PyTuple_GET_ITEM(bt, i);
        ok = PyLong_Check(v) && !PyBool_Check(v);
        if (ok) blk[i] = PyLong_AsLongLong(v);
        if (ok && PyErr_Occurred()) {
            PyErr_Clear();
            ok = 0;
        }
        ok = ok && blk[i] >= 1 && blk[i] <= ((long long)1 << 40);
    }
    Py_XDECREF(bt);
    if (!ok) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s.block: expected two positive ints (rows, cols) of a scale block", name);
        return -1;
    }
    PyObject *sc = PyObject_GetAttrString(obj, "scale_inv");
    if (!sc) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: an fp8 weight needs a .scale_inv array (float32 block scales)", name);
        }
        return -1;
    }
    int64_t sshape[4];
    for (int i = 0; i < ndim; i++) sshape[i] = out->shape[i];
    sshape[ndim - 2] = (out->shape[ndim - 2] + blk[0] - 1) / blk[0];
    sshape[ndim - 1] = (out->shape[ndim - 1] + blk[1] - 1) / blk[1];
    snprintf(buf, sizeof buf, "%s.scale_inv", name);
    PyArrayObject *s = check_array(sc, buf, NPY_FLOAT32, ndim, NULL, 0, NULL);
    int rc = -1;
    if (s) {
        ok = 1;
        for (int i = 0; i < ndim; i++) ok = ok && (int64_t)PyArray_DIM(s, i) == sshape[i];
        if (!ok) {
            dsv2py_fmt_shape(want, sizeof want, ndim, sshape);
            PyErr_Format(PyExc_ValueError, "%s: expected shape %s (ceil of the weight's shape / block (%lld, %lld))",
                         buf, want, blk[0], blk[1]);
        } else if (hold(sc, name, "scale_inv") == 0) {
            out->scale = (const float *)PyArray_DATA(s);
            out->block_rows = (int64_t)blk[0];
            out->group = (int64_t)blk[1];
            rc = 0;
        }
    }
    Py_DECREF(sc);
    return rc;
}

int dsv2py_weight(PyObject *obj, const char *name, int ndim, const int64_t *shape, dsv2py_tensor *out) {
    char buf[256];
    if (ndim < 1 || ndim > 4) {
        PyErr_Format(PyExc_SystemError, "%s: bad rank in binding", name);
        return -1;
    }
    if (obj == NULL || obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float32 ndarray or a dsv2ext.BF16, got None", name);
        return -1;
    }
    if (PyArray_Check(obj)) {
        if (PyArray_TYPE((PyArrayObject *)obj) == NPY_UINT16) {
            PyErr_Format(PyExc_TypeError,
                         "%s: a bare uint16 array is not taken as bfloat16; wrap it as dsv2ext.BF16(array)", name);
            return -1;
        }
        PyArrayObject *a = check_array(obj, name, NPY_FLOAT32, ndim, shape, 0, "float32 (or a dsv2ext.BF16)");
        if (!a) return -1;
        return fill_tensor(a, DSV2_F32, out);
    }
    PyObject *tag = PyObject_GetAttrString(obj, "__dsv2_dtype__");
    if (!tag) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a float32 ndarray or a dsv2ext.BF16, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *t = PyUnicode_Check(tag) ? PyUnicode_AsUTF8(tag) : NULL;
    if (!t) {
        Py_DECREF(tag);
        PyErr_Format(PyExc_TypeError, "%s: __dsv2_dtype__ must be a string", name);
        return -1;
    }
    int rc = -1;
    PyObject *data = PyObject_GetAttrString(obj, "data");
    if (!data) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: a weight tagged '%s' needs a .data array", name, t);
        }
        goto done;
    }
    if (!strcmp(t, "bf16")) {
        snprintf(buf, sizeof buf, "%s.data", name);
        PyArrayObject *a = check_array(data, buf, NPY_UINT16, ndim, shape, 0, "uint16 (bfloat16 bits)");
        if (!a || hold(data, name, "data") < 0) goto done;
        rc = fill_tensor(a, DSV2_BF16, out);
    } else if (!strcmp(t, "int8")) {
        snprintf(buf, sizeof buf, "%s.data", name);
        PyArrayObject *a = check_array(data, buf, NPY_INT8, ndim, shape, 0, NULL);
        if (!a || hold(data, name, "data") < 0) goto done;
        fill_tensor(a, DSV2_I8, out);
        PyObject *sc = PyObject_GetAttrString(obj, "scales");
        if (!sc) {
            if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s: an int8 weight needs a .scales array (float32 [..., rows, cols / group])",
                             name);
            }
            goto done;
        }
        snprintf(buf, sizeof buf, "%s.scales", name);
        int64_t sshape[4];
        for (int i = 0; i < ndim; i++) sshape[i] = out->shape[i];
        int64_t cols = out->shape[ndim - 1];
        PyArrayObject *s = check_array(sc, buf, NPY_FLOAT32, ndim, NULL, 0, NULL);
        if (s) {
            int64_t ng = (int64_t)PyArray_DIM(s, ndim - 1);
            sshape[ndim - 1] = ng;
            int ok = ng > 0 && cols % ng == 0;
            for (int i = 0; i < ndim - 1; i++) ok = ok && (int64_t)PyArray_DIM(s, i) == sshape[i];
            if (ok && hold(sc, name, "scales") < 0) {
                Py_DECREF(sc);
                goto done;
            }
            if (!ok) {
                char want[128];
                sshape[ndim - 1] = DSV2PY_ANY;
                dsv2py_fmt_shape(want, sizeof want, ndim, sshape);
                PyErr_Format(PyExc_ValueError, "%s: expected shape %s with a last dimension dividing %lld", buf,
                             want, (long long)cols);
            } else {
                out->scale = (const float *)PyArray_DATA(s);
                out->group = cols / ng;
                rc = 0;
            }
        }
        Py_DECREF(sc);
    } else if (!strcmp(t, "int4")) {
        rc = int4_weight(obj, data, name, ndim, shape, out);
    } else if (!strcmp(t, "fp8")) {
        if (ndim < 2) {
            PyErr_Format(PyExc_TypeError, "%s: fp8 weights are matrices; this argument takes a vector (float32 or BF16)",
                         name);
            goto done;
        }
        snprintf(buf, sizeof buf, "%s.data", name);
        PyArrayObject *a = check_array(data, buf, NPY_UINT8, ndim, shape, 0, "uint8 (float8 e4m3fn codes)");
        if (!a || hold(data, name, "data") < 0) goto done;
        fill_tensor(a, DSV2_F8E4M3, out);
        rc = parse_fp8_scales(obj, name, ndim, out);
    } else if (!strcmp(t, "f8_e4m3")) {
        PyErr_Format(PyExc_TypeError,
                     "%s: float8 e4m3 codes without their block scales; wrap them as "
                     "dsv2ext.Fp8Weight(codes, scale_inv, block)", name);
    } else {
        PyErr_Format(PyExc_TypeError, "%s: unsupported weight dtype tag '%s' (expected 'bf16', 'int8', 'int4' or 'fp8')",
                     name, t);
    }
done:
    Py_XDECREF(data);
    Py_DECREF(tag);
    return rc;
}

int dsv2py_weight_opt(PyObject *obj, const char *name, int ndim, const int64_t *shape, dsv2py_tensor *out) {
    if (obj == NULL || obj == Py_None) return 1;
    return dsv2py_weight(obj, name, ndim, shape, out);
}

size_t dsv2py_tensor_bytes(const dsv2py_tensor *t) {
    dsv2_mat m = dsv2py_mat(t);
    return (size_t)m.rows * dsv2_mat_row_bytes(&m);
}

dsv2_mat dsv2py_mat(const dsv2py_tensor *t) {
    dsv2_mat m;
    memset(&m, 0, sizeof m);
    m.dtype = t->dtype;
    m.block_rows = t->block_rows; /* fp8 (row_off 0); a stacked fp8 weight as one matrix needs rows % B0 == 0 */
    m.data = t->data;
    m.scale = t->scale;
    m.group = t->group;
    m.cols = t->shape[t->ndim - 1];
    m.rows = 1;
    for (int i = 0; i < t->ndim - 1; i++) m.rows *= t->shape[i];
    return m;
}

dsv2_mat dsv2py_mat_at(const dsv2py_tensor *t, int64_t e) {
    dsv2_mat m;
    memset(&m, 0, sizeof m);
    m.dtype = t->dtype;
    m.group = t->group;
    m.block_rows = t->block_rows;
    m.rows = t->shape[t->ndim - 2];
    m.cols = t->shape[t->ndim - 1];
    m.data = (const char *)t->data + (size_t)e * (size_t)m.rows * dsv2_mat_row_bytes(&m);
    if (t->dtype == DSV2_F8E4M3)
        m.scale = t->scale + (size_t)e * (size_t)((m.rows + m.block_rows - 1) / m.block_rows) * (size_t)dsv2_f8_scale_cols(&m);
    else
        m.scale = t->scale ? t->scale + (size_t)e * (size_t)m.rows * (size_t)(m.cols / (t->group ? t->group : 1)) : NULL;
    return m;
}

int dsv2py_no_overlap(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn) {
    if (!a || !b) return 0;
    const char *a0 = (const char *)PyArray_DATA(a), *a1 = a0 + PyArray_NBYTES(a);
    const char *b0 = (const char *)PyArray_DATA(b), *b1 = b0 + PyArray_NBYTES(b);
    if (a0 < b1 && b0 < a1) {
        PyErr_Format(PyExc_ValueError, "%s and %s must not share memory", an, bn);
        return -1;
    }
    return 0;
}

PyObject *dsv2py_NonFiniteError = NULL;

PyObject *dsv2py_raise(int code, const char *func) {
    PyObject *exc = PyExc_RuntimeError;
    if (code == DSV2_ERR_NOMEM) exc = PyExc_MemoryError;
    else if (code == DSV2_ERR_NONFINITE && dsv2py_NonFiniteError) exc = dsv2py_NonFiniteError;
    else if (code == DSV2_ERR_ARG || code == DSV2_ERR_RANGE || code == DSV2_ERR_NONFINITE) exc = PyExc_ValueError;
    else if (code == DSV2_ERR_DTYPE) exc = PyExc_TypeError;
    PyErr_Format(exc, "%s: %s", func, dsv2_strerror(code));
    return NULL;
}
