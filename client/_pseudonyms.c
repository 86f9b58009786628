/*
 * fedseg client._pseudonyms: HMAC-SHA256 pseudonyms of many subject ids in one call.
 *
 * The privacy gate pseudonymises every subject id it reads (client/site_key.py). In CPython
 * that costs ~0.7 us per id in interpreter overhead alone (a 1,000,000-row source: 0.7 s),
 * several times the hashing. This module runs the same HMAC (RFC 2104, OpenSSL's SHA-256,
 * which uses the CPU's SHA extensions where present) over a whole column with the GIL released,
 * split across threads. Python's `hmac` is the reference: tests/unit/test_native_pseudonyms.py
 * checks both agree on arbitrary ids, and client/site_key.py falls back to it when this module
 * was not built.
 *
 * Functions (client/pseudonyms.py is the Python-facing wrapper):
 *   hmac_list(key, ids, strip=False, threads=1) -> (digests, status)
 *       ids: a list of str (and None where `strip`). Returns 32 bytes of HMAC-SHA256 per id and
 *       one status byte per id. Without `strip` every id is hashed as it is (status 0). With
 *       `strip`, each id is first stripped of the ASCII whitespace Python's str.strip() removes:
 *       0 hashed as it was, 3 hashed after stripping, 1 None or empty after stripping (a
 *       missing id; zero digest), 2 starts or ends with a non-ASCII character (zero digest: the
 *       caller normalises and hashes it in Python, since str.strip() also removes Unicode
 *       whitespace).
 *   hmac_column(key, offsets, data, start, n, wide, out, status, threads=1) -> None
 *       The same with strip, over rows start .. start + n of an Arrow string column: its
 *       offsets buffer (int32, or int64 when `wide`) and data buffer (the UTF-8 bytes); no
 *       Python str is made. Writes into the caller's `out` (32 bytes per row) and `status`
 *       (1 byte per row). Null slots are the caller's to mark missing.
 *   members(digests, wanted) -> bytes
 *       One byte per row, 1 where the row's digest is one of `wanted` (a hash table of them).
 *   duplicates(digests, skip) -> bytes
 *       One byte per row, 1 where the row's digest is also another row's (rows with skip != 0
 *       take no part).
 *
 * No id, digest or count is ever printed or logged here.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#define DIGEST 32
#define BLOCK 64
#define MAX_THREADS 64
#define MIN_ROWS_PER_THREAD 20000

typedef struct {
    SHA256_CTX inner;
    SHA256_CTX outer;
} pads_t;

static int make_pads(const unsigned char *key, Py_ssize_t key_len, pads_t *pads) {
    unsigned char block[BLOCK];
    unsigned char ipad[BLOCK], opad[BLOCK];
    memset(block, 0, BLOCK);
    if (key_len > BLOCK) {
        SHA256(key, (size_t)key_len, block);
    } else if (key_len > 0) {
        memcpy(block, key, (size_t)key_len);
    }
    for (int i = 0; i < BLOCK; i++) {
        ipad[i] = block[i] ^ 0x36;
        opad[i] = block[i] ^ 0x5c;
    }
    if (!SHA256_Init(&pads->inner) || !SHA256_Update(&pads->inner, ipad, BLOCK)
        || !SHA256_Init(&pads->outer) || !SHA256_Update(&pads->outer, opad, BLOCK)) {
        return -1;
    }
    memset(block, 0, BLOCK);
    memset(ipad, 0, BLOCK);
    memset(opad, 0, BLOCK);
    return 0;
}

static inline void hmac_one(const pads_t *pads, const unsigned char *msg, size_t len,
                            unsigned char *out) {
    SHA256_CTX ctx = pads->inner;
    unsigned char inner[DIGEST];
    SHA256_Update(&ctx, msg, len);
    SHA256_Final(inner, &ctx);
    ctx = pads->outer;
    SHA256_Update(&ctx, inner, DIGEST);
    SHA256_Final(out, &ctx);
}

/* Python's str.strip() with no argument removes these ASCII characters (str.isspace). */
static inline int ascii_space(unsigned char c) {
    return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
}

typedef struct {
    const pads_t *pads;
    const char *const *ptrs; /* list mode: UTF-8 of each id, NULL for None */
    const Py_ssize_t *lens;
    const void *offsets; /* column mode: Arrow offsets (int32, or int64 when wide) */
    int wide;
    const unsigned char *data;
    int64_t data_len;
    int strip;
    Py_ssize_t start, stop;
    unsigned char *out;
    unsigned char *status;
} job_t;

/* Hash one id (p, len) into row i: strip first when asked; set its status. */
static inline void hash_value(const job_t *job, Py_ssize_t i, const unsigned char *p,
                              int64_t len) {
    unsigned char *out = job->out + (size_t)i * DIGEST;
    int64_t a = 0, b = len;
    if (p == NULL) { /* None: a missing id */
        memset(out, 0, DIGEST);
        job->status[i] = 1;
        return;
    }
    if (job->strip) {
        while (a < b && ascii_space(p[a])) a++;
        while (b > a && ascii_space(p[b - 1])) b--;
        if (a == b) {
            memset(out, 0, DIGEST);
            job->status[i] = 1;
            return;
        }
        if (p[a] >= 0x80 || p[b - 1] >= 0x80) {
            memset(out, 0, DIGEST);
            job->status[i] = 2;
            return;
        }
    }
    hmac_one(job->pads, p + a, (size_t)(b - a), out);
    job->status[i] = (a == 0 && b == len) ? 0 : 3;
}

static void *run_list(void *arg) {
    job_t *job = (job_t *)arg;
    for (Py_ssize_t i = job->start; i < job->stop; i++) {
        hash_value(job, i, (const unsigned char *)job->ptrs[i], (int64_t)job->lens[i]);
    }
    return NULL;
}

static void *run_column(void *arg) {
    job_t *job = (job_t *)arg;
    const int32_t *o32 = (const int32_t *)job->offsets;
    const int64_t *o64 = (const int64_t *)job->offsets;
    for (Py_ssize_t i = job->start; i < job->stop; i++) {
        int64_t a = job->wide ? o64[i] : o32[i];
        int64_t b = job->wide ? o64[i + 1] : o32[i + 1];
        if (a < 0 || b < a || b > job->data_len) { /* changed since checked: read nothing */
            memset(job->out + (size_t)i * DIGEST, 0, DIGEST);
            job->status[i] = 1;
            continue;
        }
        hash_value(job, i, job->data + a, b - a);
    }
    return NULL;
}

/* Run `fn` over [0, n) in up to `threads` threads (the calling thread takes the first part). */
static void run_parallel(void *(*fn)(void *), const job_t *proto, Py_ssize_t n, int threads) {
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n / MIN_ROWS_PER_THREAD < threads) threads = (int)(n / MIN_ROWS_PER_THREAD);
    if (threads < 1) threads = 1;
    Py_ssize_t step = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        jobs[t] = *proto;
        jobs[t].start = step * t < n ? step * t : n;
        jobs[t].stop = step * (t + 1) < n ? step * (t + 1) : n;
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&ids[t], NULL, fn, &jobs[t]) == 0;
        if (!started[t]) fn(&jobs[t]); /* no thread available: do its part here */
    }
    fn(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
    }
}

static PyObject *hmac_list(PyObject *self, PyObject *args) {
    Py_buffer key;
    PyObject *ids;
    int strip = 0, threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O!|pi", &key, &PyList_Type, &ids, &strip, &threads))
        return NULL;
    pads_t pads;
    int bad_key = make_pads((const unsigned char *)key.buf, key.len, &pads) != 0;
    PyBuffer_Release(&key);
    if (bad_key) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 initialisation failed");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(ids);
    PyObject **items = PyMem_Malloc(sizeof(PyObject *) * (size_t)(n ? n : 1));
    const char **ptrs = PyMem_Malloc(sizeof(char *) * (size_t)(n ? n : 1));
    Py_ssize_t *lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    PyObject *digests = PyBytes_FromStringAndSize(NULL, n * DIGEST);
    PyObject *status = PyBytes_FromStringAndSize(NULL, n);
    PyObject *result = NULL;
    Py_ssize_t held = 0;
    if (items == NULL || ptrs == NULL || lens == NULL || digests == NULL || status == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Own a reference to every item: the list may change while the GIL is released. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(ids, i);
        if (item == Py_None && strip) {
            ptrs[i] = NULL;
            lens[i] = 0;
        } else if (PyUnicode_Check(item)) {
            ptrs[i] = PyUnicode_AsUTF8AndSize(item, &lens[i]);
            if (ptrs[i] == NULL) goto done; /* a lone surrogate: not encodable as UTF-8 */
        } else {
            PyErr_Format(PyExc_TypeError, "pseudonyms: id at position %zd is %.80s, expected "
                         "str%s", i, Py_TYPE(item)->tp_name, strip ? " or None" : "");
            goto done;
        }
        Py_INCREF(item);
        items[held++] = item;
    }
    job_t proto;
    memset(&proto, 0, sizeof proto);
    proto.pads = &pads;
    proto.ptrs = ptrs;
    proto.lens = lens;
    proto.strip = strip;
    proto.out = (unsigned char *)PyBytes_AS_STRING(digests);
    proto.status = (unsigned char *)PyBytes_AS_STRING(status);
    Py_BEGIN_ALLOW_THREADS
    run_parallel(run_list, &proto, n, threads);
    Py_END_ALLOW_THREADS
    result = PyTuple_Pack(2, digests, status);
done:
    for (Py_ssize_t i = 0; i < held; i++) Py_DECREF(items[i]);
    PyMem_Free(items);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_XDECREF(digests);
    Py_XDECREF(status);
    OPENSSL_cleanse(&pads, sizeof pads);
    return result;
}

static PyObject *hmac_column(PyObject *self, PyObject *args) {
    Py_buffer key, offsets, data, out, status;
    Py_ssize_t start, n;
    int wide, threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*nnpw*w*|i", &key, &offsets, &data, &start, &n, &wide,
                          &out, &status, &threads))
        return NULL;
    PyObject *result = NULL;
    pads_t pads;
    memset(&pads, 0, sizeof pads);
    Py_ssize_t width = wide ? (Py_ssize_t)sizeof(int64_t) : (Py_ssize_t)sizeof(int32_t);
    /* start + n + 1 <= offsets, written without an addition that could overflow */
    if (start < 0 || n < 0 || n > offsets.len / width - 1 || start > offsets.len / width - 1 - n) {
        PyErr_SetString(PyExc_ValueError, "pseudonyms: offsets buffer shorter than start + n + 1");
        goto done;
    }
    if (out.len != n * DIGEST || status.len != n) {
        PyErr_SetString(PyExc_ValueError, "pseudonyms: out must hold 32 bytes per row and "
                        "status 1 byte per row");
        goto done;
    }
    const char *base = (const char *)offsets.buf + (size_t)start * (size_t)width;
    /* Offsets must be non-decreasing and inside the data buffer: checked before any read. */
    for (Py_ssize_t i = 0; i <= n; i++) {
        int64_t v = wide ? ((const int64_t *)base)[i] : ((const int32_t *)base)[i];
        int64_t prev = i == 0 ? 0 : (wide ? ((const int64_t *)base)[i - 1]
                                          : ((const int32_t *)base)[i - 1]);
        if (v < 0 || v > (int64_t)data.len || (i > 0 && v < prev)) {
            PyErr_SetString(PyExc_ValueError, "pseudonyms: offsets out of order or range");
            goto done;
        }
    }
    if (make_pads((const unsigned char *)key.buf, key.len, &pads) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 initialisation failed");
        goto done;
    }
    job_t proto;
    memset(&proto, 0, sizeof proto);
    proto.pads = &pads;
    proto.offsets = base;
    proto.wide = wide;
    proto.data = (const unsigned char *)data.buf;
    proto.data_len = (int64_t)data.len;
    proto.strip = 1;
    proto.out = (unsigned char *)out.buf;
    proto.status = (unsigned char *)status.buf;
    /* The buffers stay exported (and alive) until released below. */
    Py_BEGIN_ALLOW_THREADS
    run_parallel(run_column, &proto, n, threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    OPENSSL_cleanse(&pads, sizeof pads);
    PyBuffer_Release(&key);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    PyBuffer_Release(&status);
    return result;
}

/* An open-addressing table of row indices, keyed by a keyed mix of each digest (table_hash).
 * Sized for n rows at most half full; every slot empty (-1). */
static int64_t *table_new(Py_ssize_t n, size_t *size) {
    *size = 1024;
    while (*size < (size_t)n * 2) *size <<= 1;
    int64_t *slots = PyMem_Malloc(sizeof(int64_t) * *size);
    if (slots != NULL) {
        for (size_t s = 0; s < *size; s++) slots[s] = -1;
    }
    return slots;
}

/* Odd multipliers drawn at import: digests taken from the store could be chosen to collide
 * on any fixed bits, which would make every probe walk the whole table. */
static uint64_t table_key[5] = {0x9e3779b97f4a7c15ULL, 0xc2b2ae3d27d4eb4fULL,
                                0x165667b19e3779f9ULL, 0xd6e8feb86659fd93ULL,
                                0xff51afd7ed558ccdULL};

static void table_key_init(void) {
    uint64_t drawn[5];
    if (getrandom(drawn, sizeof drawn, 0) == (ssize_t)sizeof drawn) {
        for (int i = 0; i < 5; i++) table_key[i] = drawn[i] | 1;
    }
}

static inline uint64_t table_hash(const unsigned char *digest) {
    uint64_t w[4];
    memcpy(w, digest, sizeof w);
    uint64_t h = w[0] * table_key[0] + w[1] * table_key[1] + w[2] * table_key[2]
        + w[3] * table_key[3];
    h ^= h >> 32;
    h *= table_key[4];
    return h ^ (h >> 29);
}

/* The slot of the row of `rows` whose digest equals `digest`, or the empty slot it would take. */
static inline size_t table_probe(const int64_t *slots, size_t size, const unsigned char *rows,
                                 const unsigned char *digest) {
    size_t s = (size_t)table_hash(digest) & (size - 1);
    while (slots[s] >= 0 && memcmp(rows + (size_t)slots[s] * DIGEST, digest, DIGEST) != 0) {
        s = (s + 1) & (size - 1);
    }
    return s;
}

static PyObject *members(PyObject *self, PyObject *args) {
    Py_buffer digests, wanted;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &digests, &wanted)) return NULL;
    PyObject *result = NULL;
    int64_t *slots = NULL;
    size_t size = 0;
    if (digests.len % DIGEST != 0 || wanted.len % DIGEST != 0) {
        PyErr_SetString(PyExc_ValueError, "members: digests must be 32 bytes each");
        goto done;
    }
    Py_ssize_t n = digests.len / DIGEST, m = wanted.len / DIGEST;
    result = PyBytes_FromStringAndSize(NULL, n);
    slots = table_new(m, &size);
    if (result == NULL || slots == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *hit = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *d = (const unsigned char *)digests.buf;
    const unsigned char *w = (const unsigned char *)wanted.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < m; j++) {
        size_t s = table_probe(slots, size, w, w + (size_t)j * DIGEST);
        if (slots[s] < 0) slots[s] = j;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        hit[i] = slots[table_probe(slots, size, w, d + (size_t)i * DIGEST)] >= 0;
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(slots);
    PyBuffer_Release(&digests);
    PyBuffer_Release(&wanted);
    return result;
}

static PyObject *duplicates(PyObject *self, PyObject *args) {
    Py_buffer digests, skip;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &digests, &skip)) return NULL;
    PyObject *result = NULL;
    int64_t *slots = NULL;
    size_t size = 0;
    Py_ssize_t n = skip.len;
    if (digests.len != n * DIGEST) {
        PyErr_SetString(PyExc_ValueError, "duplicates: digests must be 32 bytes per row");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, n);
    slots = table_new(n, &size);
    if (result == NULL || slots == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *dup = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *d = (const unsigned char *)digests.buf;
    const unsigned char *sk = (const unsigned char *)skip.buf;
    memset(dup, 0, (size_t)n);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (sk[i]) continue;
        size_t s = table_probe(slots, size, d, d + (size_t)i * DIGEST);
        if (slots[s] >= 0) {
            dup[i] = 1;
            dup[slots[s]] = 1;
        } else {
            slots[s] = i;
        }
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(slots);
    PyBuffer_Release(&digests);
    PyBuffer_Release(&skip);
    return result;
}

static PyMethodDef methods[] = {
    {"hmac_list", hmac_list, METH_VARARGS,
     "hmac_list(key, ids, strip=False, threads=1) -> (digests, status): HMAC-SHA256 of each "
     "id's UTF-8 (32 bytes each) and one status byte per id."},
    {"hmac_column", hmac_column, METH_VARARGS,
     "hmac_column(key, offsets, data, start, n, wide, out, status, threads=1) -> None: "
     "hmac_list(strip=True) over rows start..start+n of an Arrow string column's buffers, "
     "written into out (32 bytes per row) and status (1 byte per row)."},
    {"members", members, METH_VARARGS,
     "members(digests, wanted) -> bytes: 1 where a row's digest is one of `wanted`."},
    {"duplicates", duplicates, METH_VARARGS,
     "duplicates(digests, skip) -> bytes: 1 where a row's digest is also another row's."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "client._pseudonyms",
    "Batch HMAC-SHA256 pseudonyms (OpenSSL), GIL released.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pseudonyms(void) {
    table_key_init();
    return PyModule_Create(&module);
}
