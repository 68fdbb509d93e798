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

/* ---- per-call keep-alive list ----
 * Every _C function runs through a trampoline that gives the call a list of
 * objects to keep alive until it returns (dsv2py_keep): the `.data` / `.scales`
 * arrays of dtype-tagged weights are fetched with getattr and would otherwise
 * be borrowed only, so a wrapper whose attribute is computed on access (a
 * property returning a fresh array) or reassigned by another thread while the
 * kernel runs without the GIL could free the memory the kernel reads. */
static _Thread_local PyObject *keep_list = NULL;

int dsv2py_keep(PyObject *obj) {
    if (!keep_list) return 1;
    return PyList_Append(keep_list, obj) < 0 ? -1 : 0;
}

typedef struct {
    PyMethodDef orig;   /* the binding's own entry */
    PyObject *module;   /* borrowed: single-phase module, never freed */
} wrapped_fn;

static PyObject *call_kept(PyObject *capsule, PyObject *args, PyObject *kwargs) {
    const wrapped_fn *w = (const wrapped_fn *)PyCapsule_GetPointer(capsule, "dsv2ext._C.fn");
    if (!w) return NULL;
    PyObject *keep = PyList_New(0);
    if (!keep) return NULL;
    PyObject *prev = keep_list;
    keep_list = keep;
    PyObject *r;
    int flags = w->orig.ml_flags & ~(METH_CLASS | METH_STATIC | METH_COEXIST);
    if (flags == (METH_VARARGS | METH_KEYWORDS))
        r = ((PyCFunctionWithKeywords)(void (*)(void))w->orig.ml_meth)(w->module, args, kwargs);
    else
        r = w->orig.ml_meth(w->module, args);
    keep_list = prev;
    Py_DECREF(keep);
    return r;
}

static PyObject *tramp_varargs(PyObject *cap, PyObject *args) { return call_kept(cap, args, NULL); }
static PyObject *tramp_varkw(PyObject *cap, PyObject *args, PyObject *kw) { return call_kept(cap, args, kw); }
static PyObject *tramp_noargs(PyObject *cap, PyObject *unused) { return call_kept(cap, NULL, NULL); }
static PyObject *tramp_o(PyObject *cap, PyObject *arg) { return call_kept(cap, arg, NULL); }

static PyMethodDef *all_methods = NULL; /* trampolines (or originals for other calling conventions) */
static wrapped_fn *all_wrapped = NULL;

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
                             dsv2py_quant_methods, dsv2py_model_methods};
    size_t n = 0, ntab = sizeof tables / sizeof tables[0];
    for (size_t i = 0; i < ntab; i++) n += count(tables[i]);
    if (!all_methods) {
        all_methods = (PyMethodDef *)PyMem_RawCalloc(n + 1, sizeof(PyMethodDef));
        all_wrapped = (wrapped_fn *)PyMem_RawCalloc(n + 1, sizeof(wrapped_fn));
        if (!all_methods || !all_wrapped) {
            PyMem_RawFree(all_methods);
            PyMem_RawFree(all_wrapped);
            all_methods = NULL;
            all_wrapped = NULL;
            return PyErr_NoMemory();
        }
        size_t k = 0;
        for (size_t i = 0; i < ntab; i++)
            for (size_t j = 0; j < count(tables[i]); j++, k++) {
                const PyMethodDef *d = &tables[i][j];
                all_wrapped[k].orig = *d;
                all_methods[k] = *d;
                switch (d->ml_flags) {
                case METH_VARARGS: all_methods[k].ml_meth = tramp_varargs; break;
                case METH_VARARGS | METH_KEYWORDS:
                    all_methods[k].ml_meth = (PyCFunction)(void (*)(void))tramp_varkw;
                    break;
                case METH_NOARGS: all_methods[k].ml_meth = tramp_noargs; break;
                case METH_O: all_methods[k].ml_meth = tramp_o; break;
                default: all_wrapped[k].orig.ml_name = NULL; break; /* called as is (no keep list) */
                }
            }
    }
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
    PyObject *modname = PyModule_GetNameObject(m);
    if (!modname) goto fail;
    for (size_t k = 0; k < n; k++) {
        PyObject *self = m, *cap = NULL;
        if (all_wrapped[k].orig.ml_name) {
            all_wrapped[k].module = m;
            cap = PyCapsule_New(&all_wrapped[k], "dsv2ext._C.fn", NULL);
            if (!cap) goto fail_name;
            self = cap;
        }
        PyObject *fn = PyCFunction_NewEx(&all_methods[k], self, modname);
        Py_XDECREF(cap);
        if (!fn) goto fail_name;
        int rc = PyModule_AddObjectRef(m, all_methods[k].ml_name, fn);
        Py_DECREF(fn);
        if (rc < 0) goto fail_name;
    }
    Py_DECREF(modname);
    return m;
fail_name:
    Py_DECREF(modname);
fail:
    Py_DECREF(m);
    return NULL;
}
