/* The per-event hot path in C: Avro binary encoding and the canonical content hash.
 *
 * Both are optional accelerators with a pure-Python reference beside them:
 *
 *   encode(program, header, record) -> header + the record's Avro binary
 *       Runs an encoding program that schemas/serde.py compiles from a parsed Avro schema
 *       (nested tuples, opcodes from OPCODES). It handles exactly the values the Python
 *       compiled encoder handles and raises Unsupported for anything else, so the caller
 *       falls back to the Python writers and the bytes, or the error, stay fastavro's.
 *
 *   decode(program, data, start) -> (value, end)
 *       The same program read back: the value fastavro.schemaless_reader returns for that
 *       writer schema (no reader schema), and the offset after it. Anything it does not read
 *       exactly as fastavro (a malformed body included) raises, so the caller asks fastavro.
 *
 *   content_hash(fields, flat, ts_text, layout) -> str
 *       Hex SHA-256 of the canonical JSON of schemas.hashing.content_of(fields, flat,
 *       ts_text), written without building that dict. ``layout`` (from schemas/hashing.py)
 *       lists the content keys in sorted order with how each is read. JSON is written as
 *       orjson.dumps(..., OPT_SORT_KEYS) writes it; floats are formatted by orjson itself.
 *       Any value outside plain None/bool/int/float/str/list/dict raises Unsupported.
 *
 *   native_block(plan, header, messages, first, partition, prefix) -> bytes | None
 *       The event sink's fast path: a contiguous run of Kafka messages (Avro bodies under
 *       ``header``) as one ClickHouse Native block, so ClickHouse parses no Avro. The plan
 *       comes from sinks/native.py, which also holds the pure-Python reference encoder.
 *
 * tests/unit/test_speedups.py and tests/unit/test_native.py compare each with its Python
 * reference on generated input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

static PyObject *Unsupported;  /* raised for any value left to the Python path */
static PyObject *orjson_dumps; /* orjson.dumps, for floats in the canonical JSON */
static PyObject *epoch;        /* datetime(1970, 1, 1, tzinfo=UTC) */
static PyObject *str_value;    /* "value" */
static PyObject *str_dict;     /* "__dict__" */

enum {
    OP_NULL, OP_BOOLEAN, OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_STRING, OP_BYTES,
    OP_ENUM, OP_RECORD, OP_ARRAY, OP_MAP, OP_UNION, OP_TIMESTAMP_MICROS,
    OP_TIMESTAMP_MILLIS, /* written as a long (an int; a datetime is left to fastavro), read as a datetime */
};
/* Union branch tests, in the order the Python writer tries them. */
enum { IS_NONE, IS_BOOL, IS_INT, IS_FLOAT, IS_STR, IS_BYTES };
/* Content hash layout kinds. */
enum { KEY_REQUIRED, KEY_OPTIONAL, KEY_TS, KEY_ENUM_VALUE, KEY_FLAT };

/* --- a growable byte buffer ------------------------------------------------- */
typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char small[1024];
} Buf;

static void buf_init(Buf *b) { b->data = b->small; b->len = 0; b->cap = (Py_ssize_t)sizeof b->small; }
static void buf_free(Buf *b) { if (b->data != b->small) PyMem_Free(b->data); }

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + extra) cap *= 2;
    char *d;
    if (b->data == b->small) {
        d = PyMem_Malloc((size_t)cap);
        if (d != NULL) memcpy(d, b->small, (size_t)b->len);
    } else {
        d = PyMem_Realloc(b->data, (size_t)cap);
    }
    if (d == NULL) { PyErr_NoMemory(); return -1; }
    b->data = d;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int buf_byte(Buf *b, char c) {
    if (buf_reserve(b, 1) < 0) return -1;
    b->data[b->len++] = c;
    return 0;
}

/* Unsigned little-endian base-128 (ClickHouse's VarUInt) at ``p``, which has room for 10 bytes;
 * returns the end. */
static inline char *varuint_at(char *p, uint64_t v) {
    while (v > 0x7F) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

static inline int put_varuint(Buf *b, uint64_t v) {
    if (buf_reserve(b, 10) < 0) return -1;
    b->len = varuint_at(b->data + b->len, v) - b->data;
    return 0;
}

/* Avro long: zigzag, then little-endian base-128. */
static inline int put_long(Buf *b, int64_t n) {
    return put_varuint(b, ((uint64_t)n << 1) ^ (uint64_t)(n >> 63));
}

static int unsupported(const char *what) {
    PyErr_SetString(Unsupported, what);
    return -1;
}

/* --- Avro ------------------------------------------------------------------- */
static int write_value(Buf *b, PyObject *op, PyObject *v);

static int write_str(Buf *b, PyObject *v) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n); /* lone surrogates: an error, as str.encode() */
    if (s == NULL) return -1;
    if (put_long(b, n) < 0) return -1;
    return buf_put(b, s, n);
}

static int write_int(Buf *b, PyObject *v, int bits) {
    if (!PyLong_CheckExact(v)) return unsupported("not an int");
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) return unsupported("int out of range");
    if (n == -1 && PyErr_Occurred()) return -1;
    if (bits == 32 && (n < INT32_MIN || n > INT32_MAX)) return unsupported("int out of range");
    return put_long(b, (int64_t)n);
}

static int write_double(Buf *b, PyObject *v, int single) {
    if (!PyFloat_CheckExact(v)) return unsupported("not a float");
    double x = PyFloat_AS_DOUBLE(v);
    if (buf_reserve(b, 8) < 0) return -1;
    if (single) {
        if (PyFloat_Pack4(x, b->data + b->len, 1) < 0) { /* overflow: struct.pack raises too */
            PyErr_Clear();
            return unsupported("float out of range");
        }
        b->len += 4;
    } else {
        if (PyFloat_Pack8(x, b->data + b->len, 1) < 0) return -1;
        b->len += 8;
    }
    return 0;
}

/* A timestamp-micros long from an aware datetime (as fastavro computes it) or an int. The
 * program holds a one-item list with the last (datetime, bytes) pair, replaced whole, so
 * threads sharing the program never see one's datetime with another's bytes: events
 * written together share their time. */
static int write_timestamp(Buf *b, PyObject *memo, PyObject *v) {
    if (PyDateTime_CheckExact(v) && PyDateTime_DATE_GET_TZINFO(v) != Py_None) {
        PyObject *last = PyList_GET_ITEM(memo, 0);
        if (PyTuple_Check(last)) {
            Py_INCREF(last); /* the comparison may run a tzinfo's Python code */
            int same = PyObject_RichCompareBool(v, PyTuple_GET_ITEM(last, 0), Py_EQ);
            int rc = same <= 0 ? same : buf_put(b, PyBytes_AS_STRING(PyTuple_GET_ITEM(last, 1)),
                                                PyBytes_GET_SIZE(PyTuple_GET_ITEM(last, 1)));
            Py_DECREF(last);
            if (rc < 0) return -1;
            if (same) return 0;
        }
        PyObject *delta = PyNumber_Subtract(v, epoch);
        if (delta == NULL) return -1;
        int64_t micros = ((int64_t)PyDateTime_DELTA_GET_DAYS(delta) * 86400 + PyDateTime_DELTA_GET_SECONDS(delta))
                             * 1000000 + PyDateTime_DELTA_GET_MICROSECONDS(delta);
        Py_DECREF(delta);
        Py_ssize_t start = b->len;
        if (put_long(b, micros) < 0) return -1;
        PyObject *pair = Py_BuildValue("(Oy#)", v, b->data + start, b->len - start);
        if (pair == NULL) return -1;
        PyList_SetItem(memo, 0, pair); /* steals */
        return 0;
    }
    if (PyLong_CheckExact(v)) return write_int(b, v, 64);
    return unsupported("not an aware datetime");
}

static int write_record(Buf *b, PyObject *op, PyObject *v) {
    PyObject *fields = PyTuple_GET_ITEM(op, 2);
    PyObject *owned = NULL;
    if (!PyDict_CheckExact(v)) {
        if (PyTuple_GET_ITEM(op, 1) != Py_True) return unsupported("record is not a dict");
        owned = PyObject_GetAttr(v, str_dict);  /* a model whose __dict__ holds the fields */
        if (owned == NULL) return -1;
        if (!PyDict_Check(owned)) { Py_DECREF(owned); return unsupported("record has no field dict"); }
        v = owned;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        PyObject *fv = PyDict_GetItemWithError(v, PyTuple_GET_ITEM(field, 0)); /* borrowed */
        if (fv == NULL) {
            Py_XDECREF(owned);
            if (PyErr_Occurred()) return -1;
            return unsupported("missing field");
        }
        if (write_value(b, PyTuple_GET_ITEM(field, 1), fv) < 0) { Py_XDECREF(owned); return -1; }
    }
    Py_XDECREF(owned);
    return 0;
}

static int write_union(Buf *b, PyObject *op, PyObject *v) {
    int test;
    if (v == Py_None) test = IS_NONE;
    else if (PyBool_Check(v)) test = IS_BOOL;
    else if (PyLong_CheckExact(v)) test = IS_INT;
    else if (PyFloat_CheckExact(v)) test = IS_FLOAT;
    else if (PyUnicode_CheckExact(v)) test = IS_STR;
    else if (PyBytes_CheckExact(v)) test = IS_BYTES;
    else return unsupported("no union branch for this type");
    PyObject *branches = PyTuple_GET_ITEM(op, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(branches);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *branch = PyTuple_GET_ITEM(branches, i); /* (test, index, program) */
        if (PyLong_AsLong(PyTuple_GET_ITEM(branch, 0)) != test) continue;
        if (put_long(b, PyLong_AsLongLong(PyTuple_GET_ITEM(branch, 1))) < 0) return -1;
        return test == IS_NONE ? 0 : write_value(b, PyTuple_GET_ITEM(branch, 2), v);
    }
    return unsupported("no union branch for this type");
}

static int write_value(Buf *b, PyObject *op, PyObject *v) {
    switch (PyLong_AsLong(PyTuple_GET_ITEM(op, 0))) {
    case OP_NULL:
        return v == Py_None ? 0 : unsupported("not null");
    case OP_BOOLEAN:
        if (v == Py_True) return buf_byte(b, 1);
        if (v == Py_False) return buf_byte(b, 0);
        return unsupported("not a bool");
    case OP_INT:
        return write_int(b, v, 32);
    case OP_LONG:
    case OP_TIMESTAMP_MILLIS:
        return write_int(b, v, 64);
    case OP_FLOAT:
        return write_double(b, v, 1);
    case OP_DOUBLE:
        return write_double(b, v, 0);
    case OP_STRING:
        if (!PyUnicode_CheckExact(v)) return unsupported("not a str");
        return write_str(b, v);
    case OP_BYTES:
        if (!PyBytes_CheckExact(v)) return unsupported("not bytes");
        if (put_long(b, PyBytes_GET_SIZE(v)) < 0) return -1;
        return buf_put(b, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    case OP_ENUM: {
        if (!PyUnicode_Check(v)) return unsupported("enum symbol is not a str");
        PyObject *index = PyDict_GetItemWithError(PyTuple_GET_ITEM(op, 1), v);
        if (index == NULL) return PyErr_Occurred() ? -1 : unsupported("unknown enum symbol");
        return put_long(b, PyLong_AsLongLong(index));
    }
    case OP_RECORD:
        return write_record(b, op, v);
    case OP_ARRAY: {
        if (!PyList_CheckExact(v)) return unsupported("not a list");
        Py_ssize_t n = PyList_GET_SIZE(v);
        if (n) {
            if (put_long(b, n) < 0) return -1;
            PyObject *items = PyTuple_GET_ITEM(op, 1);
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
                PyObject *item = PyList_GET_ITEM(v, i);
                Py_INCREF(item);
                int rc = write_value(b, items, item);
                Py_DECREF(item);
                if (rc < 0) return -1;
            }
        }
        return buf_byte(b, 0);
    }
    case OP_MAP: {
        if (!PyDict_CheckExact(v)) return unsupported("not a dict");
        Py_ssize_t n = PyDict_GET_SIZE(v);
        if (n) {
            if (put_long(b, n) < 0) return -1;
            PyObject *values = PyTuple_GET_ITEM(op, 1), *key, *item;
            Py_ssize_t pos = 0;
            while (PyDict_Next(v, &pos, &key, &item)) {
                if (!PyUnicode_CheckExact(key)) return unsupported("map key is not a str");
                if (write_str(b, key) < 0) return -1;
                Py_INCREF(item);
                int rc = write_value(b, values, item);
                Py_DECREF(item);
                if (rc < 0) return -1;
            }
        }
        return buf_byte(b, 0);
    }
    case OP_UNION:
        return write_union(b, op, v);
    case OP_TIMESTAMP_MICROS:
        return write_timestamp(b, PyTuple_GET_ITEM(op, 1), v);
    default:
        PyErr_SetString(PyExc_SystemError, "bad Avro program");
        return -1;
    }
}

static PyObject *py_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "encode(program, header: bytes, record)");
        return NULL;
    }
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    if (buf_put(&b, PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1])) == 0 && write_value(&b, args[0], args[2]) == 0)
        result = PyBytes_FromStringAndSize(b.data, b.len);
    buf_free(&b);
    return result;
}

/* --- SHA-256 (FIPS 180-4) ----------------------------------------------------- */
static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI 1

/* The same compression with the CPU's SHA extensions (Intel SHA-NI, AMD since Zen): the
 * 64 rounds in 16 steps of four, the message schedule with sha256msg1/msg2. */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_block_ni(uint32_t h[8], const unsigned char *p) {
    const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1); /* CDAB */
    __m128i state1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B); /* EFGH */
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);    /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);          /* CDGH */
    const __m128i abef = state0, cdgh = state1;
    __m128i w[4];
    for (int g = 0; g < 16; g++) {
        if (g < 4) {
            w[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), mask);
        } else { /* w[t] = s1(w[t-2]) + w[t-7] + s0(w[t-15]) + w[t-16], four at a time */
            __m128i x = _mm_sha256msg1_epu32(w[g % 4], w[(g + 1) % 4]);
            x = _mm_add_epi32(x, _mm_alignr_epi8(w[(g + 3) % 4], w[(g + 2) % 4], 4));
            w[g % 4] = _mm_sha256msg2_epu32(x, w[(g + 3) % 4]);
        }
        __m128i msg = _mm_add_epi32(w[g % 4], _mm_loadu_si128((const __m128i *)&K256[4 * g]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
        state0 = _mm_sha256rnds2_epu32(state0, state1, _mm_shuffle_epi32(msg, 0x0E));
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
    tmp = _mm_shuffle_epi32(state0, 0x1B);          /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);       /* DCHG */
    state0 = _mm_blend_epi16(tmp, state1, 0xF0);    /* DCBA */
    state1 = _mm_alignr_epi8(state1, tmp, 8);       /* HGFE */
    _mm_storeu_si128((__m128i *)&h[0], state0);
    _mm_storeu_si128((__m128i *)&h[4], state1);
}

static int cpu_has_sha_ni(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSSE3) || !(c & bit_SSE4_1)) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 29) & 1;
}
#else
#define HAVE_SHA_NI 0
#endif

typedef void (*sha256_block_fn)(uint32_t h[8], const unsigned char *p);
static sha256_block_fn sha256_fast_block = sha256_block; /* the SHA-NI one when the CPU has it */

static PyObject *sha256_hex_with(sha256_block_fn block, const char *data, Py_ssize_t len) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    const unsigned char *p = (const unsigned char *)data;
    Py_ssize_t left = len;
    while (left >= 64) { block(h, p); p += 64; left -= 64; }
    unsigned char tail[128] = {0};
    memcpy(tail, p, (size_t)left);
    tail[left] = 0x80;
    int blocks = left < 56 ? 1 : 2;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[blocks * 64 - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (int i = 0; i < blocks; i++) block(h, tail + 64 * i);
    static const char hex[] = "0123456789abcdef";
    char out[64];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) out[8 * i + j] = hex[(h[i] >> (28 - 4 * j)) & 0xF];
    return PyUnicode_FromStringAndSize(out, 64);
}

static PyObject *sha256_hex(const char *data, Py_ssize_t len) { return sha256_hex_with(sha256_fast_block, data, len); }

/* --- canonical JSON (orjson's output for these types, keys sorted) ----------- */
static int json_value(Buf *b, PyObject *v, int depth);

static int json_str(Buf *b, PyObject *v) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) return -1;
    static const char hex[] = "0123456789abcdef";
    if (buf_reserve(b, n * 6 + 2) < 0) return -1;
    char *o = b->data + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') { *o++ = (char)c; continue; }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u'; *o++ = '0'; *o++ = '0'; *o++ = hex[c >> 4]; *o++ = hex[c & 0xF];
        }
    }
    *o++ = '"';
    b->len = o - b->data;
    return 0;
}

static int key_order(const void *x, const void *y) {
    PyObject *a = *(PyObject *const *)x, *c = *(PyObject *const *)y;
    Py_ssize_t na, nc;
    const char *sa = PyUnicode_AsUTF8AndSize(a, &na), *sc = PyUnicode_AsUTF8AndSize(c, &nc);
    int r = memcmp(sa, sc, (size_t)(na < nc ? na : nc));
    if (r) return r;
    return na < nc ? -1 : na > nc;
}

static int json_dict(Buf *b, PyObject *v, int depth) {
    Py_ssize_t n = PyDict_GET_SIZE(v), pos = 0, i = 0;
    PyObject *key, *item, *small[32];
    PyObject **keys = n <= 32 ? small : PyMem_Malloc(sizeof(PyObject *) * (size_t)n);
    if (keys == NULL) { PyErr_NoMemory(); return -1; }
    int rc = -1;
    while (PyDict_Next(v, &pos, &key, &item)) {
        /* UTF-8 of every key up front, so the comparison below cannot fail */
        if (!PyUnicode_CheckExact(key)) { unsupported("key is not a str"); goto done; }
        if (PyUnicode_AsUTF8AndSize(key, NULL) == NULL) goto done;
        keys[i++] = key;
    }
    qsort(keys, (size_t)n, sizeof(PyObject *), key_order);
    if (buf_byte(b, '{') < 0) goto done;
    for (i = 0; i < n; i++) {
        if (i && buf_byte(b, ',') < 0) goto done;
        if (json_str(b, keys[i]) < 0 || buf_byte(b, ':') < 0) goto done;
        item = PyDict_GetItemWithError(v, keys[i]);
        if (item == NULL) { if (!PyErr_Occurred()) unsupported("dict changed"); goto done; }
        if (json_value(b, item, depth + 1) < 0) goto done;
    }
    rc = buf_byte(b, '}');
done:
    if (keys != small) PyMem_Free(keys);
    return rc;
}

static int json_value(Buf *b, PyObject *v, int depth) {
    if (depth > 64) return unsupported("too deep");
    if (v == Py_None) return buf_put(b, "null", 4);
    if (v == Py_True) return buf_put(b, "true", 4);
    if (v == Py_False) return buf_put(b, "false", 5);
    if (PyUnicode_CheckExact(v)) return json_str(b, v);
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) return unsupported("int out of range");
        if (n == -1 && PyErr_Occurred()) return -1;
        char text[24];
        int len = snprintf(text, sizeof text, "%lld", n);
        return buf_put(b, text, len);
    }
    if (PyFloat_CheckExact(v)) { /* orjson's own float text */
        PyObject *text = PyObject_CallOneArg(orjson_dumps, v);
        if (text == NULL) return -1;
        int rc = buf_put(b, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text));
        Py_DECREF(text);
        return rc;
    }
    if (PyList_CheckExact(v)) {
        if (buf_byte(b, '[') < 0) return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
            if (i && buf_byte(b, ',') < 0) return -1;
            PyObject *item = PyList_GET_ITEM(v, i);
            Py_INCREF(item);
            int rc = json_value(b, item, depth + 1);
            Py_DECREF(item);
            if (rc < 0) return -1;
        }
        return buf_byte(b, ']');
    }
    if (PyDict_CheckExact(v)) return json_dict(b, v, depth);
    return unsupported("not a plain JSON value");
}

static PyObject *py_content_hash(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyDict_CheckExact(args[1]) || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "content_hash(fields: dict, flat: dict, ts_text: str | None, layout: tuple)");
        return NULL;
    }
    PyObject *fields = args[0], *flat = args[1], *ts_text = args[2], *layout = args[3];
    if (ts_text != Py_None && !PyUnicode_CheckExact(ts_text)) {
        unsupported("ts_text is not a str");
        return NULL;
    }
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    int first = 1;
    if (buf_byte(&b, '{') < 0) goto done;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(layout); i++) {
        PyObject *entry = PyTuple_GET_ITEM(layout, i); /* (key, kind) in sorted key order */
        PyObject *key = PyTuple_GET_ITEM(entry, 0);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
        PyObject *v, *owned = NULL;
        if (kind == KEY_FLAT) {
            v = flat;
        } else if (kind == KEY_TS && ts_text != Py_None) {
            v = ts_text;
        } else {
            v = PyDict_GetItemWithError(fields, key);
            if (v == NULL && PyErr_Occurred()) goto done;
            if (kind == KEY_OPTIONAL && (v == NULL || v == Py_None)) continue;
            if (v == NULL) { unsupported("missing field"); goto done; }
            if (kind == KEY_TS) { unsupported("ts_text is needed"); goto done; }
            /* A StrEnum member is a str whose text is its value: read as it is. */
            if (kind == KEY_ENUM_VALUE && !PyUnicode_Check(v)) {
                owned = v = PyObject_GetAttr(v, str_value);
                if (v == NULL) goto done;
            }
        }
        int rc = (first ? 0 : buf_byte(&b, ',')) < 0 || json_str(&b, key) < 0 || buf_byte(&b, ':') < 0
                 || (kind == KEY_ENUM_VALUE ? json_str(&b, v) : json_value(&b, v, 1)) < 0;
        Py_XDECREF(owned);
        if (rc) goto done;
        first = 0;
    }
    if (buf_byte(&b, '}') < 0) goto done;
    result = sha256_hex(b.data, b.len);
done:
    buf_free(&b);
    return result;
}

static PyObject *py_canonical_json(PyObject *self, PyObject *v) {
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    if (json_value(&b, v, 0) == 0) result = PyBytes_FromStringAndSize(b.data, b.len);
    buf_free(&b);
    return result;
}

static PyObject *py_sha256_hex(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sha256_hex(data: bytes, portable: bool = False)");
        return NULL;
    }
    int portable = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (portable < 0) return NULL;
    return sha256_hex_with(portable ? sha256_block : sha256_fast_block, PyBytes_AS_STRING(args[0]),
                           PyBytes_GET_SIZE(args[0]));
}

/* --- the bulk path: schemas.bulk.BulkEncoder._fast for a whole list ------------ */
static PyObject *s_payload, *s_text, *s_comment, *s_corrected, *s_extra, *s_ts, *s_severity, *s_tags, *s_hash,
    *s_event_id, *s_user_id, *s_client_ip, *s_source;

typedef struct {
    PyObject *rules, *check, *validation_error, *now, *now_text, *random, *record_defaults, *severity, *to_utc, *format_ts,
        *ts_min, *ts_max, *redact, *program, *header, *layout, *hash_fallback, *encode_fallback, *accepted;
} Bulk;

static PyObject *uuid4_text(const unsigned char *r) {
    static const char hex[] = "0123456789abcdef";
    char out[36];
    int o = 0;
    for (int i = 0; i < 16; i++) {
        unsigned char c = r[i];
        if (i == 6) c = (c & 0x0F) | 0x40; /* version 4 */
        if (i == 8) c = (c & 0x3F) | 0x80; /* RFC 4122 variant */
        if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
        out[o++] = hex[c >> 4];
        out[o++] = hex[c & 0xF];
    }
    return PyUnicode_FromStringAndSize(out, 36);
}

/* The payload as the record holds it, and the flat payload the hash reads; 0 on success, 1
 * when the model must decide, -1 on error. New references in *record_payload and *flat.
 * ``item`` is what pydantic checked (NULL after the pre-check, which converts nothing). */
static int split_payload(PyObject *fields, PyObject *item, PyObject **record_payload, PyObject **flat) {
    PyObject *extra = PyDict_GetItemWithError(fields, s_payload); /* borrowed */
    if (extra == NULL && PyErr_Occurred()) return -1;
    PyObject *free_text[3] = {NULL, NULL, NULL}; /* owned; NULL for None */
    PyObject *names[3] = {s_text, s_comment, s_corrected};
    *record_payload = *flat = NULL;
    if (extra != NULL && PyDict_Check(extra) && PyDict_GET_SIZE(extra)) {
        PyObject *given = item == NULL ? NULL : PyObject_GetItem(item, s_payload), *key, *value;
        if (given == NULL && item != NULL) return -1;
        Py_ssize_t pos = 0;
        while (given != NULL && PyDict_Next(extra, &pos, &key, &value)) {
            /* A float the check made from an int (e.g. one past the 64-bit range): the model refuses it. */
            if (!PyFloat_CheckExact(value)) continue;
            PyObject *original = PyObject_GetItem(given, key);
            if (original == NULL) { Py_DECREF(given); return -1; }
            int differs = !PyFloat_CheckExact(original);
            Py_DECREF(original);
            if (differs) { Py_DECREF(given); return 1; }
        }
        Py_XDECREF(given);
        Py_INCREF(extra);
        for (int i = 0; i < 3; i++) {
            PyObject *v = PyDict_GetItemWithError(extra, names[i]);
            if (v == NULL) { if (PyErr_Occurred()) goto fail; continue; }
            if (v != Py_None && !PyUnicode_CheckExact(v)) goto decide; /* "payload.<name>: must be a string" */
            if (v != Py_None) free_text[i] = Py_NewRef(v);
            if (PyDict_DelItem(extra, names[i]) < 0) goto fail;
        }
        *flat = PyDict_Copy(extra);
        if (*flat == NULL) goto fail;
        for (int i = 0; i < 3; i++)
            if (free_text[i] != NULL && PyDict_SetItem(*flat, names[i], free_text[i]) < 0) goto fail;
    } else {
        extra = PyDict_New();
        *flat = PyDict_New();
        if (extra == NULL || *flat == NULL) goto fail;
    }
    *record_payload = PyDict_New();
    if (*record_payload == NULL) goto fail;
    for (int i = 0; i < 3; i++)
        if (PyDict_SetItem(*record_payload, names[i], free_text[i] != NULL ? free_text[i] : Py_None) < 0) goto fail;
    if (PyDict_SetItem(*record_payload, s_extra, extra) < 0) goto fail;
    for (int i = 0; i < 3; i++) Py_XDECREF(free_text[i]);
    Py_DECREF(extra);
    return 0;
decide:
    for (int i = 0; i < 3; i++) Py_XDECREF(free_text[i]);
    Py_DECREF(extra);
    return 1;
fail:
    for (int i = 0; i < 3; i++) Py_XDECREF(free_text[i]);
    Py_XDECREF(extra);
    Py_CLEAR(*flat);
    Py_CLEAR(*record_payload);
    return -1;
}

/* primary[name], else secondary[name] (borrowed; NULL without an error when neither has it). */
static PyObject *layered(PyObject *primary, PyObject *secondary, PyObject *name) {
    PyObject *v = PyDict_GetItemWithError(primary, name);
    if (v == NULL && !PyErr_Occurred()) v = PyDict_GetItemWithError(secondary, name);
    return v;
}

/* A top-level record program written from the fields over the defaults, as if merged. */
static int write_layered(Buf *b, PyObject *op, PyObject *primary, PyObject *secondary) {
    if (PyLong_AsLong(PyTuple_GET_ITEM(op, 0)) != OP_RECORD) return unsupported("not a record");
    PyObject *fields = PyTuple_GET_ITEM(op, 2);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        PyObject *v = layered(primary, secondary, PyTuple_GET_ITEM(field, 0));
        if (v == NULL) return PyErr_Occurred() ? -1 : unsupported("missing field");
        Py_INCREF(v);
        int rc = write_value(b, PyTuple_GET_ITEM(field, 1), v);
        Py_DECREF(v);
        if (rc < 0) return -1;
    }
    return 0;
}

/* --- the pre-check: pydantic's answer for the plainest items, without pydantic -------
 * ``rules`` maps each field of the model to (kind, required, nullable, a, b, c, d), and None
 * to the names of the required fields, compiled by schemas/bulk.py from
 * FeedbackEvent.model_fields (None: no item's key can be it; keys must be exact str). Only exact built-in types inside the
 * bounds pass (as pydantic would keep them); anything else, including every value pydantic
 * would convert or refuse, leaves the item to pydantic. */
enum { RULE_STR, RULE_FLOAT, RULE_BOOL, RULE_DATETIME, RULE_ENUM, RULE_STR_LIST, RULE_SCALAR_MAP };

static int in_length(PyObject *v, PyObject *lo, PyObject *hi) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    return n >= PyLong_AsSsize_t(lo) && (hi == Py_None || n <= PyLong_AsSsize_t(hi));
}

/* A new reference to the value as pydantic would give it, Py_None's absence meaning
 * "undecided": returns NULL without an error set. */
static PyObject *precheck_value(PyObject *rule, PyObject *v) {
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(rule, 0));
    PyObject *a = PyTuple_GET_ITEM(rule, 3), *b = PyTuple_GET_ITEM(rule, 4);
    if (v == Py_None) return PyTuple_GET_ITEM(rule, 2) == Py_True ? Py_NewRef(v) : NULL;
    switch (kind) {
    case RULE_STR:
        return PyUnicode_CheckExact(v) && in_length(v, a, b) ? Py_NewRef(v) : NULL;
    case RULE_FLOAT: { /* (lo, lo_strict, hi, hi_strict) in a..d; None for no bound */
        if (!PyFloat_CheckExact(v)) return NULL;
        double x = PyFloat_AS_DOUBLE(v);
        PyObject *c = PyTuple_GET_ITEM(rule, 5), *d = PyTuple_GET_ITEM(rule, 6);
        if (!isfinite(x)) return NULL;
        if (a != Py_None && (b == Py_True ? !(x > PyFloat_AsDouble(a)) : !(x >= PyFloat_AsDouble(a)))) return NULL;
        if (c != Py_None && (d == Py_True ? !(x < PyFloat_AsDouble(c)) : !(x <= PyFloat_AsDouble(c)))) return NULL;
        return Py_NewRef(v);
    }
    case RULE_BOOL:
        return PyBool_Check(v) ? Py_NewRef(v) : NULL;
    case RULE_DATETIME:
        return PyDateTime_CheckExact(v) ? Py_NewRef(v) : NULL;
    case RULE_ENUM: { /* a: {value: member}, b: the enum class */
        if (Py_TYPE(v) == (PyTypeObject *)b) return Py_NewRef(v);
        if (!PyUnicode_CheckExact(v)) return NULL;
        PyObject *member = PyDict_GetItemWithError(a, v);
        return member == NULL ? NULL : Py_NewRef(member);
    }
    case RULE_STR_LIST: { /* a: most items, b: longest item */
        if (!PyList_CheckExact(v) || PyList_GET_SIZE(v) > PyLong_AsSsize_t(a)) return NULL;
        Py_ssize_t n = PyList_GET_SIZE(v);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *s = PyList_GET_ITEM(v, i);
            if (!PyUnicode_CheckExact(s) || PyUnicode_GET_LENGTH(s) > PyLong_AsSsize_t(b)) return NULL;
        }
        return PyList_GetSlice(v, 0, n); /* pydantic gives a new list */
    }
    case RULE_SCALAR_MAP: { /* str keys; None, bool, 64-bit int, finite float or str values */
        if (!PyDict_CheckExact(v)) return NULL;
        PyObject *key, *item;
        Py_ssize_t pos = 0;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (!PyUnicode_CheckExact(key)) return NULL;
            if (item == Py_None || PyBool_Check(item) || PyUnicode_CheckExact(item)) continue;
            if (PyFloat_CheckExact(item) && isfinite(PyFloat_AS_DOUBLE(item))) continue;
            if (PyLong_CheckExact(item)) {
                int overflow;
                PyLong_AsLongLongAndOverflow(item, &overflow);
                if (!overflow) continue;
            }
            return NULL;
        }
        return PyDict_Copy(v); /* a fresh dict, as pydantic gives */
    }
    }
    return NULL;
}

/* The validated fields of a plain item (a new dict), or NULL: with an error set on failure,
 * without one when pydantic must decide. */
static int precheck_into(PyObject *fields, PyObject *rules, PyObject *key, PyObject *value) {
    if (!PyUnicode_CheckExact(key)) return 1; /* (and no Python __hash__ runs mid-iteration) */
    PyObject *rule = PyDict_GetItemWithError(rules, key); /* an unknown field: pydantic refuses it */
    if (rule == NULL) return 1;
    PyObject *checked = precheck_value(rule, value);
    if (checked == NULL) return 1;
    int rc = PyDict_SetItem(fields, key, checked);
    Py_DECREF(checked);
    return rc < 0 ? 1 : 0;
}

/* The validated fields of a plain item (a new dict), or NULL: with an error set on failure,
 * without one when pydantic must decide. With ``defaults`` (a non-empty dict) the item is
 * read as {**defaults, **{k: v for k, v in item.items() if v is not None}}, unbuilt. */
static PyObject *precheck(PyObject *rules, PyObject *item, PyObject *defaults) {
    PyObject *fields = PyDict_New(), *key, *value;
    if (fields == NULL) return NULL;
    Py_ssize_t pos = 0;
    while (PyDict_Next(item, &pos, &key, &value))
        if (!(defaults != NULL && value == Py_None) && precheck_into(fields, rules, key, value)) goto undecided;
    if (defaults != NULL) {
        pos = 0;
        while (PyDict_Next(defaults, &pos, &key, &value)) {
            int present = PyDict_Contains(fields, key);
            if (present < 0 || (!present && precheck_into(fields, rules, key, value))) goto undecided;
        }
    }
    PyObject *required = PyDict_GetItem(rules, Py_None); /* the names of the required fields */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(required); i++)
        if (PyDict_Contains(fields, PyTuple_GET_ITEM(required, i)) != 1) goto undecided;
    return fields;
undecided:
    Py_DECREF(fields);
    PyErr_Clear();
    return NULL;
}

/* {**defaults, **{k: v for k, v in item.items() if v is not None}} */
static PyObject *merge_defaults(PyObject *item, PyObject *defaults) {
    if (defaults == NULL) return Py_NewRef(item);
    PyObject *merged = PyDict_Copy(defaults), *key, *value;
    if (merged == NULL) return NULL;
    Py_ssize_t pos = 0;
    while (PyDict_Next(item, &pos, &key, &value))
        if (value != Py_None && PyDict_SetItem(merged, key, value) < 0) { Py_DECREF(merged); return NULL; }
    return merged;
}

/* One item and the defaults (NULL for none): a new Accepted, Py_None when the model must
 * decide (the caller then runs FeedbackEvent.model_validate on *merged, the item with its
 * defaults, set then), or NULL on error. */
static PyObject *bulk_one(Bulk *k, PyObject *item, PyObject *defaults, const unsigned char *random,
                          PyObject **merged) {
    PyObject *fields = k->rules == Py_None ? NULL : precheck(k->rules, item, defaults);
    if (fields == NULL) { /* pydantic's check, on the item as merged with its defaults */
        *merged = merge_defaults(item, defaults);
        if (*merged == NULL) return NULL;
        item = *merged;
        fields = PyObject_CallOneArg(k->check, item);
    }
    if (fields == NULL) {
        if (!PyErr_ExceptionMatches(k->validation_error)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE; /* the model says why (or accepts what this check is too strict for) */
    }
    PyObject *payload = NULL, *flat = NULL, *ts_text = NULL, *digest = NULL, *event_id = NULL, *record = NULL,
             *key = NULL, *value = NULL, *result = NULL;
    if (!PyDict_CheckExact(fields)) { PyErr_SetString(PyExc_TypeError, "the check returned no dict"); goto done; }
    /* Only pydantic turns a payload int into a float: the pre-check keeps values as they are. */
    int rc = split_payload(fields, *merged != NULL ? item : NULL, &payload, &flat);
    if (rc < 0) goto done;
    if (rc > 0) { result = Py_NewRef(Py_None); goto done; }
    if (PyDict_SetItem(fields, s_payload, payload) < 0) goto done;

    PyObject *ts = PyDict_GetItemWithError(fields, s_ts);
    if (ts == NULL && PyErr_Occurred()) goto done;
    if (ts == NULL || ts == Py_None) {
        if (PyDict_SetItem(fields, s_ts, k->now) < 0) goto done;
        ts_text = Py_NewRef(k->now_text);
    } else {
        PyObject *utc = PyObject_CallOneArg(k->to_utc, ts);
        if (utc == NULL) goto done;
        int stored = PyDict_SetItem(fields, s_ts, utc);
        int low = stored < 0 ? -1 : PyObject_RichCompareBool(k->ts_min, utc, Py_LE);
        int high = low <= 0 ? low : PyObject_RichCompareBool(utc, k->ts_max, Py_LE);
        if (high > 0) ts_text = PyObject_CallOneArg(k->format_ts, utc);
        Py_DECREF(utc);
        if (high < 0 || (high > 0 && ts_text == NULL)) goto done;
        if (high == 0) { result = Py_NewRef(Py_None); goto done; }
    }
    if (PyDict_SetDefault(fields, s_severity, k->severity) == NULL) goto done;
    if (!PyDict_Contains(fields, s_tags)) {
        PyObject *tags = PyList_New(0);
        if (tags == NULL || PyDict_SetItem(fields, s_tags, tags) < 0) { Py_XDECREF(tags); goto done; }
        Py_DECREF(tags);
    }
    PyObject *stated = PyDict_GetItemWithError(fields, s_hash); /* borrowed */
    if (stated == NULL && PyErr_Occurred()) goto done;
    int given = stated == NULL ? 0 : PyObject_IsTrue(stated);
    if (given < 0) goto done;
    if (given) {
        digest = Py_NewRef(stated);
    } else {
        PyObject *args[4] = {fields, flat, ts_text, k->layout};
        digest = py_content_hash(NULL, args, 4);
        if (digest == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) goto done;
            PyErr_Clear(); /* a value the C writer leaves to orjson: the Python hash */
            digest = PyObject_CallFunctionObjArgs(k->hash_fallback, fields, flat, ts_text, NULL);
            if (digest == NULL) goto done;
        }
        if (PyDict_SetItem(fields, s_hash, digest) < 0) goto done;
    }
    event_id = PyDict_GetItemWithError(fields, s_event_id);
    if (event_id == NULL && PyErr_Occurred()) goto done;
    if (event_id == NULL) {
        event_id = uuid4_text(random);
        if (event_id == NULL || PyDict_SetItem(fields, s_event_id, event_id) < 0) goto done;
    } else {
        Py_INCREF(event_id);
    }
    if (k->redact != Py_None) { /* the record's payload as written: the hash above is the event's own */
        PyObject *redacted = PyObject_CallOneArg(k->redact, payload);
        if (redacted == NULL) goto done;
        rc = PyDict_SetItem(fields, s_payload, redacted);
        Py_DECREF(redacted);
        if (rc < 0) goto done;
    }
    /* The record is the fields over the model's defaults: read through both, not built. */
    PyObject *subject = NULL, *names[3] = {s_user_id, s_client_ip, s_source};
    for (int i = 0; i < 3; i++) {
        subject = layered(fields, k->record_defaults, names[i]);
        if (subject == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, names[i]);
            goto done;
        }
        int truthy = PyObject_IsTrue(subject);
        if (truthy < 0) goto done;
        if (truthy || i == 2) break;
    }
    key = PyUnicode_Check(subject) ? PyUnicode_AsUTF8String(subject) : PyObject_CallMethod(subject, "encode", NULL);
    if (key == NULL) goto done;
    if (k->program != Py_None) {
        Buf b;
        buf_init(&b);
        if (buf_put(&b, PyBytes_AS_STRING(k->header), PyBytes_GET_SIZE(k->header)) == 0
            && write_layered(&b, k->program, fields, k->record_defaults) == 0)
            value = PyBytes_FromStringAndSize(b.data, b.len);
        buf_free(&b);
    }
    if (value == NULL) {
        PyErr_Clear(); /* a value the C encoder leaves to the serde (and so to fastavro) */
        record = PyDict_Copy(k->record_defaults);
        if (record == NULL || PyDict_Update(record, fields) < 0) goto done;
        value = PyObject_CallOneArg(k->encode_fallback, record);
        if (value == NULL) goto done;
    }
    PyObject *tuple = PyTuple_Pack(4, event_id, digest, key, value);
    if (tuple == NULL) goto done;
    /* tuple.__new__(Accepted, tuple): a NamedTuple is a tuple subclass; its Python __new__ costs more */
    PyObject *targs = PyTuple_Pack(1, tuple);
    Py_DECREF(tuple);
    if (targs == NULL) goto done;
    result = PyTuple_Type.tp_new((PyTypeObject *)k->accepted, targs, NULL);
    Py_DECREF(targs);
done:
    Py_DECREF(fields);
    Py_XDECREF(payload);
    Py_XDECREF(flat);
    Py_XDECREF(ts_text);
    Py_XDECREF(digest);
    Py_XDECREF(event_id);
    Py_XDECREF(record);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return result;
}

/* {field name: 7-tuple rule, None: tuple of the required names} */
static int valid_rules(PyObject *rules) {
    if (!PyDict_CheckExact(rules)) return 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(rules, &pos, &key, &value))
        if (key == Py_None ? !PyTuple_Check(value) : !(PyTuple_Check(value) && PyTuple_GET_SIZE(value) == 7)) return 0;
    return PyDict_GetItem(rules, Py_None) != NULL;
}

/* bulk_encode(items, defaults, context) -> list: per item an Accepted, the (merged) item
 * itself when the model must decide, or None when the item is not a dict. */
static PyObject *py_bulk_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Bulk k;
    if (nargs != 3 || !PyList_Check(args[0]) || !PyTuple_Check(args[2])
        || !PyArg_ParseTuple(args[2], "OOOOOOOOOOOOOOOOOOO", &k.rules, &k.check, &k.validation_error, &k.now, &k.now_text,
                             &k.random, &k.record_defaults, &k.severity, &k.to_utc, &k.format_ts, &k.ts_min,
                             &k.ts_max, &k.redact, &k.program, &k.header, &k.layout, &k.hash_fallback,
                             &k.encode_fallback, &k.accepted)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bulk_encode(items: list, defaults, context: tuple)");
        return NULL;
    }
    PyObject *items = args[0], *defaults = args[1];
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (!PyBytes_Check(k.random) || PyBytes_GET_SIZE(k.random) < 16 * n || !PyDict_Check(k.record_defaults)
        || !PyUnicode_Check(k.now_text) || !PyTuple_Check(k.layout) || !PyBytes_Check(k.header)
        || (defaults != Py_None && !PyDict_Check(defaults)) || !PyType_Check(k.accepted)
        || !PyType_IsSubtype((PyTypeObject *)k.accepted, &PyTuple_Type)
        || (k.rules != Py_None && !valid_rules(k.rules))) {
        PyErr_SetString(PyExc_TypeError, "bulk_encode: bad context");
        return NULL;
    }
    const unsigned char *random = (const unsigned char *)PyBytes_AS_STRING(k.random);
    PyObject *given = defaults != Py_None && PyDict_GET_SIZE(defaults) ? defaults : NULL; /* as `if defaults:` */
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i), *merged, *result;
        if (!PyDict_Check(item)) {
            PyList_SET_ITEM(out, i, Py_NewRef(Py_None));
            continue;
        }
        merged = NULL;
        result = bulk_one(&k, item, given, random + 16 * i, &merged);
        if (result == Py_None && merged == NULL) { /* undecided after the pre-check passed */
            merged = merge_defaults(item, given);
            if (merged == NULL) { Py_DECREF(result); goto fail; }
        }
        if (result == NULL) { Py_XDECREF(merged); goto fail; }
        if (result == Py_None) {
            Py_DECREF(result);
            result = merged; /* the model decides this one */
        } else {
            Py_XDECREF(merged);
        }
        PyList_SET_ITEM(out, i, result);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* --- Avro -> ClickHouse Native ------------------------------------------------
 *
 * native_block(plan, header, messages, first, partition, prefix) -> prefix + one Native block
 *
 * The event sink's fast path: the Avro bodies of one partition's contiguous run of Kafka
 * messages become the columns of one ClickHouse Native block, so ClickHouse parses no Avro
 * (sinks/native.py builds the plan from the schema and has the pure-Python reference).
 * ``plan`` is (columns, ops): columns are (name: bytes, type: bytes, COL_*); ops are the
 * schema's fields in Avro order, nested records inlined, each (AV_*, column index, arg).
 * Returns None when the run is not this fast path's: an offset out of sequence, a body
 * without ``header``, or a body that does not decode exactly (the Python path then decides,
 * message by message).
 */
enum { COL_STRING, COL_NSTRING, COL_INT64, COL_NFLOAT64, COL_UINT8, COL_ASTRING, COL_MAP, COL_PARTITION, COL_OFFSET };
enum { AV_STRING, AV_NSTRING, AV_LONG, AV_ENUM, AV_NDOUBLE, AV_BOOLEAN, AV_ASTRING, AV_MAP_JSON, AV_SKIP_NSTRING };
enum { J_NULL, J_BOOLEAN, J_LONG, J_DOUBLE, J_STRING };

static PyObject *str_offset; /* "offset" */

typedef struct {
    int kind;
    uint64_t items; /* arrays and maps: elements so far (the running offset) */
    Buf a, b, c;    /* data | null map + data | offsets + items | offsets + keys + values */
} Col;

typedef struct {
    int op, col, null_branch;
    PyObject *arg; /* AV_ENUM: tuple of symbol bytes; AV_MAP_JSON: tuple of J_* per union branch */
} NOp;

typedef struct {
    const unsigned char *p, *end;
} Rd;

static inline int rd_long(Rd *r, int64_t *out) {
    uint64_t z = 0;
    for (int shift = 0; shift < 64 && r->p < r->end; shift += 7) {
        unsigned char c = *r->p++;
        z |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            *out = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            return 0;
        }
    }
    return -1;
}

static inline int rd_bytes(Rd *r, const unsigned char **s, Py_ssize_t *n) {
    int64_t len;
    if (rd_long(r, &len) < 0 || len < 0 || len > r->end - r->p) return -1;
    *s = r->p;
    *n = (Py_ssize_t)len;
    r->p += len;
    return 0;
}

static inline int put_chstring(Buf *b, const void *s, Py_ssize_t n) {
    if (put_varuint(b, (uint64_t)n) < 0) return -1;
    return buf_put(b, (const char *)s, n);
}

static inline int put_u64(Buf *b, uint64_t v) { /* little-endian, as every supported target is */
    return buf_put(b, (const char *)&v, 8);
}

/* Returns 0, -1 on a Python error, 1 when the body does not decode. */
static int native_string_into(Rd *r, Buf *out) {
    const unsigned char *s;
    Py_ssize_t n;
    if (rd_bytes(r, &s, &n) < 0) return 1;
    return put_chstring(out, s, n);
}

static int native_json(Rd *r, Buf *out, PyObject *branches) {
    int64_t branch, v;
    if (rd_long(r, &branch) < 0 || branch < 0 || branch >= PyTuple_GET_SIZE(branches)) return 1;
    switch ((int)PyLong_AsLong(PyTuple_GET_ITEM(branches, branch))) {
    case J_NULL:
        return put_chstring(out, "null", 4);
    case J_BOOLEAN:
        if (r->p >= r->end || *r->p > 1) return 1;
        return *r->p++ ? put_chstring(out, "true", 4) : put_chstring(out, "false", 5);
    case J_LONG: {
        char text[24];
        if (rd_long(r, &v) < 0) return 1;
        int n = snprintf(text, sizeof text, "%lld", (long long)v);
        return put_chstring(out, text, n);
    }
    case J_DOUBLE: { /* formatted by orjson, as the Python path formats it */
        double d;
        if (r->end - r->p < 8) return 1;
        memcpy(&d, r->p, 8);
        r->p += 8;
        PyObject *f = PyFloat_FromDouble(d), *text = f ? PyObject_CallOneArg(orjson_dumps, f) : NULL;
        Py_XDECREF(f);
        if (text == NULL) return -1;
        int rc = put_chstring(out, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text));
        Py_DECREF(text);
        return rc;
    }
    case J_STRING:
        return native_string_into(r, out);
    }
    return 1;
}

/* Array or map blocks (Avro): count, [byte size when count < 0], items; a zero count ends them. */
static int native_blocks(Rd *r, Col *c, int is_map, PyObject *branches) {
    int64_t count, size;
    int rc;
    for (;;) {
        if (rd_long(r, &count) < 0) return 1;
        if (count == 0) break;
        if (count < 0) {
            if (count == INT64_MIN || rd_long(r, &size) < 0) return 1;
            count = -count;
        }
        if (count > r->end - r->p) return 1; /* every item takes at least one byte */
        for (int64_t i = 0; i < count; i++) {
            if ((rc = native_string_into(r, &c->b)) != 0) return rc;
            if (is_map && (rc = native_json(r, &c->c, branches)) != 0) return rc;
        }
        c->items += (uint64_t)count;
    }
    return put_u64(&c->a, c->items);
}

static int native_row(Rd *r, const NOp *ops, Py_ssize_t nops, Col *cols) {
    int64_t v;
    int rc;
    for (Py_ssize_t i = 0; i < nops; i++) {
        const NOp *op = &ops[i];
        Col *c = op->col >= 0 ? &cols[op->col] : NULL;
        switch (op->op) {
        case AV_STRING:
            if ((rc = native_string_into(r, &c->a)) != 0) return rc;
            break;
        case AV_NSTRING:
        case AV_SKIP_NSTRING:
            if (rd_long(r, &v) < 0 || (v != 0 && v != 1)) return 1;
            if (v == op->null_branch) {
                if (c && (buf_byte(&c->a, 1) < 0 || buf_byte(&c->b, 0) < 0)) return -1;
            } else if (c) {
                if (buf_byte(&c->a, 0) < 0) return -1;
                if ((rc = native_string_into(r, &c->b)) != 0) return rc;
            } else {
                const unsigned char *s;
                Py_ssize_t n;
                if (rd_bytes(r, &s, &n) < 0) return 1;
            }
            break;
        case AV_LONG:
            if (rd_long(r, &v) < 0) return 1;
            if (buf_put(&c->a, (const char *)&v, 8) < 0) return -1;
            break;
        case AV_ENUM:
            if (rd_long(r, &v) < 0 || v < 0 || v >= PyTuple_GET_SIZE(op->arg)) return 1;
            {
                PyObject *symbol = PyTuple_GET_ITEM(op->arg, v);
                if (put_chstring(&c->a, PyBytes_AS_STRING(symbol), PyBytes_GET_SIZE(symbol)) < 0) return -1;
            }
            break;
        case AV_NDOUBLE:
            if (rd_long(r, &v) < 0 || (v != 0 && v != 1)) return 1;
            if (v == op->null_branch) {
                if (buf_byte(&c->a, 1) < 0 || put_u64(&c->b, 0) < 0) return -1;
            } else {
                if (r->end - r->p < 8) return 1;
                if (buf_byte(&c->a, 0) < 0 || buf_put(&c->b, (const char *)r->p, 8) < 0) return -1;
                r->p += 8;
            }
            break;
        case AV_BOOLEAN:
            if (r->p >= r->end || *r->p > 1) return 1;
            if (buf_byte(&c->a, (char)*r->p++) < 0) return -1;
            break;
        case AV_ASTRING:
        case AV_MAP_JSON:
            if ((rc = native_blocks(r, c, op->op == AV_MAP_JSON, op->arg)) != 0) return rc;
            break;
        default:
            return 1;
        }
    }
    return r->p == r->end ? 0 : 1; /* exactly one record per body */
}

static PyObject *py_native_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 2 || !PyBytes_Check(args[1])
        || !PyList_Check(args[2]) || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "native_block(plan, header: bytes, messages: list, first, partition, prefix)");
        return NULL;
    }
    PyObject *columns = PyTuple_GET_ITEM(args[0], 0), *opspec = PyTuple_GET_ITEM(args[0], 1);
    long long first = PyLong_AsLongLong(args[3]);
    unsigned long partition = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (!PyTuple_Check(columns) || !PyTuple_Check(opspec)) {
        PyErr_SetString(PyExc_TypeError, "native_block: bad plan");
        return NULL;
    }
    Py_ssize_t ncols = PyTuple_GET_SIZE(columns), nops = PyTuple_GET_SIZE(opspec);
    Py_ssize_t nrows = PyList_GET_SIZE(args[2]);
    const char *header = PyBytes_AS_STRING(args[1]);
    Py_ssize_t header_len = PyBytes_GET_SIZE(args[1]);
    Col *cols = PyMem_Calloc((size_t)ncols, sizeof(Col));
    NOp *ops = PyMem_Calloc((size_t)nops + 1, sizeof(NOp));
    PyObject *result = NULL;
    Py_ssize_t made = 0;
    if (cols == NULL || ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; made < ncols; made++) {
        PyObject *spec = PyTuple_GET_ITEM(columns, made);
        buf_init(&cols[made].a);
        buf_init(&cols[made].b);
        buf_init(&cols[made].c);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(spec, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(spec, 1))) {
            made++;
            PyErr_SetString(PyExc_TypeError, "native_block: bad column");
            goto done;
        }
        cols[made].kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 2));
    }
    for (Py_ssize_t i = 0; i < nops; i++) {
        PyObject *spec = PyTuple_GET_ITEM(opspec, i);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3) {
            PyErr_SetString(PyExc_TypeError, "native_block: bad op");
            goto done;
        }
        ops[i].op = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
        ops[i].col = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
        ops[i].arg = PyTuple_GET_ITEM(spec, 2);
        ops[i].null_branch = PyLong_Check(ops[i].arg) ? (int)PyLong_AsLong(ops[i].arg) : -1;
        int bad = ops[i].col >= ncols || (ops[i].col < 0 && ops[i].op != AV_SKIP_NSTRING)
                  || ((ops[i].op == AV_ENUM || ops[i].op == AV_MAP_JSON) && !PyTuple_Check(ops[i].arg));
        for (Py_ssize_t j = 0; !bad && (ops[i].op == AV_ENUM || ops[i].op == AV_MAP_JSON) && j < PyTuple_GET_SIZE(ops[i].arg); j++) {
            PyObject *item = PyTuple_GET_ITEM(ops[i].arg, j);
            bad = ops[i].op == AV_ENUM ? !PyBytes_Check(item) : !PyLong_Check(item);
        }
        if (bad) {
            PyErr_SetString(PyExc_TypeError, "native_block: bad op");
            goto done;
        }
    }
    if (PyErr_Occurred()) goto done;
    for (Py_ssize_t i = 0; i < nrows; i++) {
        PyObject *msg = PyList_GET_ITEM(args[2], i);
        PyObject *offset = PyObject_CallMethodNoArgs(msg, str_offset);
        if (offset == NULL) goto done;
        long long o = PyLong_AsLongLong(offset);
        Py_DECREF(offset);
        if (o == -1 && PyErr_Occurred()) goto done;
        if (o != first + i) goto not_fast;
        PyObject *value = PyObject_CallMethodNoArgs(msg, str_value);
        if (value == NULL) goto done;
        if (!PyBytes_Check(value) || PyBytes_GET_SIZE(value) < header_len
            || memcmp(PyBytes_AS_STRING(value), header, (size_t)header_len) != 0) {
            Py_DECREF(value);
            goto not_fast;
        }
        Rd r = {(const unsigned char *)PyBytes_AS_STRING(value) + header_len,
                (const unsigned char *)PyBytes_AS_STRING(value) + PyBytes_GET_SIZE(value)};
        int rc = native_row(&r, ops, nops, cols);
        Py_DECREF(value);
        if (rc < 0) goto done;
        if (rc > 0) goto not_fast;
    }
    /* The block: columns, rows, then each column's name, type and data. */
    Buf head;
    buf_init(&head);
    if (buf_put(&head, PyBytes_AS_STRING(args[5]), PyBytes_GET_SIZE(args[5])) < 0 || put_varuint(&head, (uint64_t)ncols) < 0
        || put_varuint(&head, (uint64_t)nrows) < 0) {
        buf_free(&head);
        goto done;
    }
    Py_ssize_t total = head.len;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *spec = PyTuple_GET_ITEM(columns, k);
        Py_ssize_t name = PyBytes_GET_SIZE(PyTuple_GET_ITEM(spec, 0)), type = PyBytes_GET_SIZE(PyTuple_GET_ITEM(spec, 1));
        total += 20 + name + type + cols[k].a.len + cols[k].b.len + cols[k].c.len;
        if (cols[k].kind == COL_PARTITION) total += 4 * nrows;
        if (cols[k].kind == COL_OFFSET) total += 8 * nrows;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        buf_free(&head);
        goto done;
    }
    char *out = PyBytes_AS_STRING(result), *p = out;
    memcpy(p, head.data, (size_t)head.len);
    p += head.len;
    buf_free(&head);
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *spec = PyTuple_GET_ITEM(columns, k);
        for (int part = 0; part < 2; part++) {
            PyObject *text = PyTuple_GET_ITEM(spec, part);
            p = varuint_at(p, (uint64_t)PyBytes_GET_SIZE(text));
            memcpy(p, PyBytes_AS_STRING(text), (size_t)PyBytes_GET_SIZE(text));
            p += PyBytes_GET_SIZE(text);
        }
        Col *c = &cols[k];
        if (c->kind == COL_PARTITION) {
            uint32_t v = (uint32_t)partition;
            for (Py_ssize_t i = 0; i < nrows; i++, p += 4) memcpy(p, &v, 4);
        } else if (c->kind == COL_OFFSET) {
            for (Py_ssize_t i = 0; i < nrows; i++, p += 8) {
                uint64_t v = (uint64_t)(first + i);
                memcpy(p, &v, 8);
            }
        } else {
            Buf *parts[3] = {&c->a, &c->b, &c->c};
            for (int j = 0; j < 3; j++) {
                memcpy(p, parts[j]->data, (size_t)parts[j]->len);
                p += parts[j]->len;
            }
        }
    }
    if (_PyBytes_Resize(&result, p - out) < 0) result = NULL;
    goto done;
not_fast:
    result = Py_NewRef(Py_None);
done:
    if (cols != NULL) {
        for (Py_ssize_t k = 0; k < made; k++) {
            buf_free(&cols[k].a);
            buf_free(&cols[k].b);
            buf_free(&cols[k].c);
        }
        PyMem_Free(cols);
    }
    PyMem_Free(ops);
    return result;
}

/* --- Avro -> Python values ------------------------------------------------------
 *
 * decode(program, data, start) -> (value, end)
 *
 * The stream worker's decoder: one value of the encoding program's schema (serde's
 * compile_program) read from ``data`` (any bytes-like object) at ``start``, returned with the
 * offset after it. The value is exactly what fastavro.schemaless_reader returns for the same
 * writer schema and no reader schema: a record is a dict with its fields in schema order, an
 * enum its symbol, a union the chosen branch's value, a map a dict, an array a list, bytes
 * bytes, a string str (strict UTF-8: invalid bytes raise UnicodeDecodeError, as fastavro's
 * decode does), timestamp-micros and timestamp-millis an aware datetime in
 * datetime.timezone.utc (fastavro's epoch + timedelta). It raises Unsupported for what it does
 * not read as fastavro would: a union branch the program has no entry for, and every
 * malformed body (truncated, a negative length or block count past the data, an enum or
 * union index out of range, a varint past 10 bytes, a boolean byte other than 0 and 1, a
 * timestamp outside datetime's years 1-9999). The caller then asks fastavro, whose answer
 * stands: its error, or its value for the oddities it accepts (a negative enum or union
 * index counts from the end of its list, any nonzero boolean byte is True).
 */
#define MICROS_PER_DAY 86400000000LL
#define MIN_MICROS (-62135596800000000LL) /* 0001-01-01T00:00:00 UTC */
#define MAX_MICROS 253402300799999999LL   /* 9999-12-31T23:59:59.999999 UTC */

static PyObject *undecodable(const char *what) {
    PyErr_SetString(Unsupported, what);
    return NULL;
}

static PyObject *malformed(void) { return undecodable("malformed Avro: truncated, a negative length or an overlong varint"); }

static PyObject *read_value(Rd *r, PyObject *op);

/* epoch + timedelta(microseconds=micros), the datetime's fields from the day number
 * (H. Hinnant's days_from_civil inverse, exact over the proleptic Gregorian calendar). */
static PyObject *read_datetime(int64_t micros) {
    if (micros < MIN_MICROS || micros > MAX_MICROS) return undecodable("timestamp outside datetime's range");
    int64_t days = micros / MICROS_PER_DAY, rem = micros % MICROS_PER_DAY;
    if (rem < 0) {
        rem += MICROS_PER_DAY;
        days--;
    }
    int64_t z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    unsigned day = doy - (153 * mp + 2) / 5 + 1, month = mp < 10 ? mp + 3 : mp - 9;
    int year = (int)((int64_t)yoe + era * 400 + (month <= 2));
    int64_t secs = rem / 1000000;
    return PyDateTimeAPI->DateTime_FromDateAndTime(year, (int)month, (int)day, (int)(secs / 3600), (int)(secs / 60 % 60),
                                                   (int)(secs % 60), (int)(rem % 1000000), PyDateTime_TimeZone_UTC,
                                                   PyDateTimeAPI->DateTimeType);
}

static PyObject *read_str(Rd *r) {
    const unsigned char *s;
    Py_ssize_t n;
    if (rd_bytes(r, &s, &n) < 0) return malformed();
    return PyUnicode_DecodeUTF8((const char *)s, n, NULL);
}

static PyObject *read_record(Rd *r, PyObject *op) {
    PyObject *fields = PyTuple_GET_ITEM(op, 2), *record = PyDict_New();
    if (record == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i), *v = read_value(r, PyTuple_GET_ITEM(field, 1));
        if (v == NULL || PyDict_SetItem(record, PyTuple_GET_ITEM(field, 0), v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(record);
            return NULL;
        }
        Py_DECREF(v);
    }
    return record;
}

/* Array or map blocks: count, [byte size (ignored, as fastavro does) when count < 0], items;
 * a zero count ends them. */
static PyObject *read_blocks(Rd *r, PyObject *items, int is_map) {
    PyObject *out = is_map ? PyDict_New() : PyList_New(0);
    int64_t count, size;
    if (out == NULL) return NULL;
    for (;;) {
        if (rd_long(r, &count) < 0) goto bad;
        if (count == 0) return out;
        if (count < 0) {
            if (count == INT64_MIN || rd_long(r, &size) < 0) goto bad;
            count = -count;
        }
        if (count > r->end - r->p) { /* bounds the loop; only items of no bytes (null) are refused wrongly */
            Py_DECREF(out);
            return undecodable("block count past the end of the data");
        }
        for (int64_t i = 0; i < count; i++) {
            PyObject *key = NULL, *v;
            if (is_map && (key = read_str(r)) == NULL) goto fail;
            if ((v = read_value(r, items)) == NULL) {
                Py_XDECREF(key);
                goto fail;
            }
            int rc = is_map ? PyDict_SetItem(out, key, v) : PyList_Append(out, v);
            Py_XDECREF(key);
            Py_DECREF(v);
            if (rc < 0) goto fail;
        }
    }
bad:
    malformed();
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *read_value(Rd *r, PyObject *op) {
    long code = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
    int64_t n;
    switch (code) {
    case OP_NULL:
        Py_RETURN_NONE;
    case OP_BOOLEAN:
        if (r->p >= r->end) return malformed();
        if (*r->p > 1) return undecodable("boolean byte other than 0 and 1");
        return PyBool_FromLong(*r->p++);
    case OP_INT: /* fastavro reads an int as a long: no range check */
    case OP_LONG:
        if (rd_long(r, &n) < 0) return malformed();
        return PyLong_FromLongLong(n);
    case OP_FLOAT:
    case OP_DOUBLE: {
        int size = code == OP_FLOAT ? 4 : 8;
        if (r->end - r->p < size) return malformed();
        double x = size == 4 ? PyFloat_Unpack4((const char *)r->p, 1) : PyFloat_Unpack8((const char *)r->p, 1);
        if (x == -1.0 && PyErr_Occurred()) return NULL;
        r->p += size;
        return PyFloat_FromDouble(x);
    }
    case OP_STRING:
        return read_str(r);
    case OP_BYTES: {
        const unsigned char *s;
        Py_ssize_t len;
        if (rd_bytes(r, &s, &len) < 0) return malformed();
        return PyBytes_FromStringAndSize((const char *)s, len);
    }
    case OP_ENUM: { /* the symbol whose index is n in the program's {symbol: index} */
        PyObject *symbol, *index;
        Py_ssize_t pos = 0;
        if (rd_long(r, &n) < 0) return malformed();
        while (PyDict_Next(PyTuple_GET_ITEM(op, 1), &pos, &symbol, &index))
            if (PyLong_AsLongLong(index) == n) return Py_NewRef(symbol);
        return undecodable("enum index out of range");
    }
    case OP_RECORD:
        return read_record(r, op);
    case OP_ARRAY:
    case OP_MAP:
        return read_blocks(r, PyTuple_GET_ITEM(op, 1), code == OP_MAP);
    case OP_UNION: { /* the branches the program writes, each (test, index, program) */
        PyObject *branches = PyTuple_GET_ITEM(op, 1);
        if (rd_long(r, &n) < 0) return malformed();
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(branches); i++) {
            PyObject *branch = PyTuple_GET_ITEM(branches, i);
            if (PyLong_AsLongLong(PyTuple_GET_ITEM(branch, 1)) == n) return read_value(r, PyTuple_GET_ITEM(branch, 2));
        }
        return undecodable("union branch not in the program");
    }
    case OP_TIMESTAMP_MICROS:
        if (rd_long(r, &n) < 0) return malformed();
        return read_datetime(n);
    case OP_TIMESTAMP_MILLIS:
        if (rd_long(r, &n) < 0) return malformed();
        if (n < MIN_MICROS / 1000 || n > MAX_MICROS / 1000) return undecodable("timestamp outside datetime's range");
        return read_datetime(n * 1000);
    default:
        PyErr_SetString(PyExc_SystemError, "bad Avro program");
        return NULL;
    }
}

static PyObject *py_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "decode(program, data: bytes-like, start: int)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *value = NULL, *result = NULL;
    if (start < 0 || start > view.len) {
        PyErr_SetString(PyExc_ValueError, "decode: start outside the data");
        goto done;
    }
    const unsigned char *base = view.buf;
    Rd r = {base + start, base + view.len};
    if ((value = read_value(&r, args[0])) == NULL || (result = PyTuple_New(2)) == NULL) goto done;
    PyObject *end = PyLong_FromSsize_t(r.p - base);
    if (end == NULL) {
        Py_CLEAR(result);
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, value); /* steals */
    PyTuple_SET_ITEM(result, 1, end);
    value = NULL;
done:
    Py_XDECREF(value);
    PyBuffer_Release(&view);
    return result;
}

/* Kafka's Java partitioner hash (org.apache.kafka.common.utils.Utils.murmur2), as aiokafka's
 * pure-Python murmur2: the partition of a key the worker groups by partition itself. */
static PyObject *py_murmur2(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *data = (const unsigned char *)view.buf;
    Py_ssize_t length = view.len;
    const uint32_t m = 0x5bd1e995u;
    uint32_t h = 0x9747b28cu ^ (uint32_t)length;
    Py_ssize_t length4 = length / 4;
    for (Py_ssize_t i = 0; i < length4; i++) {
        Py_ssize_t i4 = i * 4;
        uint32_t k = (uint32_t)data[i4] | ((uint32_t)data[i4 + 1] << 8) | ((uint32_t)data[i4 + 2] << 16) |
                     ((uint32_t)data[i4 + 3] << 24);
        k *= m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
    }
    Py_ssize_t tail = length & ~(Py_ssize_t)3;
    switch (length % 4) {
    case 3: h ^= (uint32_t)data[tail + 2] << 16; /* fall through */
    case 2: h ^= (uint32_t)data[tail + 1] << 8; /* fall through */
    case 1: h ^= (uint32_t)data[tail]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(h);
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))py_encode, METH_FASTCALL,
     "encode(program, header, record) -> header + the record's Avro binary"},
    {"decode", (PyCFunction)(void (*)(void))py_decode, METH_FASTCALL,
     "decode(program, data, start) -> (value, end): fastavro.schemaless_reader's value, read in C"},
    {"content_hash", (PyCFunction)(void (*)(void))py_content_hash, METH_FASTCALL,
     "content_hash(fields, flat, ts_text, layout) -> hex SHA-256 of the canonical content JSON"},
    {"canonical_json", py_canonical_json, METH_O, "orjson.dumps(value, option=OPT_SORT_KEYS) for plain values"},
    {"sha256_hex", (PyCFunction)(void (*)(void))py_sha256_hex, METH_FASTCALL,
     "hashlib.sha256(data).hexdigest(); portable=True skips the CPU's SHA extensions"},
    {"bulk_encode", (PyCFunction)(void (*)(void))py_bulk_encode, METH_FASTCALL,
     "bulk_encode(items, defaults, context) -> [Accepted | item for the model | None]"},
    {"native_block", (PyCFunction)(void (*)(void))py_native_block, METH_FASTCALL,
     "native_block(plan, header, messages, first, partition, prefix) -> prefix + a ClickHouse Native block | None"},
    {"murmur2", py_murmur2, METH_O, "murmur2(key) -> Kafka's Java murmur2 of the bytes (as aiokafka's)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "schemas._speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
#if HAVE_SHA_NI
    if (cpu_has_sha_ni()) sha256_fast_block = sha256_block_ni;
#endif
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Unsupported = PyErr_NewException("schemas._speedups.Unsupported", PyExc_ValueError, NULL);
    PyObject *orjson = PyImport_ImportModule("orjson");
    if (Unsupported == NULL || orjson == NULL) goto fail;
    orjson_dumps = PyObject_GetAttrString(orjson, "dumps");
    Py_DECREF(orjson);
    epoch = PyDateTimeAPI->DateTime_FromDateAndTime(1970, 1, 1, 0, 0, 0, 0, PyDateTime_TimeZone_UTC,
                                                    PyDateTimeAPI->DateTimeType);
    str_value = PyUnicode_InternFromString("value");
    str_offset = PyUnicode_InternFromString("offset");
    PyObject **interned[] = {&s_payload, &s_text, &s_comment, &s_corrected, &s_extra, &s_ts, &s_severity, &s_tags,
                             &s_hash, &s_event_id, &s_user_id, &s_client_ip, &s_source};
    const char *texts[] = {"payload", "text", "comment", "corrected_response", "extra", "ts", "severity", "tags",
                           "hash", "event_id", "user_id", "client_ip", "source"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
        if ((*interned[i] = PyUnicode_InternFromString(texts[i])) == NULL) goto fail;
    str_dict = PyUnicode_InternFromString("__dict__");
    if (orjson_dumps == NULL || epoch == NULL || str_value == NULL || str_offset == NULL || str_dict == NULL) goto fail;
    Py_INCREF(Unsupported);
    if (PyModule_AddObject(m, "Unsupported", Unsupported) < 0) goto fail;
    PyObject *ops = Py_BuildValue(
        "{si,si,si,si,si,si,si,si,si,si,si,si,si,si,si}", "null", OP_NULL, "boolean", OP_BOOLEAN, "int", OP_INT,
        "long", OP_LONG, "float", OP_FLOAT, "double", OP_DOUBLE, "string", OP_STRING, "bytes", OP_BYTES, "enum",
        OP_ENUM, "record", OP_RECORD, "array", OP_ARRAY, "map", OP_MAP, "union", OP_UNION, "timestamp-micros",
        OP_TIMESTAMP_MICROS, "timestamp-millis", OP_TIMESTAMP_MILLIS);
    PyObject *tests = Py_BuildValue("{si,si,si,si,si,si}", "none", IS_NONE, "bool", IS_BOOL, "int", IS_INT, "float",
                                    IS_FLOAT, "str", IS_STR, "bytes", IS_BYTES);
    PyObject *rule_kinds = Py_BuildValue("{si,si,si,si,si,si,si}", "str", RULE_STR, "float", RULE_FLOAT, "bool",
                                         RULE_BOOL, "datetime", RULE_DATETIME, "enum", RULE_ENUM, "str_list",
                                         RULE_STR_LIST, "scalar_map", RULE_SCALAR_MAP);
    if (PyModule_AddObject(m, "RULE_KINDS", rule_kinds) < 0) goto fail;
    PyObject *kinds = Py_BuildValue("{si,si,si,si,si}", "required", KEY_REQUIRED, "optional", KEY_OPTIONAL, "ts",
                                    KEY_TS, "enum_value", KEY_ENUM_VALUE, "flat", KEY_FLAT);
    PyObject *native = Py_BuildValue(
        "{s{si,si,si,si,si,si,si,si,si}s{si,si,si,si,si,si,si,si,si}s{si,si,si,si,si}}", "columns", "string",
        COL_STRING, "nullable_string", COL_NSTRING, "int64", COL_INT64, "nullable_float64", COL_NFLOAT64, "uint8",
        COL_UINT8, "array_string", COL_ASTRING, "map", COL_MAP, "partition", COL_PARTITION, "offset", COL_OFFSET,
        "ops", "string", AV_STRING, "nullable_string", AV_NSTRING, "long", AV_LONG, "enum", AV_ENUM,
        "nullable_double", AV_NDOUBLE, "boolean", AV_BOOLEAN, "array_string", AV_ASTRING, "map_json", AV_MAP_JSON,
        "skip_nullable_string", AV_SKIP_NSTRING, "json", "null", J_NULL, "boolean", J_BOOLEAN, "long", J_LONG,
        "double", J_DOUBLE, "string", J_STRING);
    if (PyModule_AddObject(m, "NATIVE", native) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "SHA_NI", sha256_fast_block != sha256_block) < 0) goto fail;
    if (PyModule_AddObject(m, "OPCODES", ops) < 0 || PyModule_AddObject(m, "UNION_TESTS", tests) < 0
        || PyModule_AddObject(m, "KEY_KINDS", kinds) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
