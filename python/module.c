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
                             dsv2py_quant_methods, dsv2py_model_methods};
    size_t n = 0, ntab = sizeof tables / sizeof tables[0];
    for (size_t i = 0; i < ntab; i++) n += count(tables[i]);
    if (!all_methods) {
        all_methods = (PyMethodDef *)PyMem_RawCalloc(n + 1, sizeof(PyMethodDef));
        if (!all_methods) return PyErr_NoMemory();
        size_t k = 0;
        for (size_t i = 0; i < ntab; i++)
            for (size_t j = 0; j < count(tables[i]); j++) all_methods[k++] = tables[i][j];
    }
    moduledef.m_methods = all_methods;
    return PyModule_Create(&moduledef);
}
