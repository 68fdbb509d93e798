/* module.c - the dsv2ext._C module: gathers the method tables of the
 * binding files (bind_*.c) into one module. */
#define DSV2PY_MODULE_MAIN
#include "bind_util.h"

extern PyMethodDef dsv2py_core_methods[];
/* tables of optional binding files: weak, so a build without one still links */
extern PyMethodDef dsv2py_mla_methods[] __attribute__((weak));
extern PyMethodDef dsv2py_moe_methods[] __attribute__((weak));
extern PyMethodDef dsv2py_quant_methods[] __attribute__((weak));
extern PyMethodDef dsv2py_model_methods[] __attribute__((weak));
extern PyMethodDef dsv2py_fp8_methods[] __attribute__((weak));

/* ---- per-call keep-alive list ----
 * Every METH_VARARGS function of _C runs through a trampoline that gives the
 * call a list of objects to keep alive until it returns (dsv2py_keep): the
 * `.data` / `.scales` arrays of dtype-tagged weights come from getattr and
 * would otherwise only be borrowed, so a wrapper whose attribute is computed
 * on access (a property returning a fresh array), or rebound by another thread
 * while the kernel runs without the GIL, could free memory the kernel reads.
 * The trampolines are plain functions of the module (one per method index), so
 * the functions keep their names, __self__ and pickling. */
static _Thread_local PyObject *keep_list = NULL;

int dsv2py_keep(PyObject *obj) {
    if (!keep_list) return 1;
    return PyList_Append(keep_list, obj) < 0 ? -1 : 0;
}

#define MAX_WRAPPED 100
static PyCFunction wrapped[MAX_WRAPPED]; /* the bindings' own functions, by index */

static PyObject *call_kept(int i, PyObject *self, PyObject *args) {
    PyObject *keep = PyList_New(0);
    if (!keep) return NULL;
    PyObject *prev = keep_list;
    keep_list = keep;
    PyObject *r = wrapped[i](self, args);
    keep_list = prev;
    Py_DECREF(keep);
    return r;
}

#define TRAMP(i) \
    static PyObject *tramp_##i(PyObject *self, PyObject *args) { return call_kept(i, self, args); }
#define TRAMP10(p) TRAMP(p##0) TRAMP(p##1) TRAMP(p##2) TRAMP(p##3) TRAMP(p##4) \
                   TRAMP(p##5) TRAMP(p##6) TRAMP(p##7) TRAMP(p##8) TRAMP(p##9)
#define NAME10(p) tramp_##p##0, tramp_##p##1, tramp_##p##2, tramp_##p##3, tramp_##p##4, \
                  tramp_##p##5, tramp_##p##6, tramp_##p##7, tramp_##p##8, tramp_##p##9
TRAMP10() TRAMP10(1) TRAMP10(2) TRAMP10(3) TRAMP10(4) TRAMP10(5) TRAMP10(6) TRAMP10(7) TRAMP10(8) TRAMP10(9)
static const PyCFunction tramps[MAX_WRAPPED] = {NAME10(), NAME10(1), NAME10(2), NAME10(3), NAME10(4),
                                                NAME10(5), NAME10(6), NAME10(7), NAME10(8), NAME10(9)};

static PyMethodDef *all_methods = NULL;

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "dsv2ext._C",
                                       "C kernels of dsv2ext (see dsv2ext.ops for the documented API).",
                                       -1, NULL};

static size_t count(const PyMethodDef *t) {
    size_t n = 0;
    if (t)
        while (t[n].ml_name) n++;
    return n;
}

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyMethodDef *tables[] = {dsv2py_core_methods, dsv2py_mla_methods, dsv2py_moe_methods,
                             dsv2py_quant_methods, dsv2py_model_methods, dsv2py_fp8_methods};
    size_t n = 0, ntab = sizeof tables / sizeof tables[0];
    for (size_t i = 0; i < ntab; i++) n += count(tables[i]);
    if (!all_methods) {
        all_methods = (PyMethodDef *)PyMem_RawCalloc(n + 1, sizeof(PyMethodDef));
        if (!all_methods) return PyErr_NoMemory();
        size_t k = 0;
        int nw = 0;
        for (size_t i = 0; i < ntab; i++)
            for (size_t j = 0; j < count(tables[i]); j++) {
                all_methods[k] = tables[i][j];
                /* METH_VARARGS: through a trampoline; other conventions are called as they are
                 * (dsv2py_keep then reports "no call frame" and temporaries are refused) */
                if (all_methods[k].ml_flags == METH_VARARGS && nw < MAX_WRAPPED) {
                    wrapped[nw] = all_methods[k].ml_meth;
                    all_methods[k].ml_meth = tramps[nw++];
                }
                k++;
            }
    }
    moduledef.m_methods = all_methods;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (!dsv2py_NonFiniteError) {
        PyObject *bases = PyTuple_Pack(2, PyExc_ValueError, PyExc_FloatingPointError);
        if (!bases) goto fail;
        dsv2py_NonFiniteError = PyErr_NewExceptionWithDoc(
            "dsv2ext._C.NonFiniteError",
            "NaN or Inf where a kernel cannot give a meaningful result (e.g. MoE router logits).\n"
            "Both a ValueError (a bad input) and a FloatingPointError (a numerical fault).",
            bases, NULL);
        Py_DECREF(bases);
        if (!dsv2py_NonFiniteError) goto fail;
    }
    if (PyModule_AddObjectRef(m, "NonFiniteError", dsv2py_NonFiniteError) < 0) goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
