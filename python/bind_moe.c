/* bind_moe.c - bindings of the DeepSeekMoE kernels: router, dispatch /
 * combine, SwiGLU MLP, experts and the whole MoE block. */
#include "bind_util.h"

#include <math.h>
#include <stdio.h>

#include "../csrc/expert_mlp.h"
#include "../csrc/moe_block.h"
#include "../csrc/moe_dispatch.h"
#include "../csrc/moe_router.h"

#define MAXDIM_I32 ((int64_t)INT32_MAX)

/* ---------------- helpers ---------------- */

/* bytes spanned by a parsed weight tensor */
static int tensor_overlaps(PyArrayObject *a, const dsv2py_tensor *t) {
    if (!a) return 0;
    size_t n = dsv2py_tensor_bytes(t);
    const char *a0 = (const char *)PyArray_DATA(a), *a1 = a0 + PyArray_NBYTES(a);
    const char *b0 = (const char *)t->data, *b1 = b0 + n;
    return a0 < b1 && b0 < a1;
}

static int check_out_vs_weight(PyArrayObject *out, const char *oname, const dsv2py_tensor *t, const char *wname) {
    if (tensor_overlaps(out, t)) {
        PyErr_Format(PyExc_ValueError, "%s and %s must not share memory", oname, wname);
        return -1;
    }
    return 0;
}

static int parse_cfg(int64_t E, long long top_k, long long n_group, long long topk_group, const char *method,
                     const char *scoring, int norm, double scale, int has_bias, dsv2_moe_cfg *cfg) {
    cfg->n_experts = E;
    cfg->top_k = top_k;
    cfg->n_group = n_group;
    cfg->topk_group = topk_group;
    cfg->norm_topk_prob = norm ? 1 : 0;
    cfg->routed_scaling_factor = (float)scale;
    if (!strcmp(method, "greedy")) cfg->topk_method = DSV2_TOPK_GREEDY;
    else if (!strcmp(method, "group_limited_greedy")) cfg->topk_method = DSV2_TOPK_GROUP_LIMITED;
    else if (!strcmp(method, "noaux_tc")) cfg->topk_method = DSV2_TOPK_NOAUX_TC;
    else {
        PyErr_Format(PyExc_ValueError,
                     "topk_method: expected 'greedy', 'group_limited_greedy' or 'noaux_tc', got '%s'", method);
        return -1;
    }
    if (!strcmp(scoring, "softmax")) cfg->scoring = DSV2_SCORE_SOFTMAX;
    else if (!strcmp(scoring, "sigmoid")) cfg->scoring = DSV2_SCORE_SIGMOID;
    else {
        PyErr_Format(PyExc_ValueError, "scoring_func: expected 'softmax' or 'sigmoid', got '%s'", scoring);
        return -1;
    }
    if (top_k < 1 || top_k > E) {
        PyErr_Format(PyExc_ValueError,
                     "num_experts_per_tok: expected 1 <= top_k <= n_routed_experts (%lld), got %lld", (long long)E,
                     top_k);
        return -1;
    }
    if (!isfinite(scale) || fabs(scale) > 3.0e38) {
        char gb[32];
        PyErr_Format(PyExc_ValueError, "routed_scaling_factor: expected a finite number (|x| <= 3e38), got %s",
                     dsv2py_g(gb, sizeof gb, scale));
        return -1;
    }
    if (has_bias && cfg->topk_method != DSV2_TOPK_NOAUX_TC) {
        PyErr_Format(PyExc_ValueError,
                     "correction_bias: only used by topk_method 'noaux_tc' (got topk_method '%s'); pass None", method);
        return -1;
    }
    if (cfg->topk_method != DSV2_TOPK_GREEDY) {
        if (n_group < 1 || E % n_group) {
            PyErr_Format(PyExc_ValueError,
                         "n_group: the number of routed experts (%lld) must be divisible by n_group (%lld >= 1)",
                         (long long)E, n_group);
            return -1;
        }
        if (topk_group < 1 || topk_group > n_group) {
            PyErr_Format(PyExc_ValueError, "topk_group: expected 1 <= topk_group <= n_group (%lld), got %lld",
                         n_group, topk_group);
            return -1;
        }
        long long per = (long long)(E / n_group);
        if (top_k > topk_group * per) {
            PyErr_Format(PyExc_ValueError,
                         "num_experts_per_tok: top_k (%lld) is larger than the number of experts in the kept "
                         "groups (topk_group %lld x %lld experts per group = %lld)",
                         top_k, topk_group, per, topk_group * per);
            return -1;
        }
        if (cfg->topk_method == DSV2_TOPK_NOAUX_TC && per < 2) {
            PyErr_Format(PyExc_ValueError,
                         "n_group: topk_method 'noaux_tc' scores a group by its 2 best experts, so each group "
                         "needs >= 2 experts (n_routed_experts %lld / n_group %lld = %lld)",
                         (long long)E, n_group, per);
            return -1;
        }
    }
    return 0;
}

/* correction bias [E] float32, finite, or None -> pointer or NULL */
static int parse_bias(PyObject *o, int64_t E, PyArrayObject **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    int64_t shape[1] = {E};
    PyArrayObject *b = dsv2py_array(o, "correction_bias", NPY_FLOAT32, 1, shape, 0);
    if (!b) return -1;
    const float *p = (const float *)PyArray_DATA(b);
    for (int64_t i = 0; i < E; i++)
        if (!isfinite(p[i])) {
            char gb[32];
            PyErr_Format(PyExc_ValueError, "correction_bias: element %lld is not finite (%s)", (long long)i,
                         dsv2py_g(gb, sizeof gb, (double)p[i]));
            return -1;
        }
    *out = b;
    return 0;
}

static int check_router_weight(PyObject *o, int64_t d, dsv2py_tensor *t) {
    int64_t shape[2] = {DSV2PY_ANY, d};
    if (dsv2py_weight(o, "router_weight", 2, shape, t) < 0) return -1;
    if (t->dtype != DSV2_F32 && t->dtype != DSV2_BF16) {
        PyErr_Format(PyExc_TypeError, "router_weight: expected float32 or BF16 (the router runs in fp32)");
        return -1;
    }
    if (t->shape[0] > MAXDIM_I32 || t->shape[1] > MAXDIM_I32) {
        PyErr_Format(PyExc_ValueError, "router_weight: dimensions must be < 2**31");
        return -1;
    }
    return 0;
}

static PyObject *raise_route(int rc, const char *func) {
    if (rc == DSV2_ERR_NONFINITE)
        return PyErr_Format(dsv2py_NonFiniteError ? dsv2py_NonFiniteError : PyExc_ValueError,
                            "%s: router logits contain NaN or Inf (check x and router_weight); "
                            "routing is undefined for non-finite logits",
                            func);
    return dsv2py_raise(rc, func);
}

/* One MLP given as a sequence (gate, up, down); d may be DSV2PY_ANY, *I in/out
 * (DSV2PY_ANY on input = take it from gate).  `keep` receives a tuple that
 * holds the three weight objects alive. */
static const char *const mlp_names[3] = {"gate_proj", "up_proj", "down_proj"};

static int parse_mlp(PyObject *o, const char *name, const char *const *wnames, int64_t d, int64_t *NI, dsv2_mlp *m,
                     PyObject *keep) {
    char buf[160];
#define WNAME(q) (name ? (snprintf(buf, sizeof buf, "%s.%s", name, wnames[q]), buf) : wnames[q])
    if (!PyTuple_Check(o) && !PyList_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a (gate_proj, up_proj, down_proj) tuple, got %s",
                     name ? name : "mlp", Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *tup = PySequence_Tuple(o);
    if (!tup) return -1;
    if (PyList_Append(keep, tup) < 0) {
        Py_DECREF(tup);
        return -1;
    }
    Py_DECREF(tup); /* `keep` holds it */
    if (PyTuple_GET_SIZE(tup) != 3) {
        PyErr_Format(PyExc_ValueError, "%s: expected 3 weights (gate_proj, up_proj, down_proj), got %zd",
                     name ? name : "mlp", PyTuple_GET_SIZE(tup));
        return -1;
    }
    dsv2py_tensor g, u, dn;
    int64_t gshape[2] = {*NI, d};
    if (dsv2py_weight(PyTuple_GET_ITEM(tup, 0), WNAME(0), 2, gshape, &g) < 0) return -1;
    int64_t shape[2] = {g.shape[0], g.shape[1]};
    if (dsv2py_weight(PyTuple_GET_ITEM(tup, 1), WNAME(1), 2, shape, &u) < 0) return -1;
    int64_t dshape[2] = {g.shape[1], g.shape[0]};
    if (dsv2py_weight(PyTuple_GET_ITEM(tup, 2), WNAME(2), 2, dshape, &dn) < 0) return -1;
    if (g.shape[0] > MAXDIM_I32 || g.shape[1] > MAXDIM_I32) {
        PyErr_Format(PyExc_ValueError, "%s: dimensions must be < 2**31", name ? name : "mlp");
        return -1;
    }
    m->gate = dsv2py_mat(&g);
    m->up = dsv2py_mat(&u);
    m->down = dsv2py_mat(&dn);
    *NI = g.shape[0];
    return 0;
#undef WNAME
}

/* Routed experts: either `experts` (a sequence of E (gate, up, down)) or the
 * stacked pair gate_up_proj [E, 2I, d] / down_proj [E, d, I].
 * Returns a PyMem array of E dsv2_mlp (free with PyMem_Free) or NULL. */
static dsv2_mlp *parse_experts(PyObject *experts, PyObject *gate_up, PyObject *down, int64_t E, int64_t d,
                               int64_t *I_out, PyObject *keep, PyArrayObject *out) {
    dsv2_mlp *ms = NULL;
    if (experts != Py_None) {
        if (gate_up != Py_None || down != Py_None) {
            PyErr_SetString(PyExc_ValueError, "experts: give either a list of per-expert weights or the stacked "
                                              "gate_up_proj/down_proj, not both");
            return NULL;
        }
        if (!PyTuple_Check(experts) && !PyList_Check(experts)) {
            PyErr_Format(PyExc_TypeError, "experts: expected a list of (gate_proj, up_proj, down_proj), got %s",
                         Py_TYPE(experts)->tp_name);
            return NULL;
        }
        PyObject *all = PySequence_Tuple(experts);
        if (!all) return NULL;
        int err = PyList_Append(keep, all);
        Py_DECREF(all);
        if (err < 0) return NULL;
        if (PyTuple_GET_SIZE(all) != E) {
            PyErr_Format(PyExc_ValueError, "experts: expected %lld experts (router_weight has %lld rows), got %zd",
                         (long long)E, (long long)E, PyTuple_GET_SIZE(all));
            return NULL;
        }
        ms = (dsv2_mlp *)PyMem_Calloc((size_t)E, sizeof(dsv2_mlp));
        if (!ms) {
            PyErr_NoMemory();
            return NULL;
        }
        int64_t NI = DSV2PY_ANY;
        char name[64];
        for (int64_t e = 0; e < E; e++) {
            snprintf(name, sizeof name, "experts[%lld]", (long long)e);
            if (parse_mlp(PyTuple_GET_ITEM(all, e), name, mlp_names, d, &NI, &ms[e], keep) < 0) goto fail;
            if (out) {
                dsv2py_tensor tt;
                const dsv2_mat *w3[3] = {&ms[e].gate, &ms[e].up, &ms[e].down};
                for (int q = 0; q < 3; q++) {
                    tt.dtype = w3[q]->dtype;
                    tt.data = w3[q]->data;
                    tt.ndim = 2;
                    tt.shape[0] = w3[q]->rows;
                    tt.shape[1] = w3[q]->cols;
                    if (check_out_vs_weight(out, "out", &tt, name) < 0) goto fail;
                }
            }
        }
        *I_out = NI;
        return ms;
    }
    if (gate_up == Py_None || down == Py_None) {
        PyErr_SetString(PyExc_TypeError, "experts: expected a list of per-expert (gate_proj, up_proj, down_proj) or "
                                         "the stacked gate_up_proj [E, 2I, d] and down_proj [E, d, I]");
        return NULL;
    }
    dsv2py_tensor gu, dn;
    int64_t gushape[3] = {E, DSV2PY_ANY, d};
    if (dsv2py_weight(gate_up, "gate_up_proj", 3, gushape, &gu) < 0) return NULL;
    if (gu.shape[1] % 2) {
        PyErr_Format(PyExc_ValueError, "gate_up_proj: expected shape [%lld, 2*I, %lld] with an even middle "
                                       "dimension (gate rows then up rows), got middle dimension %lld",
                     (long long)E, (long long)d, (long long)gu.shape[1]);
        return NULL;
    }
    int64_t NI = gu.shape[1] / 2;
    int64_t dshape[3] = {E, d, NI};
    if (dsv2py_weight(down, "down_proj", 3, dshape, &dn) < 0) return NULL;
    if (NI > MAXDIM_I32) {
        PyErr_SetString(PyExc_ValueError, "gate_up_proj: dimensions must be < 2**31");
        return NULL;
    }
    if (check_out_vs_weight(out, "out", &gu, "gate_up_proj") < 0 || check_out_vs_weight(out, "out", &dn, "down_proj") < 0)
        return NULL;
    ms = (dsv2_mlp *)PyMem_Calloc((size_t)E, sizeof(dsv2_mlp));
    if (!ms) {
        PyErr_NoMemory();
        return NULL;
    }
    for (int64_t e = 0; e < E; e++) {
        dsv2_mat both = dsv2py_mat_at(&gu, e);
        ms[e].gate = dsv2_mat_rows(&both, 0, NI);
        ms[e].up = dsv2_mat_rows(&both, NI, NI);
        ms[e].down = dsv2py_mat_at(&dn, e);
    }
    *I_out = NI;
    return ms;
fail:
    PyMem_Free(ms);
    return NULL;
}

/* ---------------- expert table: the routed experts parsed once ---------------- */

#define TABLE_NAME "dsv2ext.moe_expert_table"

typedef struct {
    dsv2_mlp *ms;  /* [E] */
    int64_t E, d, inter;
    PyObject *keep; /* the weight objects */
} expert_table;

static void table_free(PyObject *cap) {
    expert_table *t = (expert_table *)PyCapsule_GetPointer(cap, TABLE_NAME);
    if (!t) {
        PyErr_Clear();
        return;
    }
    PyMem_Free(t->ms);
    Py_XDECREF(t->keep);
    PyMem_Free(t);
}

/* moe_expert_table(experts | None, gate_up_proj | None, down_proj | None, n_experts) -> capsule */
static PyObject *py_moe_expert_table(PyObject *self, PyObject *args) {
    PyObject *o_ex, *o_gu, *o_dn;
    long long E;
    if (!PyArg_ParseTuple(args, "OOOL:moe_expert_table", &o_ex, &o_gu, &o_dn, &E)) return NULL;
    if (E < 1) return PyErr_Format(PyExc_ValueError, "n_experts: expected >= 1, got %lld", E);
    PyObject *keep = PyList_New(0);
    if (!keep) return NULL;
    /* d from the first expert's gate (or the stacked gate_up_proj) */
    int64_t NI = 0;
    dsv2_mlp *ms = parse_experts(o_ex, o_gu, o_dn, E, DSV2PY_ANY, &NI, keep, NULL);
    if (!ms) {
        Py_DECREF(keep);
        return NULL;
    }
    if (o_gu != Py_None && PyList_Append(keep, o_gu) < 0) goto fail;
    if (o_dn != Py_None && PyList_Append(keep, o_dn) < 0) goto fail;
    expert_table *t = (expert_table *)PyMem_Calloc(1, sizeof(expert_table));
    if (!t) {
        PyErr_NoMemory();
        goto fail;
    }
    t->ms = ms;
    t->E = E;
    t->d = ms[0].gate.cols;
    t->inter = NI;
    t->keep = keep;
    for (int64_t e = 1; e < E; e++)
        if (ms[e].gate.cols != t->d) {
            PyErr_Format(PyExc_ValueError, "experts[%lld]: hidden size %lld differs from expert 0's (%lld)",
                         (long long)e, (long long)ms[e].gate.cols, (long long)t->d);
            PyMem_Free(t);
            goto fail;
        }
    PyObject *cap = PyCapsule_New(t, TABLE_NAME, table_free);
    if (!cap) {
        PyMem_Free(t);
        goto fail;
    }
    return cap;
fail:
    PyMem_Free(ms);
    Py_DECREF(keep);
    return NULL;
}

/* the table's experts when `o` is a table capsule (1), 0 when it is not one, -1 on error */
static int table_of(PyObject *o, PyObject *gu, PyObject *dn, int64_t E, int64_t d, PyArrayObject *out,
                    const expert_table **tab) {
    if (!PyCapsule_CheckExact(o)) return 0;
    expert_table *t = (expert_table *)PyCapsule_GetPointer(o, TABLE_NAME);
    if (!t) return -1;
    if (gu != Py_None || dn != Py_None) {
        PyErr_SetString(PyExc_ValueError, "experts: give either an expert table or the stacked gate_up_proj/down_proj, "
                                          "not both");
        return -1;
    }
    if (t->E != E) {
        PyErr_Format(PyExc_ValueError, "experts: the expert table holds %lld experts, expected %lld", (long long)t->E,
                     (long long)E);
        return -1;
    }
    if (d >= 0 && t->d != d) {
        PyErr_Format(PyExc_ValueError, "experts: the expert table's hidden size is %lld, x has %lld columns",
                     (long long)t->d, (long long)d);
        return -1;
    }
    for (int64_t e = 0; out && e < E; e++) {
        const dsv2_mat *w3[3] = {&t->ms[e].gate, &t->ms[e].up, &t->ms[e].down};
        for (int q = 0; q < 3; q++) {
            dsv2py_tensor tt = {w3[q]->dtype, w3[q]->data, NULL, 2, {w3[q]->rows, w3[q]->cols}, 0};
            if (tensor_overlaps(out, &tt)) {
                PyErr_Format(PyExc_ValueError, "out and experts[%lld] must not share memory", (long long)e);
                return -1;
            }
        }
    }
    *tab = t;
    return 1;
}

static int parse_shared(PyObject *o, int64_t d, dsv2_mlp *m, PyObject *keep, PyArrayObject *out) {
    if (o == Py_None) return 1;
    int64_t NI = DSV2PY_ANY;
    if (parse_mlp(o, "shared", mlp_names, d, &NI, m, keep) < 0) return -1;
    const dsv2_mat *w3[3] = {&m->gate, &m->up, &m->down};
    for (int q = 0; q < 3; q++) {
        dsv2py_tensor tt;
        tt.dtype = w3[q]->dtype;
        tt.data = w3[q]->data;
        tt.ndim = 2;
        tt.shape[0] = w3[q]->rows;
        tt.shape[1] = w3[q]->cols;
        if (check_out_vs_weight(out, "out", &tt, "shared") < 0) return -1;
    }
    return 0;
}

/* x [T, d] float32 with T, d < 2**31 */
/* The routed experts (a parsed table, a list of (gate, up, down), or stacked gate_up_proj / down_proj)
 * and the optional shared expert of a moe_experts / moe_block call, with the references that keep
 * their arrays alive while the kernel runs. */
typedef struct {
    PyObject *keep;   /* arrays held for the call */
    const dsv2_mlp *ms; /* [E] */
    dsv2_mlp *owned;  /* ms when parsed for this call (freed by expert_args_free), else NULL */
    dsv2_mlp sh;
    int no_shared;    /* 1: no shared expert */
} expert_args;

static void expert_args_free(expert_args *a) {
    if (a->owned) PyMem_Free(a->owned);
    Py_XDECREF(a->keep);
    a->owned = NULL;
    a->keep = NULL;
}

/* Parse the experts and the shared expert; 0, or -1 with an exception set (nothing left to free). */
static int expert_args_parse(expert_args *a, PyObject *o_ex, PyObject *o_gu, PyObject *o_dn, PyObject *o_sh, int64_t E,
                             int64_t d, PyArrayObject *out) {
    memset(a, 0, sizeof *a);
    a->keep = PyList_New(0);
    if (!a->keep) return -1;
    const expert_table *tab = NULL;
    int is_tab = table_of(o_ex, o_gu, o_dn, E, d, out, &tab);
    if (is_tab < 0) goto fail;
    if (is_tab) {
        a->ms = tab->ms;
    } else {
        int64_t NI = 0;
        a->owned = parse_experts(o_ex, o_gu, o_dn, E, d, &NI, a->keep, out);
        if (!a->owned) goto fail;
        a->ms = a->owned;
    }
    a->no_shared = parse_shared(o_sh, d, &a->sh, a->keep, out);
    if (a->no_shared < 0) goto fail;
    return 0;
fail:
    expert_args_free(a);
    return -1;
}

static PyArrayObject *parse_x(PyObject *o, int64_t d) {
    int64_t shape[2] = {DSV2PY_ANY, d};
    PyArrayObject *x = dsv2py_array(o, "x", NPY_FLOAT32, 2, shape, 0);
    if (!x) return NULL;
    if (dsv2py_dim(x, 0) > MAXDIM_I32 || dsv2py_dim(x, 1) > MAXDIM_I32) {
        PyErr_SetString(PyExc_ValueError, "x: dimensions must be < 2**31");
        return NULL;
    }
    return x;
}

/* ids [T, k] int64, every value in [0, E) */
static PyArrayObject *parse_ids(PyObject *o, int64_t T, int64_t E) {
    int64_t shape[2] = {T, DSV2PY_ANY};
    PyArrayObject *ids = dsv2py_array(o, "ids", NPY_INT64, 2, shape, 0);
    if (!ids) return NULL;
    const int64_t *p = (const int64_t *)PyArray_DATA(ids);
    int64_t k = dsv2py_dim(ids, 1);
    for (int64_t i = 0; i < dsv2py_dim(ids, 0) * k; i++)
        if (p[i] < 0 || p[i] >= E) {
            PyErr_Format(PyExc_ValueError, "ids: expert id %lld at [%lld, %lld] is outside [0, %lld)", (long long)p[i],
                         (long long)(i / k), (long long)(i % k), (long long)E);
            return NULL;
        }
    return ids;
}

/* ---------------- moe_route ---------------- */

/* moe_route(ids [T, k] i64 out, weights [T, k] f32 out, x [T, d], router_weight [E, d], correction_bias [E]|None,
 *           top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor) */
/* The router weight [E, d], x [T, d], the optional correction bias [E] and the routing config of a
 * moe_route / moe_block call; 0, or -1 with an exception set. */
static int parse_routing(PyObject *o_r, PyObject *o_x, PyObject *o_b, long long top_k, long long n_group,
                         long long topk_group, const char *method, const char *scoring, int norm, double scale,
                         dsv2py_tensor *r, PyArrayObject **x, PyArrayObject **bias, dsv2_moe_cfg *cfg) {
    if (check_router_weight(o_r, DSV2PY_ANY, r) < 0) return -1;
    *x = parse_x(o_x, r->shape[1]);
    if (!*x) return -1;
    if (parse_bias(o_b, r->shape[0], bias) < 0) return -1;
    return parse_cfg(r->shape[0], top_k, n_group, topk_group, method, scoring, norm, scale, *bias != NULL, cfg);
}

static PyObject *py_moe_route(PyObject *self, PyObject *args) {
    PyObject *o_ids, *o_w, *o_x, *o_r, *o_b;
    long long top_k, n_group, topk_group;
    const char *method, *scoring;
    int norm;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOLLLsspd:moe_route", &o_ids, &o_w, &o_x, &o_r, &o_b, &top_k, &n_group,
                          &topk_group, &method, &scoring, &norm, &scale))
        return NULL;
    dsv2py_tensor r;
    PyArrayObject *x, *bias;
    dsv2_moe_cfg cfg;
    if (parse_routing(o_r, o_x, o_b, top_k, n_group, topk_group, method, scoring, norm, scale, &r, &x, &bias, &cfg) < 0)
        return NULL;
    int64_t T = dsv2py_dim(x, 0);
    int64_t oshape[2] = {T, top_k};
    PyArrayObject *ids = dsv2py_array(o_ids, "ids", NPY_INT64, 2, oshape, 1);
    if (!ids) return NULL;
    PyArrayObject *w = dsv2py_array(o_w, "weights", NPY_FLOAT32, 2, oshape, 1);
    if (!w) return NULL;
    if (dsv2py_no_overlap(ids, "ids", w, "weights") < 0 || dsv2py_no_overlap(ids, "ids", x, "x") < 0 ||
        dsv2py_no_overlap(w, "weights", x, "x") < 0 || dsv2py_no_overlap(ids, "ids", bias, "correction_bias") < 0 ||
        dsv2py_no_overlap(w, "weights", bias, "correction_bias") < 0 ||
        check_out_vs_weight(ids, "ids", &r, "router_weight") < 0 ||
        check_out_vs_weight(w, "weights", &r, "router_weight") < 0)
        return NULL;
    dsv2_mat rm = dsv2py_mat(&r);
    const float *bp = bias ? (const float *)PyArray_DATA(bias) : NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_moe_route((int64_t *)dsv2py_data(ids), (float *)dsv2py_data(w), NULL, (const float *)dsv2py_data(x), &rm,
                        bp, T, &cfg);
    Py_END_ALLOW_THREADS
    if (rc) return raise_route(rc, "moe_route");
    Py_RETURN_NONE;
}

/* ---------------- dispatch / combine ---------------- */

/* moe_dispatch(offsets [E + 1] i64 out, order [T * k] i64 out, ids [T, k] i64) */
static PyObject *py_moe_dispatch(PyObject *self, PyObject *args) {
    PyObject *o_off, *o_order, *o_ids;
    if (!PyArg_ParseTuple(args, "OOO:moe_dispatch", &o_off, &o_order, &o_ids)) return NULL;
    PyArrayObject *off = dsv2py_array(o_off, "offsets", NPY_INT64, 1, NULL, 1);
    if (!off) return NULL;
    int64_t E = dsv2py_dim(off, 0) - 1;
    if (E < 1) return PyErr_Format(PyExc_ValueError, "offsets: expected shape [n_experts + 1] with n_experts >= 1");
    PyArrayObject *ids = parse_ids(o_ids, DSV2PY_ANY, E);
    if (!ids) return NULL;
    int64_t T = dsv2py_dim(ids, 0), k = dsv2py_dim(ids, 1);
    int64_t oshape[1] = {T * k};
    PyArrayObject *order = dsv2py_array(o_order, "order", NPY_INT64, 1, oshape, 1);
    if (!order) return NULL;
    if (dsv2py_no_overlap(off, "offsets", order, "order") < 0 || dsv2py_no_overlap(off, "offsets", ids, "ids") < 0 ||
        dsv2py_no_overlap(order, "order", ids, "ids") < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_moe_dispatch((int64_t *)dsv2py_data(off), (int64_t *)dsv2py_data(order),
                           (const int64_t *)dsv2py_data(ids), T, k, E);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "moe_dispatch");
    Py_RETURN_NONE;
}

/* moe_combine(out [T, d] out, expert_out [T * k, d] (grouped rows), order [T * k] i64, weights [T, k] f32,
 *             add [T, d] | None) */
static PyObject *py_moe_combine(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_y, *o_order, *o_w, *o_add;
    if (!PyArg_ParseTuple(args, "OOOOO:moe_combine", &o_out, &o_y, &o_order, &o_w, &o_add)) return NULL;
    PyArrayObject *w = dsv2py_array(o_w, "weights", NPY_FLOAT32, 2, NULL, 0);
    if (!w) return NULL;
    int64_t T = dsv2py_dim(w, 0), k = dsv2py_dim(w, 1);
    int64_t yshape[2] = {T * k, DSV2PY_ANY};
    PyArrayObject *y = dsv2py_array(o_y, "expert_out", NPY_FLOAT32, 2, yshape, 0);
    if (!y) return NULL;
    int64_t d = dsv2py_dim(y, 1);
    int64_t oshape[1] = {T * k}, xshape[2] = {T, d};
    PyArrayObject *order = dsv2py_array(o_order, "order", NPY_INT64, 1, oshape, 0);
    if (!order) return NULL;
    PyArrayObject *add = dsv2py_array_opt(o_add, "add", NPY_FLOAT32, 2, xshape, 0);
    if (!add && PyErr_Occurred()) return NULL;
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, xshape, 1);
    if (!out) return NULL;
    if (dsv2py_no_overlap(out, "out", y, "expert_out") < 0 || dsv2py_no_overlap(out, "out", w, "weights") < 0 ||
        dsv2py_no_overlap(out, "out", order, "order") < 0 || dsv2py_no_overlap(out, "out", add, "add") < 0)
        return NULL;
    /* order must be a permutation of [0, T * k) */
    const int64_t S = T * k, *op = (const int64_t *)PyArray_DATA(order);
    unsigned char *seen = (unsigned char *)PyMem_Calloc((size_t)S, 1);
    if (!seen) return PyErr_NoMemory();
    for (int64_t r = 0; r < S; r++) {
        if (op[r] < 0 || op[r] >= S || seen[op[r]]) {
            PyMem_Free(seen);
            return PyErr_Format(PyExc_ValueError,
                                "order: expected a permutation of 0..%lld (T * k - 1); value %lld at position %lld is "
                                "%s",
                                (long long)(S - 1), (long long)op[r], (long long)r,
                                (op[r] < 0 || op[r] >= S) ? "out of range" : "repeated");
        }
        seen[op[r]] = 1;
    }
    PyMem_Free(seen);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_moe_combine((float *)dsv2py_data(out), (const float *)dsv2py_data(y), op,
                          (const float *)dsv2py_data(w), add ? (const float *)dsv2py_data(add) : NULL, T, k, d);
    Py_END_ALLOW_THREADS
    if (rc) return dsv2py_raise(rc, "moe_combine");
    Py_RETURN_NONE;
}

/* ---------------- swiglu_mlp ---------------- */

/* swiglu_mlp(out [T, d] out, x [T, d], gate [I, d], up [I, d], down [d, I]) */
static PyObject *py_swiglu_mlp(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x, *o_g, *o_u, *o_d;
    if (!PyArg_ParseTuple(args, "OOOOO:swiglu_mlp", &o_out, &o_x, &o_g, &o_u, &o_d)) return NULL;
    PyObject *keep = PyList_New(0);
    if (!keep) return NULL;
    PyObject *trip = PyTuple_Pack(3, o_g, o_u, o_d);
    if (!trip) {
        Py_DECREF(keep);
        return NULL;
    }
    dsv2_mlp m;
    int64_t NI = DSV2PY_ANY;
    static const char *const names[3] = {"gate", "up", "down"};
    int bad = parse_mlp(trip, NULL, names, DSV2PY_ANY, &NI, &m, keep) < 0;
    Py_DECREF(trip);
    PyArrayObject *x = bad ? NULL : parse_x(o_x, m.gate.cols);
    if (!x) {
        Py_DECREF(keep);
        return NULL;
    }
    int64_t T = dsv2py_dim(x, 0), d = dsv2py_dim(x, 1);
    int64_t oshape[2] = {T, d};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    int ok = out && dsv2py_no_overlap(out, "out", x, "x") == 0;
    const dsv2_mat *w3[3] = {&m.gate, &m.up, &m.down};
    const char *wn[3] = {"gate", "up", "down"};
    for (int q = 0; ok && q < 3; q++) {
        dsv2py_tensor tt = {w3[q]->dtype, w3[q]->data, NULL, 2, {w3[q]->rows, w3[q]->cols}, 0};
        ok = check_out_vs_weight(out, "out", &tt, wn[q]) == 0;
    }
    if (!ok) {
        Py_DECREF(keep);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_mlp_forward((float *)dsv2py_data(out), (const float *)dsv2py_data(x), &m, T);
    Py_END_ALLOW_THREADS
    Py_DECREF(keep);
    if (rc) return dsv2py_raise(rc, "swiglu_mlp");
    Py_RETURN_NONE;
}

/* ---------------- moe_experts / moe_block ---------------- */

/* moe_experts(out [T, d] out, x [T, d], ids [T, k] i64, weights [T, k] f32,
 *             experts (list of (gate, up, down)) | None, gate_up_proj [E, 2I, d] | None, down_proj [E, d, I] | None,
 *             n_experts, shared (gate, up, down) | None) */
static PyObject *py_moe_experts(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x, *o_ids, *o_w, *o_ex, *o_gu, *o_dn, *o_sh;
    long long E;
    if (!PyArg_ParseTuple(args, "OOOOOOOLO:moe_experts", &o_out, &o_x, &o_ids, &o_w, &o_ex, &o_gu, &o_dn, &E, &o_sh))
        return NULL;
    if (E < 1) return PyErr_Format(PyExc_ValueError, "n_experts: expected >= 1, got %lld", E);
    PyArrayObject *x = parse_x(o_x, DSV2PY_ANY);
    if (!x) return NULL;
    int64_t T = dsv2py_dim(x, 0), d = dsv2py_dim(x, 1);
    PyArrayObject *ids = parse_ids(o_ids, T, E);
    if (!ids) return NULL;
    int64_t k = dsv2py_dim(ids, 1);
    int64_t wshape[2] = {T, k}, oshape[2] = {T, d};
    PyArrayObject *w = dsv2py_array(o_w, "weights", NPY_FLOAT32, 2, wshape, 0);
    if (!w) return NULL;
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    if (dsv2py_no_overlap(out, "out", x, "x") < 0 || dsv2py_no_overlap(out, "out", ids, "ids") < 0 ||
        dsv2py_no_overlap(out, "out", w, "weights") < 0)
        return NULL;
    expert_args ea;
    if (expert_args_parse(&ea, o_ex, o_gu, o_dn, o_sh, E, d, out) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_moe_experts((float *)dsv2py_data(out), (const float *)dsv2py_data(x), (const int64_t *)dsv2py_data(ids),
                          (const float *)dsv2py_data(w), ea.ms, E, ea.no_shared ? NULL : &ea.sh, T, k);
    Py_END_ALLOW_THREADS
    expert_args_free(&ea);
    if (rc) return dsv2py_raise(rc, "moe_experts");
    Py_RETURN_NONE;
}

/* moe_block(out [T, d] out, x [T, d], router_weight [E, d], correction_bias [E] | None,
 *           experts | None, gate_up_proj | None, down_proj | None, shared | None,
 *           top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor,
 *           ids_out [T, k] i64 | None, weights_out [T, k] f32 | None) */
static PyObject *py_moe_block(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_x, *o_r, *o_b, *o_ex, *o_gu, *o_dn, *o_sh, *o_ids, *o_w;
    long long top_k, n_group, topk_group;
    const char *method, *scoring;
    int norm;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOOLLLsspdOO:moe_block", &o_out, &o_x, &o_r, &o_b, &o_ex, &o_gu, &o_dn, &o_sh,
                          &top_k, &n_group, &topk_group, &method, &scoring, &norm, &scale, &o_ids, &o_w))
        return NULL;
    dsv2py_tensor r;
    PyArrayObject *x, *bias;
    dsv2_moe_cfg cfg;
    if (parse_routing(o_r, o_x, o_b, top_k, n_group, topk_group, method, scoring, norm, scale, &r, &x, &bias, &cfg) < 0)
        return NULL;
    int64_t E = r.shape[0], d = r.shape[1], T = dsv2py_dim(x, 0);
    int64_t oshape[2] = {T, d}, ishape[2] = {T, top_k};
    PyArrayObject *out = dsv2py_array(o_out, "out", NPY_FLOAT32, 2, oshape, 1);
    if (!out) return NULL;
    PyArrayObject *ids = dsv2py_array_opt(o_ids, "ids_out", NPY_INT64, 2, ishape, 1);
    if (!ids && PyErr_Occurred()) return NULL;
    PyArrayObject *w = dsv2py_array_opt(o_w, "weights_out", NPY_FLOAT32, 2, ishape, 1);
    if (!w && PyErr_Occurred()) return NULL;
    PyArrayObject *outs[3] = {out, ids, w};
    const char *onames[3] = {"out", "ids_out", "weights_out"};
    for (int i = 0; i < 3; i++) {
        if (!outs[i]) continue;
        if (dsv2py_no_overlap(outs[i], onames[i], x, "x") < 0 ||
            dsv2py_no_overlap(outs[i], onames[i], bias, "correction_bias") < 0 ||
            check_out_vs_weight(outs[i], onames[i], &r, "router_weight") < 0)
            return NULL;
        for (int j = i + 1; j < 3; j++)
            if (dsv2py_no_overlap(outs[i], onames[i], outs[j], onames[j]) < 0) return NULL;
    }
    expert_args ea;
    if (expert_args_parse(&ea, o_ex, o_gu, o_dn, o_sh, E, d, out) < 0) return NULL;
    dsv2_mat rm = dsv2py_mat(&r);
    const float *bp = bias ? (const float *)PyArray_DATA(bias) : NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dsv2_moe_block((float *)dsv2py_data(out), ids ? (int64_t *)dsv2py_data(ids) : NULL,
                        w ? (float *)dsv2py_data(w) : NULL, (const float *)dsv2py_data(x), &rm, bp, ea.ms,
                        ea.no_shared ? NULL : &ea.sh, T, &cfg);
    Py_END_ALLOW_THREADS
    expert_args_free(&ea);
    if (rc) return raise_route(rc, "moe_block");
    Py_RETURN_NONE;
}

PyMethodDef dsv2py_moe_methods[] = {
    {"moe_route", py_moe_route, METH_VARARGS,
     "moe_route(ids, weights, x, router_weight, correction_bias, top_k, n_group, topk_group, topk_method, "
     "scoring_func, norm_topk_prob, routed_scaling_factor): ids [T, k] int64, weights [T, k] float32"},
    {"moe_dispatch", py_moe_dispatch, METH_VARARGS,
     "moe_dispatch(offsets, order, ids): group the slots t*k+j of ids [T, k] by expert"},
    {"moe_combine", py_moe_combine, METH_VARARGS,
     "moe_combine(out, expert_out, order, weights, add): weighted sum of grouped expert rows into token order"},
    {"swiglu_mlp", py_swiglu_mlp, METH_VARARGS, "swiglu_mlp(out, x, gate, up, down): out = down(silu(gate x) * up x)"},
    {"moe_experts", py_moe_experts, METH_VARARGS,
     "moe_experts(out, x, ids, weights, experts, gate_up_proj, down_proj, n_experts, shared)"},
    {"moe_expert_table", py_moe_expert_table, METH_VARARGS,
     "moe_expert_table(experts, gate_up_proj, down_proj, n_experts) -> table: the routed experts parsed once"},
    {"moe_block", py_moe_block, METH_VARARGS,
     "moe_block(out, x, router_weight, correction_bias, experts, gate_up_proj, down_proj, shared, top_k, n_group, "
     "topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor, ids_out, weights_out)"},
    {NULL, NULL, 0, NULL}};
