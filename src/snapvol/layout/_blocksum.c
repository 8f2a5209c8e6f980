/* Block checksums of whole runs in one call: snapvol.layout._blocksum.
 *
 * A block's checksum is xxh3-64 of its 4 KiB seeded with its VBN (layout/checksum.py).
 * Hashing a run of blocks one Python call at a time costs about 350 ns of call, slice and
 * integer overhead per block on top of the 120 ns the hash itself takes, which made
 * checksum verification the largest cost of a sequential read through the mount. These
 * functions hash a run in a loop in C, with the GIL released for long runs.
 *
 * The hash is the system's xxhash (Debian's libxxhash-dev), compiled into this module
 * with XXH_INLINE_ALL: the shared library is built for the baseline instruction set and
 * sits behind a call per block. On x86 with AVX2, and with the xxhash 0.8.1 whose inner
 * functions this names (the one the project is built against), blocks are hashed with
 * xxhash's AVX2 kernels, chosen at import as xxhash's own x86 dispatcher would; anywhere
 * else with its baseline code. Per 1 MiB of blocks, hashed one Python call each: 135 us;
 * here: 53 us (SSE2), 35 us (AVX2), measured on the development machine. Same algorithm
 * and output as the xxhash Python package, which tests check.
 *
 * Checksums are exchanged as little-endian u64 arrays, the layout of the checksum field
 * of a block pointer (layout/pointer.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#define XXH_INLINE_ALL
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h> /* the AVX2 intrinsics, whatever the build's baseline */
#define XXH_DISPATCH_AVX2 1 /* compile the AVX2 kernels, each with the avx2 target */
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#endif
#include <xxhash.h>

#define BLOCK_SIZE 4096
#define GIL_FREE_BLOCKS 16 /* shorter runs are not worth releasing the GIL for */

static uint64_t hash_baseline(const char *block, uint64_t seed)
{
    return XXH3_64bits_withSeed(block, BLOCK_SIZE, (XXH64_hash_t)seed);
}

#if defined(XXH_DISPATCH_AVX2) && XXH_VERSION_NUMBER == 801
#define HAVE_AVX2 1
/* What XXH3_64bits_withSeed does for a 4 KiB input (longer than XXH3_MIDSIZE_MAX),
 * with the AVX2 kernels in place of the baseline ones. */
XXH_TARGET_AVX2 static uint64_t hash_avx2(const char *block, uint64_t seed)
{
    return XXH3_hashLong_64b_withSeed_internal(block, BLOCK_SIZE, (XXH64_hash_t)seed,
                                               XXH3_accumulate_512_avx2,
                                               XXH3_scrambleAcc_avx2,
                                               XXH3_initCustomSecret_avx2);
}
#endif

static uint64_t (*hash_block)(const char *, uint64_t) = hash_baseline;

static uint64_t to_le(uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap64(v);
#else
    return v;
#endif
}

/* The number of blocks in `data`, or -1 with ValueError set if it is not whole blocks. */
static Py_ssize_t whole_blocks(const Py_buffer *data)
{
    if (data->len % BLOCK_SIZE) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %d-byte blocks",
                     data->len, BLOCK_SIZE);
        return -1;
    }
    return data->len / BLOCK_SIZE;
}

PyDoc_STRVAR(run_checksums_doc,
"run_checksums(data, first_vbn) -> bytes\n\n"
"The checksums of the blocks of `data` (whole 4 KiB blocks) as if block i were at VBN\n"
"first_vbn + i: len(data) // 4096 little-endian u64 values.");

static PyObject *run_checksums(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long first;
    if (!PyArg_ParseTuple(args, "y*K:run_checksums", &data, &first))
        return NULL;
    Py_ssize_t n = whole_blocks(&data);
    PyObject *out = n < 0 ? NULL : PyBytes_FromStringAndSize(NULL, n * 8);
    if (out != NULL) {
        const char *src = data.buf;
        char *dst = PyBytes_AS_STRING(out);
        PyThreadState *save = n >= GIL_FREE_BLOCKS ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t h = to_le(hash_block(src + i * BLOCK_SIZE, first + i));
            memcpy(dst + i * 8, &h, 8);
        }
        if (save != NULL)
            PyEval_RestoreThread(save);
    }
    PyBuffer_Release(&data);
    return out;
}

PyDoc_STRVAR(first_mismatch_doc,
"first_mismatch(data, first_vbn, expected) -> int\n\n"
"The index of the first block of `data` whose checksum (at VBN first_vbn + i) differs\n"
"from expected[i], or -1 if every one matches. `expected` holds len(data) // 4096\n"
"little-endian u64 values (a contiguous array of pointer checksums).");

static PyObject *first_mismatch(PyObject *self, PyObject *args)
{
    Py_buffer data, expected;
    unsigned long long first;
    if (!PyArg_ParseTuple(args, "y*Ky*:first_mismatch", &data, &first, &expected))
        return NULL;
    Py_ssize_t n = whole_blocks(&data), bad = -1;
    if (n >= 0 && expected.len != n * 8) {
        PyErr_Format(PyExc_ValueError, "%zd blocks need %zd bytes of checksums, not %zd",
                     n, n * 8, expected.len);
        n = -1;
    }
    if (n >= 0) {
        const char *src = data.buf, *want = expected.buf;
        PyThreadState *save = n >= GIL_FREE_BLOCKS ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t h = to_le(hash_block(src + i * BLOCK_SIZE, first + i));
            if (memcmp(&h, want + i * 8, 8) != 0) {
                bad = i;
                break;
            }
        }
        if (save != NULL)
            PyEval_RestoreThread(save);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&expected);
    return n < 0 ? NULL : PyLong_FromSsize_t(bad);
}

PyDoc_STRVAR(checksums_of_doc,
"checksums_of(blocks, vbns) -> bytes\n\n"
"The checksums of separate 4 KiB blocks, block i at VBN vbns[i] (`vbns`: len(blocks)\n"
"little-endian u64 values), as len(blocks) little-endian u64 values: what a CP computes\n"
"for the data blocks it places, which sit in many buffers.");

static PyObject *checksums_of(PyObject *self, PyObject *args)
{
    PyObject *blocks, *out = NULL;
    Py_buffer vbns;
    if (!PyArg_ParseTuple(args, "Oy*:checksums_of", &blocks, &vbns))
        return NULL;
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence of buffers");
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (vbns.len != n * 8) {
        PyErr_Format(PyExc_ValueError, "%zd blocks need %zd bytes of VBNs, not %zd",
                     n, n * 8, vbns.len);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer block;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &block, PyBUF_SIMPLE) < 0)
            goto fail;
        if (block.len != BLOCK_SIZE) {
            PyErr_Format(PyExc_ValueError, "block %zd has %zd bytes, not %d", i, block.len,
                         BLOCK_SIZE);
            PyBuffer_Release(&block);
            goto fail;
        }
        uint64_t vbn;
        memcpy(&vbn, (const char *)vbns.buf + i * 8, 8);
        uint64_t h = to_le(hash_block(block.buf, to_le(vbn)));
        memcpy(PyBytes_AS_STRING(out) + i * 8, &h, 8);
        PyBuffer_Release(&block);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&vbns);
    return out;
}

PyDoc_STRVAR(kernel_doc,
"kernel(name=None) -> str\n\n"
"The hash kernel in use, \"avx2\" or \"baseline\"; with `name`, switch to it first (for\n"
"tests: ValueError if this CPU or build lacks it).");

static PyObject *kernel(PyObject *self, PyObject *args)
{
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z:kernel", &name))
        return NULL;
    if (name != NULL && strcmp(name, "baseline") == 0) {
        hash_block = hash_baseline;
    } else if (name != NULL) {
#ifdef HAVE_AVX2
        if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
            hash_block = hash_avx2;
        } else
#endif
        {
            PyErr_Format(PyExc_ValueError, "no %s kernel here", name);
            return NULL;
        }
    }
#ifdef HAVE_AVX2
    if (hash_block == hash_avx2)
        return PyUnicode_FromString("avx2");
#endif
    return PyUnicode_FromString("baseline");
}

static PyMethodDef methods[] = {
    {"run_checksums", run_checksums, METH_VARARGS, run_checksums_doc},
    {"first_mismatch", first_mismatch, METH_VARARGS, first_mismatch_doc},
    {"checksums_of", checksums_of, METH_VARARGS, checksums_of_doc},
    {"kernel", kernel, METH_VARARGS, kernel_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blocksum",
    "Checksums of runs of 4 KiB blocks, hashed in C (see layout/checksum.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__blocksum(void)
{
#ifdef HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        hash_block = hash_avx2;
#endif
    return PyModule_Create(&module);
}
