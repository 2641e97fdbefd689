/*
 * producer._lzf: LZF decompression for PCD `binary_compressed` point clouds.
 *
 * Why C: LZF is a byte-oriented LZ77 variant in which every token depends on the output
 * written so far (back-references may overlap the bytes they produce), so it cannot be
 * vectorised with numpy and a Python byte loop runs at a few MB/s. This is the format's
 * reference decoder logic (liblzf lzf_d.c), written out with bounds checks on every read
 * and write so that a corrupt file gives an error instead of a crash.
 *
 * Token format (liblzf):
 *   ctrl < 32            literal run: copy the next ctrl + 1 input bytes.
 *   ctrl >= 32           back-reference: len = ctrl >> 5 (7 means "add the next byte"),
 *                        offset = ((ctrl & 31) << 8) + next byte + 1 bytes back from the
 *                        output position; copy len + 2 bytes, byte by byte (may overlap).
 *
 * The GIL is released while decoding, so several loader threads can decompress at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Error codes from lzf_decode; the Python wrapper turns them into ValueError text. */
enum { LZF_OK = 0, LZF_TRUNCATED_INPUT = 1, LZF_OUTPUT_OVERFLOW = 2, LZF_BAD_BACKREF = 3 };

static int lzf_decode(const uint8_t *ip, size_t in_len, uint8_t *op, size_t out_len,
                      size_t *written) {
    const uint8_t *const in_end = ip + in_len;
    uint8_t *const out_start = op;
    uint8_t *const out_end = op + out_len;
    int rc = LZF_OK;

    while (ip < in_end) {
        unsigned int ctrl = *ip++;
        if (ctrl < 32) {
            size_t run = (size_t)ctrl + 1;
            if ((size_t)(in_end - ip) < run) { rc = LZF_TRUNCATED_INPUT; break; }
            if ((size_t)(out_end - op) < run) { rc = LZF_OUTPUT_OVERFLOW; break; }
            memcpy(op, ip, run);
            op += run;
            ip += run;
        } else {
            size_t len = ctrl >> 5;
            if (len == 7) {
                if (ip >= in_end) { rc = LZF_TRUNCATED_INPUT; break; }
                len += *ip++;
            }
            if (ip >= in_end) { rc = LZF_TRUNCATED_INPUT; break; }
            size_t back = (((size_t)ctrl & 0x1f) << 8) + (size_t)(*ip++) + 1;
            len += 2;
            if ((size_t)(op - out_start) < back) { rc = LZF_BAD_BACKREF; break; }
            if ((size_t)(out_end - op) < len) { rc = LZF_OUTPUT_OVERFLOW; break; }
            const uint8_t *ref = op - back;
            if (back >= len) {
                memcpy(op, ref, len);  /* no overlap: one copy */
                op += len;
            } else {
                while (len--) *op++ = *ref++;  /* overlapping run: must go byte by byte */
            }
        }
    }
    *written = (size_t)(op - out_start);
    return rc;
}

/* decompress(data, out_len) -> bytes of exactly out_len; ValueError on corrupt input. */
static PyObject *py_decompress(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t out_len;
    if (!PyArg_ParseTuple(args, "y*n", &in, &out_len)) return NULL;
    if (out_len < 0) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "lzf: out_len must be >= 0");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, out_len);
    if (!out) { PyBuffer_Release(&in); return NULL; }
    size_t written = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lzf_decode((const uint8_t *)in.buf, (size_t)in.len,
                    (uint8_t *)PyBytes_AS_STRING(out), (size_t)out_len, &written);
    Py_END_ALLOW_THREADS
    Py_ssize_t in_len = in.len;
    PyBuffer_Release(&in);
    if (rc != LZF_OK || written != (size_t)out_len) {
        static const char *why[] = {"ok", "input ends inside a token",
                                    "output would exceed the declared size",
                                    "back-reference before the start of the output"};
        Py_DECREF(out);
        if (rc == LZF_OK)
            PyErr_Format(PyExc_ValueError,
                         "lzf: %zd input bytes decompress to %zu bytes, declared %zd",
                         in_len, written, out_len);
        else
            PyErr_Format(PyExc_ValueError, "lzf: corrupt stream after %zu output bytes: %s",
                         written, why[rc]);
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"decompress", py_decompress, METH_VARARGS,
     "decompress(data, out_len) -> bytes: LZF-decode data into exactly out_len bytes; "
     "ValueError if the stream is corrupt or its decoded size differs. Releases the GIL."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "producer._lzf",
                                    "LZF decompression (liblzf format) for PCD files.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__lzf(void) { return PyModule_Create(&module); }
