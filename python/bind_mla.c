/* bind_mla.c - bindings of the MLA kernels: RoPE/YaRN, latent KV compression,
 * MLA attention (absorbed / non-absorbed / auto) and the whole attention block.
 * Argument checks, conversion and GIL release only; see csrc/mla.h, csrc/rope.h. */
#include "bind_util.h"

#include <math.h>
#include <stdlib.h>

#include "../csrc/mla.h"
#include "../csrc/rope.h"
#include "../csrc/scratch.h"

/* ---------------- helpers ---------------- */

/* seq_ids / positions: int64 [T], 0 <= seq < B, 0 <= pos < S (checked before any kernel runs) */
static int check_tokens(PyObject *o_seq, PyObject *o_pos, int64_t T, int64_t B, int64_t S, PyArrayObject **seq,
                        PyArrayObject **pos) {
    int64_t shp[1] = {T};
    *seq = dsv2py_array(o_seq, "seq_ids", NPY_INT64, 1, shp, 0);
    if (!*seq) return -1;
    *pos = dsv2py_array(o_pos, "positions", NPY_INT64, 1, shp, 0);
    if (!*pos) return -1;
    const int64_t *s = (const int64_t *)dsv2py_data(*seq), *p = (const int64_t *)dsv2py_data(*pos);
    for (int64_t t = 0; t < T; t++) {
        if (s[t] < 0 || s[t] >= B) {
            PyErr_Format(PyExc_ValueError, "seq_ids: entry %lld is %lld, expected 0 <= seq_id < %lld (cache batch size)",
                         (long long)t, (long long)s[t], (long long)B);
            return -1;
        }
        if (p[t] < 0 || p[t] >= S) {
            PyErr_Format(PyExc_ValueError,
                         "positions: entry %lld is %lld, expected 0 <= position < %lld (cache max sequence length)",
                         (long long)t, (long long)p[t], (long long)S);
            return -1;
        }
    }
    return 0;
}

typedef struct {
    int64_t key, idx;
} keyidx;

static int cmp_keyidx(const void *a, const void *b) {
    const keyidx *x = (const keyidx *)a, *y = (const keyidx *)b;
    return x->key < y->key ? -1 : x->key > y->key ? 1 : (x->idx < y->idx ? -1 : x->idx > y->idx);
}

/* every (seq_id, position) pair written into the cache must be distinct */
static int check_unique(const int64_t *s, const int64_t *p, int64_t T, int64_t S) {
    if (T < 2) return 0;
    keyidx *k = (keyidx *)malloc((size_t)T * sizeof(keyidx));
    if (!k) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t t = 0; t < T; t++) {
        k[t].key = s[t] * S + p[t];
        k[t].idx = t;
    }
    qsort(k, (size_t)T, sizeof(keyidx), cmp_keyidx);
    for (int64_t i = 1; i < T; i++)
        if (k[i].key == k[i - 1].key) {
            int64_t a = k[i - 1].idx, b = k[i].idx;
            PyErr_Format(PyExc_ValueError,
                         "positions: tokens %lld and %lld both write cache row (seq_id %lld, position %lld)",
                         (long long)a, (long long)b, (long long)s[a], (long long)p[a]);
            free(k);
            return -1;
        }
    free(k);
    return 0;
}

static int check_inv_freq(PyObject *o, int64_t rope, PyArrayObject **out) {
    int64_t shp[1] = {rope / 2};
    *out = dsv2py_array(o, "inv_freq", NPY_FLOAT32, 1, shp, 0);
    if (!*out) return -1;
    const float *f = (const float *)dsv2py_data(*out);
    for (int64_t i = 0; i < rope / 2; i++)
        if (!isfinite(f[i])) {
            PyErr_Format(PyExc_ValueError, "inv_freq: entry %lld is not finite", (long long)i);
            return -1;
        }
    return 0;
}

static int check_pos_float(double x, const char *name) {
    if (!(x > 0.0) || !isfinite(x)) {
        char gb[32];
        PyErr_Format(PyExc_ValueError, "%s: expected a finite value > 0, got %s", name, dsv2py_g(gb, sizeof gb, x));
        return -1;
    }
    return 0;
}

static int check_eps(double eps) {
    if (!(eps >= 0.0) || eps > 1.0) {
        char gb[32];
        PyErr_Format(PyExc_ValueError, "eps: expected 0 <= eps <= 1, got %s", dsv2py_g(gb, sizeof gb, eps));
        return -1;
    }
    return 0;
}

static int check_mode(int mode) {
    if (mode != DSV2_MLA_AUTO && mode != DSV2_MLA_ABSORBED && mode != DSV2_MLA_DECOMPRESSED) {
        PyErr_Format(PyExc_ValueError, "mode: expected 0 (auto), 1 (absorbed) or 2 (decompressed), got %d", mode);
        return -1;
    }
    return 0;
}

static int check_int32(int64_t x, const char *what) {
    if (x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %lld is too large (must be < 2**31)", what, (long long)x);
        return -1;
    }
    return 0;
}

/* A latent cache argument: a float32 ndarray [B, S, W] (fp32 rows), a dsv2ext.BF16 of a uint16
 * ndarray [B, S, W] (bfloat16 rows; a bare uint16 array is refused), or a dsv2ext.ops.FP8Cache
 * (tag "fp8_kv": .data uint8 [B, S, row bytes], .kv_lora_rank, .qk_rope_head_dim), W = kv_lora + rope. */
typedef struct {
    PyArrayObject *arr; /* the array holding the rows */
    dsv2_mla_cache c;
    int64_t W;          /* numbers per row */
    int64_t kv_lora;    /* fixed by the format (FP8 rows), else -1 */
} cache_arg;

/* the .data array of a tagged cache, kept alive for the call */
static PyArrayObject *cache_data(PyObject *o, const char *tag, int typenum, int writable) {
    int64_t shp[3] = {DSV2PY_ANY, DSV2PY_ANY, DSV2PY_ANY};
    PyObject *data = PyObject_GetAttrString(o, "data");
    if (!data) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "cache: a cache tagged '%s' needs a .data array", tag);
        }
        return NULL;
    }
    int keep = dsv2py_keep(data);
    int only = Py_REFCNT(data) < 2;
    PyArrayObject *a = keep < 0 ? NULL : dsv2py_array(data, "cache.data", typenum, 3, shp, writable);
    Py_DECREF(data);
    if (a && keep == 0 && only) {
        PyErr_Format(PyExc_TypeError, "cache.data: must be an array stored on the cache object");
        return NULL;
    }
    return a;
}

/* an int attribute of the FP8 cache object, 0 < value < 2**31 */
static int cache_dim(PyObject *o, const char *attr, int64_t *out) {
    PyObject *v = PyObject_GetAttrString(o, attr);
    if (!v) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "cache: an FP8 cache needs an int .%s", attr);
        }
        return -1;
    }
    long long x = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) PyErr_Clear();
    if (x <= 0 || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "cache.%s: expected an int in [1, 2**31)", attr);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_cache(PyObject *o, int writable, cache_arg *out) {
    int64_t shp[3] = {DSV2PY_ANY, DSV2PY_ANY, DSV2PY_ANY};
    PyArrayObject *a = NULL;
    int dtype = DSV2_KV_F32;
    out->kv_lora = -1;
    if (o && o != Py_None && !PyArray_Check(o)) {
        PyObject *tag = PyObject_GetAttrString(o, "__dsv2_dtype__");
        if (!tag) PyErr_Clear();
        const char *t = tag && PyUnicode_Check(tag) ? PyUnicode_AsUTF8(tag) : NULL;
        if (t && !strcmp(t, "bf16")) {
            dtype = DSV2_KV_BF16;
            a = cache_data(o, t, NPY_UINT16, writable);
        } else if (t && !strcmp(t, "fp8_kv")) {
            int64_t L, rope;
            dtype = DSV2_KV_FP8;
            if (cache_dim(o, "kv_lora_rank", &L) == 0 && cache_dim(o, "qk_rope_head_dim", &rope) == 0) {
                a = cache_data(o, t, NPY_UINT8, writable);
                if (a && dsv2py_dim(a, 2) != dsv2_mla_row_bytes(DSV2_KV_FP8, L, rope)) {
                    PyErr_Format(PyExc_ValueError,
                                 "cache.data: FP8 rows of kv_lora_rank %lld and qk_rope_head_dim %lld take %lld bytes, "
                                 "got a last dimension of %lld", (long long)L, (long long)rope,
                                 (long long)dsv2_mla_row_bytes(DSV2_KV_FP8, L, rope), (long long)dsv2py_dim(a, 2));
                    a = NULL;
                }
                out->kv_lora = L;
                out->W = L + rope;
            }
        } else {
            PyErr_Format(PyExc_TypeError,
                         "cache: expected a float32 ndarray [B, S, kv_lora + rope], a dsv2ext.BF16 of a uint16 "
                         "array (bfloat16 rows) or a dsv2ext.ops.FP8Cache, got %s", Py_TYPE(o)->tp_name);
        }
        Py_XDECREF(tag);
        if (!a) return -1;
    } else {
        if (o && PyArray_Check(o) && PyArray_TYPE((PyArrayObject *)o) == NPY_UINT16) {
            PyErr_Format(PyExc_TypeError,
                         "cache: a bare uint16 array is not taken as bfloat16 rows; wrap it as dsv2ext.BF16(array)");
            return -1;
        }
        a = dsv2py_array(o, "cache", NPY_FLOAT32, 3, shp, writable);
        if (!a) return -1;
    }
    out->arr = a;
    if (dtype != DSV2_KV_FP8) out->W = dsv2py_dim(a, 2);
    out->c.data = dsv2py_data(a);
    out->c.B = dsv2py_dim(a, 0);
    out->c.S = dsv2py_dim(a, 1);
    out->c.dtype = dtype;
    if (check_int32(out->c.S * out->W, "cache: max sequence length x row width") < 0) return -1;
    return 0;
}

/* ---------------- rope ---------------- */

/* rope_inv_freq(out [dim/2] f32, yarn, theta, factor, original_max_position_embeddings, beta_fast,
 *               beta_slow, mscale, mscale_all_dim, attention_factor (None|float), truncate) -> float */
static PyObject *py_rope_inv_freq(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_af;
    int yarn, truncate;
    double theta, factor, orig, bf, bs, ms, msa;
    if (!PyArg_ParseTuple(args, "OpdddddddOp:rope_inv_freq", &o_out, &yarn, &theta, &factor, &orig, &bf, &bs, &ms,
                          &msa, &o_af, &truncate))
        return NULL;
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 1, NULL, 1);
    if (!out) return NULL;
    int64_t half = dsv2py_dim(out, 0);
    if (half > 512) return PyErr_Format(PyExc_ValueError, "dim: expected at most 1024 rotary channels, got %lld", (long long)(2 * half));
    if (check_pos_float(theta, "rope_theta") < 0) return NULL;
    dsv2_rope_cfg cfg = {0};
    cfg.yarn = yarn;
    cfg.theta = theta;
    if (yarn) {
        if (check_pos_float(factor, "factor") < 0 || check_pos_float(orig, "original_max_position_embeddings") < 0 ||
            check_pos_float(bf, "beta_fast") < 0 || check_pos_float(bs, "beta_slow") < 0)
            return NULL;
        if (!isfinite(ms) || !isfinite(msa)) return PyErr_Format(PyExc_ValueError, "mscale / mscale_all_dim: expected finite values");
        cfg.factor = factor;
        cfg.original_max_pos = orig;
        cfg.beta_fast = bf;
        cfg.beta_slow = bs;
        cfg.mscale = ms;
        cfg.mscale_all_dim = msa;
        cfg.truncate = truncate;
        if (o_af != Py_None) {
            double af = PyFloat_AsDouble(o_af);
            if (af == -1.0 && PyErr_Occurred()) return NULL;
            if (check_pos_float(af, "attention_factor") < 0) return NULL;
            cfg.has_attention_factor = 1;
            cfg.attention_factor = af;
        }
    }
    float af_out = 1.0f;
    int rc = dsv2_rope_inv_freq((float *)dsv2py_data(out), &af_out, 2 * half, &cfg);
    if (rc) return dsv2py_raise(rc, "rope_inv_freq");
    return PyFloat_FromDouble((double)af_out);
}

/* rope_apply(x f32 [T, heads, dim] strided view (channels contiguous), positions [T] int64,
 *            inv_freq [dim/2] f32, attention_factor, interleaved) -> None (in place) */
static PyObject *py_rope_apply(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_pos, *o_f;
    double af;
    int inter;
    if (!PyArg_ParseTuple(args, "OOOdp:rope_apply", &o_x, &o_pos, &o_f, &af, &inter)) return NULL;
    if (!PyArray_Check(o_x))
        return PyErr_Format(PyExc_TypeError, "x: expected a numpy.ndarray of dtype float32, got %s", Py_TYPE(o_x)->tp_name);
    PyArrayObject *x = (PyArrayObject *)o_x;
    if (PyArray_TYPE(x) != NPY_FLOAT32 || !PyArray_ISNBO(PyArray_DESCR(x)->byteorder))
        return PyErr_Format(PyExc_TypeError, "x: expected dtype float32");
    if (PyArray_NDIM(x) != 3)
        return PyErr_Format(PyExc_ValueError, "x: expected 3 dimensions [T, heads, dim], got %d", PyArray_NDIM(x));
    if (!PyArray_ISWRITEABLE(x)) return PyErr_Format(PyExc_ValueError, "x: the array is read-only (rotated in place)");
    if (!PyArray_ISALIGNED(x)) return PyErr_Format(PyExc_ValueError, "x: the array's data is not aligned to its dtype");
    const int64_t T = dsv2py_dim(x, 0), nh = dsv2py_dim(x, 1), dim = dsv2py_dim(x, 2);
    if (T == 0 || nh == 0 || dim == 0) return PyErr_Format(PyExc_ValueError, "x: empty arrays are not accepted");
    if (dim & 1) return PyErr_Format(PyExc_ValueError, "x: the last dimension (rotary channels) must be even, got %lld", (long long)dim);
    if (dim > 1024) return PyErr_Format(PyExc_ValueError, "x: at most 1024 rotary channels, got %lld", (long long)dim);
    npy_intp *st = PyArray_STRIDES(x);
    if (st[2] != 4) return PyErr_Format(PyExc_ValueError, "x: the channels (last dimension) must be contiguous");
    if (st[0] % 4 || st[1] % 4 || (T > 1 && st[0] < 0) || (nh > 1 && st[1] < 0))
        return PyErr_Format(PyExc_ValueError, "x: token and head strides must be non-negative multiples of 4 bytes");
    /* rows must not overlap each other (an in-place rotation would be ill-defined) */
    const int64_t ldt = st[0] / 4, ldh = st[1] / 4;
    if ((nh > 1 && ldh < dim) || (T > 1 && ldt < (nh - 1) * ldh + dim))
        return PyErr_Format(PyExc_ValueError, "x: the [T, heads, dim] view has overlapping rows");
    int64_t pshape[1] = {T};
    PyArrayObject *pos = dsv2py_array(o_pos, "positions", NPY_INT64, 1, pshape, 0);
    if (!pos) return NULL;
    const int64_t *p = (const int64_t *)dsv2py_data(pos);
    for (int64_t t = 0; t < T; t++)
        if (p[t] < 0) return PyErr_Format(PyExc_ValueError, "positions: entry %lld is %lld, expected >= 0", (long long)t, (long long)p[t]);
    PyArrayObject *f;
    if (check_inv_freq(o_f, dim, &f) < 0) return NULL;
    if (check_pos_float(af, "attention_factor") < 0) return NULL;
    if (dsv2py_no_overlap(x, "x", pos, "positions") < 0 || dsv2py_no_overlap(x, "x", f, "inv_freq") < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_rope_apply((float *)dsv2py_data(x), ldt, ldh, T, nh, dim, p, (const float *)dsv2py_data(f), (float)af, inter);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "rope_apply");
    Py_RETURN_NONE;
}

/* ---------------- latent compression ---------------- */

/* mla_compress_kv(out [T, W] f32, cache [B, S, W] f32, hidden [T, d] f32, seq_ids [T], positions [T],
 *                 kv_a_proj [W, d], kv_a_norm [kv_lora], inv_freq [rope/2], kv_lora, eps,
 *                 attention_factor, interleaved) -> None */
static PyObject *py_mla_compress_kv(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_cache, *o_h, *o_seq, *o_pos, *o_wa, *o_wn, *o_f;
    long long kv_lora;
    double eps, af;
    int inter;
    if (!PyArg_ParseTuple(args, "OOOOOOOOLddp:mla_compress_kv", &o_out, &o_cache, &o_h, &o_seq, &o_pos, &o_wa, &o_wn,
                          &o_f, &kv_lora, &eps, &af, &inter))
        return NULL;
    PyArrayObject *h = dsv2py_array(o_h, "hidden", NPY_FLOAT32, 2, NULL, 0);
    if (!h) return NULL;
    const int64_t T = dsv2py_dim(h, 0), d = dsv2py_dim(h, 1);
    cache_arg ca;
    if (parse_cache(o_cache, 1, &ca) < 0) return NULL;
    PyArrayObject *cache = ca.arr;
    const int64_t B = ca.c.B, S = ca.c.S, W = ca.W;
    if (ca.kv_lora >= 0 && ca.kv_lora != kv_lora)
        return PyErr_Format(PyExc_ValueError, "kv_lora_rank: %lld differs from the FP8 cache's kv_lora_rank %lld", kv_lora,
                            (long long)ca.kv_lora);
    if (kv_lora <= 0 || kv_lora >= W)
        return PyErr_Format(PyExc_ValueError, "kv_lora_rank: expected 0 < kv_lora_rank < %lld (cache row width), got %lld",
                            (long long)W, kv_lora);
    const int64_t rope = W - kv_lora;
    if (rope & 1)
        return PyErr_Format(PyExc_ValueError, "cache: row width %lld - kv_lora_rank %lld leaves an odd number of rope channels",
                            (long long)W, kv_lora);
    int64_t oshape[2] = {T, W}, wshape[2] = {W, d}, nshape[1] = {kv_lora};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    dsv2py_tensor wa, wn;
    if (dsv2py_weight(o_wa, "kv_a_proj_with_mqa", 2, wshape, &wa) < 0) return NULL;
    if (dsv2py_weight(o_wn, "kv_a_layernorm", 1, nshape, &wn) < 0) return NULL;
    if (wn.dtype == DSV2_I8 || wn.dtype == DSV2_I4)
        return PyErr_Format(PyExc_TypeError, "kv_a_layernorm: quantized (int8 / int4) norm weights are not supported");
    PyArrayObject *seq, *pos, *f;
    if (check_tokens(o_seq, o_pos, T, B, S, &seq, &pos) < 0) return NULL;
    if (check_unique((const int64_t *)dsv2py_data(seq), (const int64_t *)dsv2py_data(pos), T, S) < 0) return NULL;
    if (check_inv_freq(o_f, rope, &f) < 0) return NULL;
    if (check_eps(eps) < 0 || check_pos_float(af, "attention_factor") < 0) return NULL;
    if (check_int32(T, "hidden: number of tokens") < 0 || check_int32(d, "hidden: width") < 0) return NULL;
    if (dsv2py_no_overlap(out, "out", h, "hidden") < 0 || dsv2py_no_overlap(out, "out", cache, "cache") < 0 ||
        dsv2py_no_overlap(cache, "cache", h, "hidden") < 0 || dsv2py_no_overlap(cache, "cache", seq, "seq_ids") < 0 ||
        dsv2py_no_overlap(cache, "cache", pos, "positions") < 0 || dsv2py_no_overlap(cache, "cache", f, "inv_freq") < 0 ||
        dsv2py_no_overlap(out, "out", seq, "seq_ids") < 0 || dsv2py_no_overlap(out, "out", pos, "positions") < 0 ||
        dsv2py_no_overlap(out, "out", f, "inv_freq") < 0)
        return NULL;
    dsv2_mat ma = dsv2py_mat(&wa), mn = dsv2py_mat(&wn);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_mla_compress_kv(&ca.c, (float *)dsv2py_data(out), (const float *)dsv2py_data(h), T, d,
                              (const int64_t *)dsv2py_data(seq), (const int64_t *)dsv2py_data(pos), &ma, &mn, kv_lora,
                              rope, (float)eps, (const float *)dsv2py_data(f), (float)af, inter);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "mla_compress_kv");
    Py_RETURN_NONE;
}

/* ---------------- attention ---------------- */

/* mla_attention(out [T, H, v] f32, q [T, H, nope + rope] f32, cache [B, S, kv_lora + rope] f32,
 *               seq_ids [T], positions [T], kv_b_proj [H*(nope+v), kv_lora], scale, mode) -> None
 * Head dims follow from the shapes: kv_lora = kv_b_proj.shape[1], rope = cache width - kv_lora,
 * nope = q.shape[2] - rope, v = kv_b_proj.shape[0] / H - nope. */
static PyObject *py_mla_attention(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_q, *o_cache, *o_seq, *o_pos, *o_kvb;
    double scale;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOOOOdi:mla_attention", &o_out, &o_q, &o_cache, &o_seq, &o_pos, &o_kvb, &scale, &mode))
        return NULL;
    if (check_mode(mode) < 0) return NULL;
    PyArrayObject *q = dsv2py_array(o_q, "q", NPY_FLOAT32, 3, NULL, 0);
    if (!q) return NULL;
    const int64_t T = dsv2py_dim(q, 0), H = dsv2py_dim(q, 1), dqk = dsv2py_dim(q, 2);
    cache_arg ca;
    if (parse_cache(o_cache, 0, &ca) < 0) return NULL;
    PyArrayObject *cache = ca.arr;
    const int64_t B = ca.c.B, S = ca.c.S, W = ca.W;
    int64_t kshape[2] = {DSV2PY_ANY, DSV2PY_ANY};
    dsv2py_tensor kvb;
    if (dsv2py_weight(o_kvb, "kv_b_proj", 2, kshape, &kvb) < 0) return NULL;
    const int64_t L = kvb.shape[1], rope = W - L, nope = dqk - rope;
    if (ca.kv_lora >= 0 && ca.kv_lora != L)
        return PyErr_Format(PyExc_ValueError, "kv_b_proj: %lld columns (kv_lora_rank) differ from the FP8 cache's "
                            "kv_lora_rank %lld", (long long)L, (long long)ca.kv_lora);
    if (rope <= 0 || (rope & 1))
        return PyErr_Format(PyExc_ValueError,
                            "cache: row width %lld must be kv_lora_rank (%lld, from kv_b_proj.shape[1]) + an even number of rope channels",
                            (long long)W, (long long)L);
    if (nope <= 0)
        return PyErr_Format(PyExc_ValueError, "q: head width %lld must exceed the %lld rope channels", (long long)dqk, (long long)rope);
    if (kvb.shape[0] % H || kvb.shape[0] / H <= nope)
        return PyErr_Format(PyExc_ValueError, "kv_b_proj: expected %lld * (%lld + v_head_dim) rows, got %lld",
                            (long long)H, (long long)nope, (long long)kvb.shape[0]);
    const int64_t v = kvb.shape[0] / H - nope;
    int64_t oshape[3] = {T, H, v};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 3, oshape, 1);
    if (!out) return NULL;
    PyArrayObject *seq, *pos;
    if (check_tokens(o_seq, o_pos, T, B, S, &seq, &pos) < 0) return NULL;
    if (check_pos_float(scale, "softmax_scale") < 0) return NULL;
    if (check_int32(H * dqk, "q: heads x head width") < 0 || check_int32(kvb.shape[0], "kv_b_proj rows") < 0 ||
        check_int32(T, "q: number of tokens") < 0)
        return NULL;
    if (dsv2py_no_overlap(out, "out", q, "q") < 0 || dsv2py_no_overlap(out, "out", cache, "cache") < 0 ||
        dsv2py_no_overlap(out, "out", seq, "seq_ids") < 0 || dsv2py_no_overlap(out, "out", pos, "positions") < 0)
        return NULL;
    dsv2_mat mk = dsv2py_mat(&kvb);
    dsv2_mla_dims dm = {H, nope, rope, v, L};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_mla_attention((float *)dsv2py_data(out), (const float *)dsv2py_data(q), &ca.c,
                            (const int64_t *)dsv2py_data(seq), (const int64_t *)dsv2py_data(pos), T, &mk, &dm,
                            (float)scale, mode);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "mla_attention");
    Py_RETURN_NONE;
}

/* mla_flops(absorbed, n_new, n_ctx, sum_len, H, nope, rope, v, kv_lora) -> float */
static PyObject *py_mla_flops(PyObject *self, PyObject *args) {
    int absorbed;
    long long n_new, n_ctx, sum_len, H, nope, rope, v, L;
    if (!PyArg_ParseTuple(args, "pLLLLLLLL:mla_flops", &absorbed, &n_new, &n_ctx, &sum_len, &H, &nope, &rope, &v, &L))
        return NULL;
    if (n_new < 0 || n_ctx < 0 || sum_len < 0 || H <= 0 || nope <= 0 || rope <= 0 || v <= 0 || L <= 0)
        return PyErr_Format(PyExc_ValueError, "mla_flops: sizes must be positive (token counts non-negative)");
    dsv2_mla_dims dm = {H, nope, rope, v, L};
    return PyFloat_FromDouble(dsv2_mla_flops(absorbed, n_new, n_ctx, sum_len, &dm));
}

/* ---------------- the whole block ---------------- */

/* mla_attention_block(out [T, d], hidden [T, d], cache [B, S, kv_lora+rope], seq_ids [T], positions [T],
 *     inv_freq [rope/2], q_proj|None, q_a_proj|None, q_a_layernorm|None, q_b_proj|None,
 *     kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj,
 *     n_heads, nope, rope, v, kv_lora, q_lora (0 = none), eps, softmax_scale, attention_factor,
 *     interleaved, mode) -> None */
static PyObject *py_mla_attention_block(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_h, *o_cache, *o_seq, *o_pos, *o_f, *o_q, *o_qa, *o_qan, *o_qb, *o_kva, *o_kvan, *o_kvb, *o_o;
    long long H, nope, rope, v, L, ql;
    double eps, scale, af;
    int inter, mode;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOLLLLLLdddpi:mla_attention_block", &o_out, &o_h, &o_cache, &o_seq, &o_pos,
                          &o_f, &o_q, &o_qa, &o_qan, &o_qb, &o_kva, &o_kvan, &o_kvb, &o_o, &H, &nope, &rope, &v, &L, &ql,
                          &eps, &scale, &af, &inter, &mode))
        return NULL;
    if (H <= 0 || nope <= 0 || rope <= 0 || v <= 0 || L <= 0 || ql < 0)
        return PyErr_Format(PyExc_ValueError,
                            "config: num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank must be > 0 "
                            "and q_lora_rank >= 0");
    if (rope & 1) return PyErr_Format(PyExc_ValueError, "config: qk_rope_head_dim must be even, got %lld", rope);
    /* each size < 2**31 first, so that the products below cannot overflow int64 */
    if (check_int32(H, "config: num_heads") < 0 || check_int32(nope, "config: qk_nope_head_dim") < 0 ||
        check_int32(rope, "config: qk_rope_head_dim") < 0 || check_int32(v, "config: v_head_dim") < 0 ||
        check_int32(L, "config: kv_lora_rank") < 0 || check_int32(ql, "config: q_lora_rank") < 0)
        return NULL;
    if (check_mode(mode) < 0) return NULL;
    if (check_int32(H * (nope + rope), "config: num_heads x qk_head_dim") < 0 ||
        check_int32(H * (nope + v), "config: num_heads x (qk_nope_head_dim + v_head_dim)") < 0)
        return NULL;
    PyArrayObject *h = dsv2py_array(o_h, "hidden", NPY_FLOAT32, 2, NULL, 0);
    if (!h) return NULL;
    const int64_t T = dsv2py_dim(h, 0), d = dsv2py_dim(h, 1);
    int64_t oshape[2] = {T, d};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    cache_arg ca;
    if (parse_cache(o_cache, 1, &ca) < 0) return NULL;
    PyArrayObject *cache = ca.arr;
    const int64_t B = ca.c.B, S = ca.c.S;
    if (ca.W != L + rope || (ca.kv_lora >= 0 && ca.kv_lora != L))
        return PyErr_Format(PyExc_ValueError, "cache: expected shape [?, ?, %lld] (rows of kv_lora_rank + qk_rope_head_dim numbers), got rows of %lld",
                            (long long)(L + rope), (long long)ca.W);
    PyArrayObject *seq, *pos, *f;
    if (check_tokens(o_seq, o_pos, T, B, S, &seq, &pos) < 0) return NULL;
    if (check_unique((const int64_t *)dsv2py_data(seq), (const int64_t *)dsv2py_data(pos), T, S) < 0) return NULL;
    if (check_inv_freq(o_f, rope, &f) < 0) return NULL;
    if (check_eps(eps) < 0 || check_pos_float(scale, "softmax_scale") < 0 || check_pos_float(af, "attention_factor") < 0)
        return NULL;
    if (check_int32(T, "hidden: number of tokens") < 0) return NULL;

    dsv2_mla_weights w;
    memset(&w, 0, sizeof w);
    dsv2py_tensor t;
    const int64_t dqk = nope + rope;
    if (ql == 0) {
        int64_t s[2] = {H * dqk, d};
        if (dsv2py_weight(o_q, "q_proj", 2, s, &t) < 0) return NULL;
        w.q_proj = dsv2py_mat(&t);
        if (o_qa != Py_None || o_qan != Py_None || o_qb != Py_None)
            return PyErr_Format(PyExc_ValueError, "q_a_proj: must be None when q_lora_rank is 0 (q_proj is used)");
    } else {
        if (o_q != Py_None) return PyErr_Format(PyExc_ValueError, "q_proj: must be None when q_lora_rank > 0");
        int64_t s1[2] = {ql, d}, s2[1] = {ql}, s3[2] = {H * dqk, ql};
        if (dsv2py_weight(o_qa, "q_a_proj", 2, s1, &t) < 0) return NULL;
        w.q_a_proj = dsv2py_mat(&t);
        if (dsv2py_weight(o_qan, "q_a_layernorm", 1, s2, &t) < 0) return NULL;
        if (t.dtype == DSV2_I8 || t.dtype == DSV2_I4)
            return PyErr_Format(PyExc_TypeError, "q_a_layernorm: quantized (int8 / int4) norm weights are not supported");
        w.q_a_norm = dsv2py_mat(&t);
        if (dsv2py_weight(o_qb, "q_b_proj", 2, s3, &t) < 0) return NULL;
        w.q_b_proj = dsv2py_mat(&t);
    }
    {
        int64_t s1[2] = {L + rope, d}, s2[1] = {L}, s3[2] = {H * (nope + v), L}, s4[2] = {d, H * v};
        if (dsv2py_weight(o_kva, "kv_a_proj_with_mqa", 2, s1, &t) < 0) return NULL;
        w.kv_a_proj = dsv2py_mat(&t);
        if (dsv2py_weight(o_kvan, "kv_a_layernorm", 1, s2, &t) < 0) return NULL;
        if (t.dtype == DSV2_I8 || t.dtype == DSV2_I4)
            return PyErr_Format(PyExc_TypeError, "kv_a_layernorm: quantized (int8 / int4) norm weights are not supported");
        w.kv_a_norm = dsv2py_mat(&t);
        if (dsv2py_weight(o_kvb, "kv_b_proj", 2, s3, &t) < 0) return NULL;
        w.kv_b_proj = dsv2py_mat(&t);
        if (dsv2py_weight(o_o, "o_proj", 2, s4, &t) < 0) return NULL;
        w.o_proj = dsv2py_mat(&t);
    }
    if (dsv2py_no_overlap(out, "out", h, "hidden") < 0 || dsv2py_no_overlap(out, "out", cache, "cache") < 0 ||
        dsv2py_no_overlap(cache, "cache", h, "hidden") < 0 || dsv2py_no_overlap(cache, "cache", seq, "seq_ids") < 0 ||
        dsv2py_no_overlap(cache, "cache", pos, "positions") < 0 || dsv2py_no_overlap(cache, "cache", f, "inv_freq") < 0 ||
        dsv2py_no_overlap(out, "out", seq, "seq_ids") < 0 || dsv2py_no_overlap(out, "out", pos, "positions") < 0 ||
        dsv2py_no_overlap(out, "out", f, "inv_freq") < 0)
        return NULL;
    dsv2_mla_cfg cfg;
    cfg.dims.n_heads = H;
    cfg.dims.nope = nope;
    cfg.dims.rope = rope;
    cfg.dims.v = v;
    cfg.dims.kv_lora = L;
    cfg.q_lora = ql;
    cfg.eps = (float)eps;
    cfg.scale = (float)scale;
    cfg.inv_freq = (const float *)dsv2py_data(f);
    cfg.attention_factor = (float)af;
    cfg.interleaved = inter;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_mla_block((float *)dsv2py_data(out), (const float *)dsv2py_data(h), T, d, &ca.c,
                        (const int64_t *)dsv2py_data(seq), (const int64_t *)dsv2py_data(pos), &w, &cfg, mode);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "mla_attention_block");
    Py_RETURN_NONE;
}

static PyObject *py_scratch_trim(PyObject *self, PyObject *noargs) {
    Py_BEGIN_ALLOW_THREADS
    dsv2_scratch_trim();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef dsv2py_mla_methods[] = {
    {"rope_inv_freq", py_rope_inv_freq, METH_VARARGS,
     "rope_inv_freq(out [dim/2], yarn, theta, factor, orig_max_pos, beta_fast, beta_slow, mscale, mscale_all_dim, "
     "attention_factor|None, truncate) -> attention_factor"},
    {"rope_apply", py_rope_apply, METH_VARARGS,
     "rope_apply(x [T, heads, dim] strided view, positions [T] int64, inv_freq [dim/2], attention_factor, interleaved)"},
    {"mla_compress_kv", py_mla_compress_kv, METH_VARARGS,
     "mla_compress_kv(out [T, W], cache [B, S, W], hidden [T, d], seq_ids, positions, kv_a_proj, kv_a_norm, inv_freq, "
     "kv_lora, eps, attention_factor, interleaved)"},
    {"mla_attention", py_mla_attention, METH_VARARGS,
     "mla_attention(out [T, H, v], q [T, H, dqk], cache [B, S, W], seq_ids, positions, kv_b_proj, scale, mode)"},
    {"mla_flops", py_mla_flops, METH_VARARGS, "mla_flops(absorbed, n_new, n_ctx, sum_len, H, nope, rope, v, kv_lora)"},
    {"mla_attention_block", py_mla_attention_block, METH_VARARGS,
     "mla_attention_block(out, hidden, cache, seq_ids, positions, inv_freq, q_proj, q_a_proj, q_a_layernorm, q_b_proj, "
     "kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, H, nope, rope, v, kv_lora, q_lora, eps, scale, "
     "attention_factor, interleaved, mode)"},
    {"scratch_trim", py_scratch_trim, METH_NOARGS, "scratch_trim(): release the cached work buffers of the kernels"},
    {NULL, NULL, 0, NULL}};
