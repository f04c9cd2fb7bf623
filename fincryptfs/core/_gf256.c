/* Linear combinations of equal-length blocks over GF(2^8), with AVX2, without holding the GIL.
 *
 * Erasure coding k-of-n is, per byte position, a matrix times the k input bytes in GF(2^8). zfec does it with
 * a 64 KiB multiplication table, one byte at a time (~500 MB/s of segment here, a quarter of an upload's CPU on
 * two cores). Multiplying by a constant c is linear over GF(2), so c*x = c*(x & 15) ^ c*(x & 240): two 16-entry
 * tables, looked up for 32 bytes at once with one VPSHUFB each (the split-table method of ISA-L and
 * gf-complete). The field is zfec's (polynomial 0x11d) and fincryptfs.core.erasure takes the coefficients from
 * zfec itself, so the blocks are zfec's byte for byte (a property test checks it); without AVX2, or without this
 * module, erasure.py calls zfec.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#else
#define HAVE_AVX2_PATH 0
#endif

#define MAX_INPUTS 256

static uint8_t gf_exp[512];
static uint8_t gf_log[256];

static void gf_init(void)
{
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
        gf_exp[i] = (uint8_t)x;
        gf_log[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100)
            x ^= 0x11d;
    }
    for (int i = 255; i < 512; i++)
        gf_exp[i] = gf_exp[i - 255];
}

static inline uint8_t gf_mul(uint8_t a, uint8_t b)
{
    return (a == 0 || b == 0) ? 0 : gf_exp[gf_log[a] + gf_log[b]];
}

static int avx2_usable(void)
{
#if HAVE_AVX2_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* out[p] = XOR over j of coef[j] * in[j][p], for p in 0..len-1. */
static void combine_scalar(uint8_t *out, const uint8_t *const *in, const uint8_t *coef, int k, size_t from,
                           size_t len)
{
    for (size_t p = from; p < len; p++) {
        uint8_t acc = 0;
        for (int j = 0; j < k; j++)
            acc ^= gf_mul(coef[j], in[j][p]);
        out[p] = acc;
    }
}

#if HAVE_AVX2_PATH
__attribute__((target("avx2")))
static void combine_avx2(uint8_t *out, const uint8_t *const *in, const uint8_t *coef, int k, size_t len)
{
    /* tables[2j] = c_j * (0..15), tables[2j+1] = c_j * (0..15) << 4, each in both 128-bit lanes */
    __m256i tables[2 * MAX_INPUTS];
    for (int j = 0; j < k; j++) {
        uint8_t lo[16], hi[16];
        for (int x = 0; x < 16; x++) {
            lo[x] = gf_mul(coef[j], (uint8_t)x);
            hi[x] = gf_mul(coef[j], (uint8_t)(x << 4));
        }
        tables[2 * j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lo));
        tables[2 * j + 1] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hi));
    }
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    size_t p = 0;
    for (; p + 32 <= len; p += 32) {
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < k; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(in[j] + p));
            __m256i low = _mm256_and_si256(v, nibble);
            __m256i high = _mm256_and_si256(_mm256_srli_epi64(v, 4), nibble);
            acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8(tables[2 * j], low));
            acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8(tables[2 * j + 1], high));
        }
        _mm256_storeu_si256((__m256i *)(out + p), acc);
    }
    combine_scalar(out, in, coef, k, p, len);
}
#endif

/* combine(matrix, inputs) -> list of len(matrix) // len(inputs) bytes objects: row r is
 * XOR over j of matrix[r * k + j] * inputs[j], k = len(inputs), every input of the same length. */
static PyObject *combine(PyObject *self, PyObject *args)
{
    Py_buffer matrix;
    PyObject *seq;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O", &matrix, &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "inputs must be a sequence of buffers");
    if (fast == NULL) {
        PyBuffer_Release(&matrix);
        return NULL;
    }
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
    PyObject *result = NULL;
    Py_buffer views[MAX_INPUTS];
    Py_ssize_t held = 0;
    if (k < 1 || k > MAX_INPUTS || matrix.len % k != 0) {
        PyErr_SetString(PyExc_ValueError, "need 1 to 256 inputs and a matrix of whole rows");
        goto done;
    }
    for (; held < k; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, held), &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        if (views[held].len != views[0].len) {
            held++;
            PyErr_SetString(PyExc_ValueError, "every input must have the same length");
            goto done;
        }
    }
    Py_ssize_t rows = matrix.len / k, len = views[0].len;
    const uint8_t *in[MAX_INPUTS];
    for (Py_ssize_t j = 0; j < k; j++)
        in[j] = (const uint8_t *)views[j].buf;
    result = PyList_New(rows);
    if (result == NULL)
        goto done;
    for (Py_ssize_t r = 0; r < rows; r++) {
        PyObject *row = PyBytes_FromStringAndSize(NULL, len);
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, r, row);
    }
    int fast_path = avx2_usable();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(PyList_GET_ITEM(result, r));
        const uint8_t *coef = (const uint8_t *)matrix.buf + r * k;
#if HAVE_AVX2_PATH
        if (fast_path) {
            combine_avx2(out, in, coef, (int)k, (size_t)len);
            continue;
        }
#endif
        combine_scalar(out, in, coef, (int)k, 0, (size_t)len);
    }
    Py_END_ALLOW_THREADS
    (void)fast_path;
done:
    for (Py_ssize_t j = 0; j < held; j++)
        PyBuffer_Release(&views[j]);
    Py_DECREF(fast);
    PyBuffer_Release(&matrix);
    return result;
}

static PyObject *accelerated(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(avx2_usable());
}

static PyObject *mul(PyObject *self, PyObject *args)
{
    unsigned char a, b;
    (void)self;
    if (!PyArg_ParseTuple(args, "bb", &a, &b))
        return NULL;
    return PyLong_FromLong(gf_mul(a, b));
}

static PyMethodDef methods[] = {
    {"combine", combine, METH_VARARGS,
     "combine(matrix, inputs) -> list[bytes]: row r = XOR_j matrix[r*k+j] * inputs[j] over GF(2^8) (0x11d)."},
    {"accelerated", accelerated, METH_NOARGS, "accelerated() -> bool: whether combine uses AVX2 here."},
    {"mul", mul, METH_VARARGS, "mul(a, b) -> int: the product in GF(2^8) (0x11d)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT, .m_name = "_gf256", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__gf256(void)
{
    gf_init();
    return PyModule_Create(&module);
}
