/* bind_core.c - bindings of the basic kernels: RMSNorm, linear, threads, ISA, AMX. */
#include "bind_util.h"

#include "../csrc/amx_tiles.h"
#include "../csrc/cpu.h"
#include "../csrc/gemm_amx.h"
#include "../csrc/linear.h"
#include "../csrc/rmsnorm.h"
#include "../csrc/threadpool.h"

/* rmsnorm(out [T, d] f32, x [T, d] f32, weight [d] f32|BF16, eps: float, residual [T, d] f32 | None) -> None
 * With a residual: x += residual first (x written), then out = RMSNorm(x) * weight. */
static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x, *o_w, *o_r = Py_None;
    double eps;
    if (!PyArg_ParseTuple(args, "OOOd|O:rmsnorm", &o_out, &o_x, &o_w, &eps, &o_r)) return NULL;
    const int add = o_r != Py_None;
    PyArrayObject *x = dsv2py_array(o_x, "x", NPY_FLOAT32, 2, NULL, add);
    if (!x) return NULL;
    int64_t T = dsv2py_dim(x, 0), d = dsv2py_dim(x, 1);
    int64_t oshape[2] = {T, d}, wshape[1] = {d};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    PyArrayObject *r = add ? dsv2py_array(o_r, "residual", NPY_FLOAT32, 2, oshape, 0) : NULL;
    if (add && !r) return NULL;
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "weight", 1, wshape, &w) < 0) return NULL;
    if (w.dtype == DSV2_I8 || w.dtype == DSV2_I4)
        return PyErr_Format(PyExc_TypeError, "weight: quantized (int8 / int4) norm weights are not supported");
    char gb[32];
    if (!(eps >= 0.0) || eps > 1.0)
        return PyErr_Format(PyExc_ValueError, "eps: expected 0 <= eps <= 1, got %s", dsv2py_g(gb, sizeof gb, eps));
    if (out != x && dsv2py_no_overlap(out, "out", x, "x") < 0) return NULL;
    if (add && (dsv2py_no_overlap(r, "residual", x, "x") < 0 || dsv2py_no_overlap(r, "residual", out, "out") < 0))
        return NULL;
    dsv2_mat wm = dsv2py_mat(&w);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (add) rc = dsv2_rmsnorm_add((float *)dsv2py_data(out), (float *)dsv2py_data(x), (const float *)dsv2py_data(r),
                                   &wm, T, d, (float)eps);
    else rc = dsv2_rmsnorm((float *)dsv2py_data(out), (const float *)dsv2py_data(x), &wm, T, d, (float)eps);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "rmsnorm");
    Py_RETURN_NONE;
}

/* linear(out [T, N] f32, x [T, K] f32, weight [N, K] f32|BF16|int8|int4|fp8) -> None */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x, *o_w;
    if (!PyArg_ParseTuple(args, "OOO:linear", &o_out, &o_x, &o_w)) return NULL;
    PyArrayObject *x = dsv2py_array(o_x, "x", NPY_FLOAT32, 2, NULL, 0);
    if (!x) return NULL;
    int64_t T = dsv2py_dim(x, 0), K = dsv2py_dim(x, 1);
    int64_t wshape[2] = {DSV2PY_ANY, K};
    dsv2py_tensor w;
    if (dsv2py_weight(o_w, "weight", 2, wshape, &w) < 0) return NULL;
    int64_t N = w.shape[0];
    int64_t oshape[2] = {T, N};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    if (dsv2py_no_overlap(out, "out", x, "x") < 0) return NULL;
    if (T > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
        return PyErr_Format(PyExc_ValueError, "linear: dimensions must be < 2**31");
    dsv2_mat wm = dsv2py_mat(&w);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_linear((float *)dsv2py_data(out), (const float *)dsv2py_data(x), &wm, T);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "linear");
    Py_RETURN_NONE;
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    if (n < 1 || n > DSV2_MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "n: expected 1 <= n <= %d, got %d", DSV2_MAX_THREADS, n);
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = dsv2_set_num_threads(n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(dsv2_get_num_threads());
}

static PyObject *py_get_isa(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(dsv2_isa_name(dsv2_isa_level()));
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    int lvl;
    if (!strcmp(name, "portable")) lvl = DSV2_ISA_PORTABLE;
    else if (!strcmp(name, "avx2")) lvl = DSV2_ISA_AVX2;
    else if (!strcmp(name, "avx512")) lvl = DSV2_ISA_AVX512;
    else if (!strcmp(name, "amx")) lvl = DSV2_ISA_AMX;
    else return PyErr_Format(PyExc_ValueError, "isa: expected 'portable', 'avx2', 'avx512' or 'amx', got '%s'", name);
    return PyUnicode_FromString(dsv2_isa_name(dsv2_set_isa(lvl)));
}

static PyObject *py_set_avx512vbmi(PyObject *self, PyObject *args) {
    int allow;
    if (!PyArg_ParseTuple(args, "p:set_avx512vbmi", &allow)) return NULL;
    return PyBool_FromLong(dsv2_set_avx512vbmi(allow));
}

static PyObject *py_avx512vbmi(PyObject *self, PyObject *noargs) { return PyBool_FromLong(dsv2_cpu_has_avx512vbmi()); }

static PyObject *py_prefetch_defaults(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:i,s:i,s:i,s:i}", "bf16", dsv2_prefetch_default(DSV2_PF_BF16), "int8",
                         dsv2_prefetch_default(DSV2_PF_I8), "int4", dsv2_prefetch_default(DSV2_PF_I4), "fp8",
                         dsv2_prefetch_default(DSV2_PF_F8));
}

static PyObject *py_get_prefetch(PyObject *self, PyObject *noargs) {
    const int v = dsv2_prefetch_bytes();
    if (v < 0) Py_RETURN_NONE;
    return PyLong_FromLong(v);
}

static PyObject *py_set_prefetch(PyObject *self, PyObject *args) {
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:set_prefetch", &o)) return NULL;
    if (o == Py_None) {
        dsv2_set_prefetch_bytes(-1);
        Py_RETURN_NONE;
    }
    long long b = PyLong_AsLongLong(o);
    if (b == -1 && PyErr_Occurred()) return NULL;
    if (b < 0 || b > (1 << 20)) return PyErr_Format(PyExc_ValueError, "nbytes: expected None or 0..1048576, got %lld", b);
    dsv2_set_prefetch_bytes((int)b);
    return PyLong_FromLong(dsv2_prefetch_bytes());
}

static PyObject *py_set_chunks_per_thread(PyObject *self, PyObject *args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L:set_chunks_per_thread", &n)) return NULL;
    if (n < 0 || n > 64) return PyErr_Format(PyExc_ValueError, "n: expected 0 (automatic) or 1..64 chunks per thread, got %lld", n);
    return PyLong_FromLong(dsv2_set_chunks_per_thread((int)n));
}

static PyObject *py_get_chunks_per_thread(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(dsv2_get_chunks_per_thread());
}

static PyObject *py_amx_available(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(dsv2_amx_hw_supported());
}

static PyObject *py_amx_min_rows(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(DSV2_AMX_MIN_T);
}

/* test vehicle: the AMX kernels on emulated tiles (amx_tiles.h) */
static PyObject *py_set_amx_emulation(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p:set_amx_emulation", &on)) return NULL;
    dsv2_set_amx_emulation(on);
    Py_RETURN_NONE;
}

static PyObject *py_get_amx_emulation(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(dsv2_get_amx_emulation());
}

static PyObject *py_amx_emu_stats(PyObject *self, PyObject *noargs) {
    long products, faults;
    dsv2_amx_emu_stats(&products, &faults);
    return Py_BuildValue("(ll)", products, faults);
}

/* amx_split3(parts [3, n] uint16, x [n] f32) -> None: the exact mode's bf16 parts of x */
static PyObject *py_amx_split3(PyObject *self, PyObject *args) {
    PyObject *o_p, *o_x;
    if (!PyArg_ParseTuple(args, "OO:amx_split3", &o_p, &o_x)) return NULL;
    PyArrayObject *x = dsv2py_array(o_x, "x", NPY_FLOAT32, 1, NULL, 0);
    if (!x) return NULL;
    int64_t n = dsv2py_dim(x, 0), pshape[2] = {3, n};
    PyArrayObject *p = dsv2py_array(o_p, "parts", NPY_UINT16, 2, pshape, 1);
    if (!p) return NULL;
    uint16_t *pd = (uint16_t *)dsv2py_data(p);
    if (dsv2_amx_split3(pd, pd + n, pd + 2 * n, (const float *)dsv2py_data(x), n))
        return PyErr_Format(PyExc_ValueError, "amx_split3: needs AVX-512 (the level in force is '%s')",
                            dsv2_isa_name(dsv2_isa_level()));
    Py_RETURN_NONE;
}

/* amx_tile_dot(c [16, 16] f32, a [16, 32] uint16 (bf16), b [16, 32] uint16 (bf16 pairs), hw: bool) -> None:
 * one TDPBF16PS, c += a . b, on the CPU's tiles or on the emulation */
static PyObject *py_amx_tile_dot(PyObject *self, PyObject *args) {
    PyObject *o_c, *o_a, *o_b;
    int hw;
    if (!PyArg_ParseTuple(args, "OOOp:amx_tile_dot", &o_c, &o_a, &o_b, &hw)) return NULL;
    const int64_t cs[2] = {16, 16}, as[2] = {16, 32};
    PyArrayObject *c = dsv2py_array(o_c, "c", NPY_FLOAT32, 2, cs, 1);
    if (!c) return NULL;
    PyArrayObject *a = dsv2py_array(o_a, "a", NPY_UINT16, 2, as, 0);
    if (!a) return NULL;
    PyArrayObject *b = dsv2py_array(o_b, "b", NPY_UINT16, 2, as, 0);
    if (!b) return NULL;
    if (hw && !dsv2_amx_hw_supported()) return PyErr_Format(PyExc_ValueError, "hw: this CPU has no AMX tiles");
    if (dsv2py_no_overlap(c, "c", a, "a") < 0 || dsv2py_no_overlap(c, "c", b, "b") < 0) return NULL;
    int rc = dsv2_amx_tdpbf16ps_tile((float *)dsv2py_data(c), (const uint16_t *)dsv2py_data(a),
                                     (const uint16_t *)dsv2py_data(b), hw);
    if (rc) return dsv2py_raise(rc, "amx_tile_dot");
    Py_RETURN_NONE;
}

PyMethodDef dsv2py_core_methods[] = {
    {"rmsnorm", py_rmsnorm, METH_VARARGS,
     "rmsnorm(out, x, weight, eps, residual=None): out [T, d] = RMSNorm(x [T, d]) * weight [d];\n"
     "with residual [T, d]: x += residual first (x is written)"},
    {"linear", py_linear, METH_VARARGS, "linear(out, x, weight): out [T, N] = x [T, K] @ weight [N, K]^T"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n) -> n in force"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"get_isa", py_get_isa, METH_NOARGS, "get_isa() -> 'amx' | 'avx512' | 'avx2' | 'portable'"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name) -> level in force (capped by the CPU)"},
    {"set_avx512vbmi", py_set_avx512vbmi, METH_VARARGS,
     "set_avx512vbmi(allow) -> bool: allow / forbid the AVX-512 VBMI kernels (tests); whether they run now"},
    {"avx512vbmi", py_avx512vbmi, METH_NOARGS, "avx512vbmi() -> bool: the AVX-512 VBMI kernels run at this level"},
    {"prefetch_defaults", py_prefetch_defaults, METH_NOARGS,
     "prefetch_defaults() -> {'bf16', 'int8', 'int4', 'fp8': bytes}: each row-dot family's default on this CPU"},
    {"get_prefetch", py_get_prefetch, METH_NOARGS, "get_prefetch() -> override in bytes (0: off), None: kernel defaults"},
    {"set_prefetch", py_set_prefetch, METH_VARARGS, "set_prefetch(nbytes | None) -> override in force"},
    {"set_chunks_per_thread", py_set_chunks_per_thread, METH_VARARGS, "set_chunks_per_thread(n) -> setting in force"},
    {"get_chunks_per_thread", py_get_chunks_per_thread, METH_NOARGS, "chunks per thread of a region now"},
    {"amx_available", py_amx_available, METH_NOARGS,
     "amx_available() -> bool: the CPU has AMX-TILE + AMX-BF16 and the OS granted the tile state"},
    {"amx_min_rows", py_amx_min_rows, METH_NOARGS,
     "amx_min_rows() -> int: fewest activation rows of a product on the AMX tiles (bf16; int8 in groups of 32k)"},
    {"set_amx_emulation", py_set_amx_emulation, METH_VARARGS,
     "set_amx_emulation(on): (tests) run the AMX kernels on emulated tiles, on any AVX-512 CPU"},
    {"get_amx_emulation", py_get_amx_emulation, METH_NOARGS, "get_amx_emulation() -> bool"},
    {"amx_emu_stats", py_amx_emu_stats, METH_NOARGS,
     "amx_emu_stats() -> (products, faults): emulated TDPBF16PS run, and emulated tile instructions that "
     "would have faulted on the CPU (skipped)"},
    {"amx_split3", py_amx_split3, METH_VARARGS, "amx_split3(parts [3, n] uint16, x [n] f32): x = p0 + p1 + p2 (bf16)"},
    {"amx_tile_dot", py_amx_tile_dot, METH_VARARGS,
     "amx_tile_dot(c [16, 16] f32, a [16, 32] bf16, b [16, 32] bf16 pairs, hw): one TDPBF16PS, c += a . b"},
    {NULL, NULL, 0, NULL}};
