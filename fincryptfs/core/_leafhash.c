/* Merkle hashing of many leaves (or many node pairs) per call, without holding the GIL.
 *
 * hashlib drops the GIL for each 4 KiB leaf, so threads hashing leaves spend as long handing the GIL to each
 * other as hashing; one call per chunk here hashes every whole leaf of the chunk with the GIL released once.
 * SHA-256 is OpenSSL's (libcrypto, the same code hashlib uses), so the results are the pure-Python path's
 * byte for byte; fincryptfs.core.merkle falls back to that path when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>

#define DIGEST 32

/* SHA-256(tag || data[i*size : (i+1)*size]) for i in 0..count-1, into out[i*32 : (i+1)*32]. */
static int hash_runs(const unsigned char *data, Py_ssize_t size, Py_ssize_t count, unsigned char tag,
                     unsigned char *out)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    const EVP_MD *md = EVP_sha256();
    int ok = ctx != NULL && md != NULL;
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        unsigned int len = 0;
        ok = EVP_DigestInit_ex(ctx, md, NULL) && EVP_DigestUpdate(ctx, &tag, 1) &&
             EVP_DigestUpdate(ctx, data + i * size, (size_t)size) &&
             EVP_DigestFinal_ex(ctx, out + i * DIGEST, &len) && len == DIGEST;
    }
    EVP_MD_CTX_free(ctx);
    return ok;
}

static PyObject *run(PyObject *args, const char *format, Py_ssize_t unit, int by_unit)
{
    Py_buffer view;
    Py_ssize_t size = unit;
    unsigned char tag;
    if (by_unit) {
        if (!PyArg_ParseTuple(args, format, &view, &size, &tag))
            return NULL;
    } else if (!PyArg_ParseTuple(args, format, &view, &tag)) {
        return NULL;
    }
    if (size <= 0 || view.len % size != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "data length must be a positive multiple of the unit size");
        return NULL;
    }
    Py_ssize_t count = view.len / size;
    PyObject *result = PyBytes_FromStringAndSize(NULL, count * DIGEST);
    if (result == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = hash_runs((const unsigned char *)view.buf, size, count, tag, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (!ok) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        return NULL;
    }
    return result;
}

static PyObject *hash_leaves(PyObject *self, PyObject *args)
{
    (void)self;
    return run(args, "y*nb", 0, 1);
}

static PyObject *hash_pairs(PyObject *self, PyObject *args)
{
    (void)self;
    return run(args, "y*b", 2 * DIGEST, 0);
}

static PyMethodDef methods[] = {
    {"hash_leaves", hash_leaves, METH_VARARGS,
     "hash_leaves(data, leaf_size, tag) -> 32-byte SHA-256(tag || leaf) digests of each leaf, concatenated"},
    {"hash_pairs", hash_pairs, METH_VARARGS,
     "hash_pairs(hashes, tag) -> SHA-256(tag || left || right) of each 64-byte pair, concatenated"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_leafhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__leafhash(void) { return PyModule_Create(&module); }
