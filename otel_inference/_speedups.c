/* The stage hot path, compiled: ``StageCore``, the base of ``stages.StageScope``,
 * and the per-stage work at a request's end.
 *
 * A ``with stage(...)`` call inside a request is a handful of steps (read the
 * context's frame, find the stage's tally or make it, set the frame, read the
 * clock, and on exit append the call's interval to the tally). In Python each step
 * costs tens of nanoseconds of interpreter overhead and the whole call ~2 us; here
 * it is a few hundred nanoseconds. When the request ends, each stage's figures
 * (``tally_rows``) and their two histogram updates (``record_rows``) are compiled
 * too. Every other branch (outside a request, sampled requests' spans, failures,
 * late records, settled intervals) calls the same Python code that the pure-Python
 * reference (``stages._PyStageCore``, ``stages._tally_rows``,
 * ``fastpath._record_rows``, which this file mirrors step for step) calls. Build
 * failures are not fatal: the package then runs the Python code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    PyObject *recorder;
    PyObject *name;
    PyObject *attributes;
    PyObject *account;
    PyObject *binding;
    PyObject *cold;
    PyObject *context_token;
    PyObject *frame_token;
    PyObject *joined;
    PyObject *metric_context;
    PyObject *outer_context;
    PyObject *parent;
    PyObject *probe;
    PyObject *span;
    PyObject *start_wall_ns;
    PyObject *tally;
    long long created_ns;
    long long enter_ns;
    long long start_ns;
} StageCore;

/* Set by bind(): the stages module's context variable, loop monitor, GC queue... */
static PyObject *FRAME = NULL;         /* ContextVar of (account, stage name) */
static PyObject *LOOP = NULL;          /* event-loop monitor (.started, .stage_probe) */
static PyObject *GC_PENDING = NULL;    /* deque of GC pauses to record */
static PyObject *DRAIN_GC = NULL;      /* _drain_gc_pauses(binding) */
static PyObject *FAILED = NULL;        /* _hot_path_failed(key, exc) */
static PyObject *GET_CONTEXT = NULL;   /* opentelemetry.context.get_current */
static Py_ssize_t MAX_UNSETTLED = 4096;
static long long FRESH_SCOPE_NS = 100000;
static PyObject *PERF_COUNTER_NS = NULL; /* time.perf_counter_ns where it is not CLOCK_MONOTONIC */

static PyObject *s__bind, *s__enter_alone, *s__new_tally, *s__enter_sampled, *s_stage_probe,
    *s_record, *s_settle, *s__finish_slow, *s_stage_enter, *s_stage_exit, *s_perf_counter_ns,
    *s_compressible, *s_context, *s_seq, *s_span_seq, *s_limit_ns, *s_calls, *s_busy_ns,
    *s_end_ns, *s_end_wall_ns;

/* ---- Slots of the stages module's own classes, read where they are stored ----
 *
 * RequestAccount, StageTally, IntervalUnion and _Binding are Python classes with
 * ``__slots__``: each slot is a member descriptor holding the field's offset in the
 * instance. PyObject_GetAttr finds that descriptor through the type on every read
 * (~170 instructions); bind() resolves it once, and an instance of exactly that
 * class is then read or written at the offset. Any other object (a subclass, a
 * test double), or a field not set yet, goes through PyObject_GetAttr as before. */
typedef struct {
    PyTypeObject *type; /* NULL: not resolved, always PyObject_GetAttr */
    Py_ssize_t offset;
    PyObject *name;
} SlotRef;

static SlotRef ACCOUNT_COLD, ACCOUNT_TALLIES, ACCOUNT_RECORDING, ACCOUNT_CLOSED,
    ACCOUNT_INSTRUMENTATION_NS, ACCOUNT_SPAN_SEQ, TALLY_NAME, TALLY_PARENT, TALLY_COLD,
    TALLY_CONTEXT, TALLY_ERROR_TYPE, TALLY_HELD, TALLY_UNION, UNION_INTERVALS, UNION_SETTLED,
    BINDING_CALL_DURATION, RECORDER_BINDING, LOOP_STARTED;
static PyTypeObject *TALLY_TYPE = NULL, *UNION_TYPE = NULL; /* made here when resolved */

/* ``cls.<name>`` when it is a writable object slot: 0 (ref left unresolved when it
 * is not one), or -1 with an exception set. */
static int
resolve_slot(PyObject *cls, const char *name, SlotRef *ref)
{
    ref->type = NULL;
    ref->offset = 0;
    Py_XSETREF(ref->name, PyUnicode_InternFromString(name));
    if (ref->name == NULL) {
        return -1;
    }
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "bind(): %R is not a class", cls);
        return -1;
    }
    PyObject *descriptor = PyObject_GetAttr(cls, ref->name);
    if (descriptor == NULL) {
        return -1;
    }
    if (Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY)) {
            ref->type = (PyTypeObject *)cls;
            ref->offset = member->offset;
        }
    }
    Py_DECREF(descriptor);
    return 0;
}

static inline PyObject **
slot_address(PyObject *obj, const SlotRef *ref)
{
    return ref->type != NULL && Py_IS_TYPE(obj, ref->type)
               ? (PyObject **)((char *)obj + ref->offset)
               : NULL;
}

/* ``obj.<slot>``: a new reference, or NULL with an exception set. */
static inline PyObject *
slot_get(PyObject *obj, const SlotRef *ref)
{
    PyObject **address = slot_address(obj, ref);
    if (address != NULL && *address != NULL) {
        return Py_NewRef(*address);
    }
    return PyObject_GetAttr(obj, ref->name);
}

/* ``obj.<slot> = value`` (value borrowed): 0 or -1. */
static inline int
slot_set(PyObject *obj, const SlotRef *ref, PyObject *value)
{
    PyObject **address = slot_address(obj, ref);
    if (address != NULL) {
        Py_XSETREF(*address, Py_NewRef(value));
        return 0;
    }
    return PyObject_SetAttr(obj, ref->name, value);
}

/* bool(obj.<slot>): 1, 0 or -1. */
static inline int
slot_truth(PyObject *obj, const SlotRef *ref)
{
    PyObject **address = slot_address(obj, ref);
    if (address != NULL && (*address == Py_True || *address == Py_False)) {
        return *address == Py_True;
    }
    PyObject *value = slot_get(obj, ref);
    if (value == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* time.perf_counter_ns(): CLOCK_MONOTONIC on Linux for CPython 3.10-3.13 (checked
 * against it when stages.py binds this module; elsewhere we call it). */
/* An int's value; an OverflowError past 64 bits. (PyLong_AsLongLong converts a
 * nanosecond timestamp, two 30-bit digits, through a byte array: slower.) */
static inline long long
as_ll(PyObject *value)
{
    int overflow;
    long long result = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "a nanosecond value beyond 64 bits");
        return -1;
    }
    return result;
}

/* Nanoseconds given as an int, or a float (rounded), as the Python HeldSpan took. */
static long long
ns_of(PyObject *value)
{
    if (PyFloat_Check(value)) {
        double number = PyFloat_AS_DOUBLE(value);
        if (!(number > -9.2e18 && number < 9.2e18)) {
            PyErr_SetString(PyExc_OverflowError, "a nanosecond value beyond 64 bits");
            return -1;
        }
        return llround(number);
    }
    return as_ll(value);
}

static PyObject *CLOCK_NAMESPACE = NULL; /* stages' globals: a patched perf_counter_ns wins */

static int
call_clock(PyObject *clock, long long *out)
{
    PyObject *value = PyObject_CallNoArgs(clock);
    if (value == NULL) {
        return -1;
    }
    *out = as_ll(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The clock to read: *clock is NULL for CLOCK_MONOTONIC, else a new reference to a
 * test's deterministic clock (a monkeypatched stages.perf_counter_ns), which both
 * cores read alike. 0 or -1. */
static inline int
patched_clock(PyObject **clock)
{
    *clock = NULL;
    if (CLOCK_NAMESPACE == NULL) {
        return 0;
    }
    PyObject *found = PyDict_GetItemWithError(CLOCK_NAMESPACE, s_perf_counter_ns);
    if (found == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (found != PERF_COUNTER_NS) {
        *clock = Py_NewRef(found);
    }
    return 0;
}

/* Read ``clock`` (from patched_clock). */
static inline int
read_clock(PyObject *clock, long long *out)
{
    if (clock != NULL) {
        return call_clock(clock, out);
    }
#if defined(__linux__)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        *out = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        return 0;
    }
#endif
    return call_clock(PERF_COUNTER_NS, out);
}

static inline int
now_ns(long long *out)
{
    PyObject *clock;
    if (patched_clock(&clock) < 0) {
        return -1;
    }
    int status = read_clock(clock, out);
    Py_XDECREF(clock);
    return status;
}


/* ---- HeldSpan: accounting.HeldSpan's compiled twin (a stage span held open) ---- */

typedef struct {
    PyObject_HEAD
    PyObject *span;
    PyObject *context;
    long long start_ns;
    long long end_ns;
    long long end_wall_ns;
    long long calls;
    long long busy_ns;
    long long seq;
    long long limit_ns; /* the longest call that may join it */
    char compressible;
} HeldSpan;

static PyTypeObject *HeldSpanType = NULL;

static int
held_init(HeldSpan *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"span",    "start_ns", "end_ns",   "end_wall_ns", "compressible",
                               "context", "seq",      "limit_ns", NULL};
    PyObject *span, *context, *start, *end, *end_wall, *seq_number;
    int compressible;
    long long limit_ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOpOO|L:HeldSpan", keywords, &span, &start,
                                     &end, &end_wall, &compressible, &context, &seq_number,
                                     &limit_ns)) {
        return -1;
    }
    long long start_ns = ns_of(start), end_ns = ns_of(end), end_wall_ns = ns_of(end_wall),
              seq = ns_of(seq_number);
    if (PyErr_Occurred()) {
        return -1;
    }
    Py_INCREF(span);
    Py_XSETREF(self->span, span);
    Py_INCREF(context);
    Py_XSETREF(self->context, context);
    self->start_ns = start_ns;
    self->end_ns = end_ns;
    self->end_wall_ns = end_wall_ns;
    self->calls = 1;
    self->busy_ns = end_ns - start_ns; /* the calls' summed time */
    self->compressible = (char)compressible;
    self->seq = seq;
    self->limit_ns = limit_ns;
    return 0;
}

static inline void
held_join(HeldSpan *self, long long start_ns, long long end_ns)
{
    self->calls += 1;
    self->busy_ns += end_ns - start_ns;
    if (end_ns > self->end_ns) {
        self->end_wall_ns += end_ns - self->end_ns;
        self->end_ns = end_ns;
    }
}

static PyObject *
held_join_method(HeldSpan *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "join(start_ns, end_ns)");
        return NULL;
    }
    long long start_ns = as_ll(args[0]), end_ns = as_ll(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    held_join(self, start_ns, end_ns);
    Py_RETURN_NONE;
}

static int
held_traverse(HeldSpan *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->span);
    Py_VISIT(self->context);
    return 0;
}

static int
held_clear(HeldSpan *self)
{
    Py_CLEAR(self->span);
    Py_CLEAR(self->context);
    return 0;
}

static void
held_dealloc(HeldSpan *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    held_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMemberDef held_members[] = {
    {"span", T_OBJECT_EX, offsetof(HeldSpan, span), 0, NULL},
    {"context", T_OBJECT_EX, offsetof(HeldSpan, context), 0, NULL},
    {"start_ns", T_LONGLONG, offsetof(HeldSpan, start_ns), 0, NULL},
    {"end_ns", T_LONGLONG, offsetof(HeldSpan, end_ns), 0, NULL},
    {"end_wall_ns", T_LONGLONG, offsetof(HeldSpan, end_wall_ns), 0, NULL},
    {"calls", T_LONGLONG, offsetof(HeldSpan, calls), 0, NULL},
    {"busy_ns", T_LONGLONG, offsetof(HeldSpan, busy_ns), 0, NULL},
    {"seq", T_LONGLONG, offsetof(HeldSpan, seq), 0, NULL},
    {"limit_ns", T_LONGLONG, offsetof(HeldSpan, limit_ns), 0, NULL},
    {"compressible", T_BOOL, offsetof(HeldSpan, compressible), 0, NULL},
    {NULL},
};

static PyMethodDef held_methods[] = {
    {"join", (PyCFunction)(void (*)(void))held_join_method, METH_FASTCALL,
     "join(start_ns, end_ns): one more call in this (compressed) span."},
    {NULL},
};

static PyType_Slot held_slots[] = {
    {Py_tp_doc, "A stage span whose call has finished but that is not ended yet "
                "(accounting.HeldSpan, compiled)."},
    {Py_tp_init, held_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, held_dealloc},
    {Py_tp_traverse, held_traverse},
    {Py_tp_clear, held_clear},
    {Py_tp_members, held_members},
    {Py_tp_methods, held_methods},
    {0, NULL},
};

static PyType_Spec held_spec = {
    .name = "otel_inference._speedups.HeldSpan",
    .basicsize = sizeof(HeldSpan),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = held_slots,
};

/* Log an ``except Exception`` of the hot path once (stages._hot_path_failed); any
 * other exception (KeyboardInterrupt...) propagates, as in Python. */
static int
swallow_exception(PyObject *key)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *logged = PyObject_CallFunctionObjArgs(FAILED, key, value ? value : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (logged == NULL) {
        PyErr_Clear(); /* logging must never break the host application either */
    }
    Py_XDECREF(logged);
    return 0;
}

static int
truth_of_attr(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

static int
core_init(StageCore *self, PyObject *args, PyObject *kwargs)
{
    PyObject *recorder, *name, *attributes = Py_None;
    static char *keywords[] = {"recorder", "name", "attributes", NULL};
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if ((kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0) && (nargs == 2 || nargs == 3)) {
        /* StageScope(recorder, name, attributes): every call site, parsed directly */
        recorder = PyTuple_GET_ITEM(args, 0);
        name = PyTuple_GET_ITEM(args, 1);
        if (nargs == 3) {
            attributes = PyTuple_GET_ITEM(args, 2);
        }
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:StageCore", keywords, &recorder,
                                          &name, &attributes)) {
        return -1;
    }
    Py_INCREF(recorder);
    Py_XSETREF(self->recorder, recorder);
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    Py_INCREF(attributes);
    Py_XSETREF(self->attributes, attributes);
    /* Making the scope is our work too: ``with stage(...)`` counts from here. */
    return now_ns(&self->created_ns);
}

#define SET_FIELD(field, value)          \
    do {                                 \
        PyObject *_v = (value);          \
        Py_INCREF(_v);                   \
        Py_XSETREF(self->field, _v);     \
    } while (0)

/* 1 when ``held`` (a stage's held span) can take one more call made in ``context``:
 * compressible, opened in that context, and no other span opened since. */
static int
can_join(PyObject *held, PyObject *context, PyObject *account)
{
    if (held == Py_None) {
        return 0;
    }
    if (Py_IS_TYPE(held, HeldSpanType)) {
        HeldSpan *compiled = (HeldSpan *)held;
        if (!compiled->compressible || compiled->context != context) {
            return 0;
        }
        PyObject *span_seq = slot_get(account, &ACCOUNT_SPAN_SEQ);
        if (span_seq == NULL) {
            return -1;
        }
        long long seq = as_ll(span_seq);
        Py_DECREF(span_seq);
        if (seq == -1 && PyErr_Occurred()) {
            return -1;
        }
        return compiled->seq == seq;
    }
    int compressible = truth_of_attr(held, s_compressible);
    if (compressible <= 0) {
        return compressible;
    }
    PyObject *held_context = PyObject_GetAttr(held, s_context);
    if (held_context == NULL) {
        return -1;
    }
    Py_DECREF(held_context); /* only its identity is compared */
    if (held_context != context) {
        return 0;
    }
    PyObject *seq = PyObject_GetAttr(held, s_seq);
    if (seq == NULL) {
        return -1;
    }
    PyObject *span_seq = PyObject_GetAttr(account, s_span_seq);
    if (span_seq == NULL) {
        Py_DECREF(seq);
        return -1;
    }
    int same = PyObject_RichCompareBool(seq, span_seq, Py_EQ);
    Py_DECREF(seq);
    Py_DECREF(span_seq);
    return same;
}

/* Inside a sampled request: a consecutive short call of the stage joins its held
 * span (compression; finish() checks that it stays short), otherwise
 * StageScope._enter_sampled takes a span for it, or none. 0 or -1. */
static int
enter_sampled(StageCore *self, PyObject *binding, PyObject *account, PyObject *tally,
              PyObject *current)
{
    PyObject *context = current != NULL ? Py_NewRef(current) : PyObject_CallNoArgs(GET_CONTEXT);
    if (context == NULL) {
        return -1;
    }
    SET_FIELD(metric_context, context);
    SET_FIELD(outer_context, context);
    PyObject *held = slot_get(tally, &TALLY_HELD);
    int join = held == NULL ? -1 : can_join(held, context, account);
    int status = -1;
    if (join < 0) {
        goto done;
    }
    if (join) {
        SET_FIELD(joined, held);
        PyObject *call_duration = slot_get(binding, &BINDING_CALL_DURATION);
        if (call_duration == NULL) {
            goto done;
        }
        if (call_duration == Py_None) {
            SET_FIELD(tally, tally);
        }
        Py_DECREF(call_duration);
    }
    else {
        PyObject *result = PyObject_CallMethodObjArgs((PyObject *)self, s__enter_sampled, binding,
                                                      account, context, NULL);
        if (result == NULL) {
            goto done;
        }
        Py_DECREF(result);
    }
    status = 0;
done:
    Py_XDECREF(held);
    Py_DECREF(context);
    return status;
}

/* A new StageTally (with its IntervalUnion and empty interval list), made as
 * object.__new__ and the attribute sets of their __init__ would make it: the
 * first call of a stage in a request makes one, and running two Python __init__
 * is most of what that call cost. Only when bind() resolved every slot. */
static PyObject *
make_tally(PyObject *name, PyObject *parent, PyObject *cold)
{
    PyObject *tally = TALLY_TYPE->tp_alloc(TALLY_TYPE, 0);
    PyObject *un = UNION_TYPE->tp_alloc(UNION_TYPE, 0);
    PyObject *intervals = PyList_New(0);
    if (tally == NULL || un == NULL || intervals == NULL) {
        Py_XDECREF(tally);
        Py_XDECREF(un);
        Py_XDECREF(intervals);
        return NULL;
    }
    /* Fresh objects of exactly the resolved classes: every slot has its address. */
    *slot_address(un, &UNION_INTERVALS) = intervals;
    *slot_address(un, &UNION_SETTLED) = Py_NewRef(Py_None);
    *slot_address(tally, &TALLY_NAME) = Py_NewRef(name);
    *slot_address(tally, &TALLY_PARENT) = Py_NewRef(parent);
    *slot_address(tally, &TALLY_COLD) = Py_NewRef(cold);
    *slot_address(tally, &TALLY_CONTEXT) = Py_NewRef(Py_None);
    *slot_address(tally, &TALLY_ERROR_TYPE) = Py_NewRef(Py_None);
    *slot_address(tally, &TALLY_HELD) = Py_NewRef(Py_None);
    *slot_address(tally, &TALLY_UNION) = un;
    return tally;
}

/* The stage's tally in the request's ``tallies`` (found under ``key``), made on its
 * first call: a new reference, or NULL with an exception set. */
static PyObject *
tally_of(StageCore *self, PyObject *account, PyObject *tallies, PyObject *key)
{
    PyObject *tally = PyDict_Check(tallies) ? PyDict_GetItemWithError(tallies, key) : NULL;
    if (tally != NULL) {
        return Py_NewRef(tally);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (TALLY_TYPE == NULL || !PyDict_CheckExact(tallies)) {
        return PyObject_CallMethodOneArg((PyObject *)self, s__new_tally, account);
    }
    PyObject *made = make_tally(self->name, self->parent, self->cold);
    if (made == NULL) {
        return NULL;
    }
    /* setdefault: a racing thread's tally is kept, not replaced */
    tally = PyDict_SetDefault(tallies, key, made);
    Py_XINCREF(tally);
    Py_DECREF(made);
    return tally;
}

/* The body of ``__enter__``'s ``try``: 0, or -1 with an exception set. */
static int
enter_frame(StageCore *self, PyObject *current)
{
    PyObject *binding = slot_get(self->recorder, &RECORDER_BINDING);
    if (binding == NULL) {
        return -1;
    }
    int bound = PyObject_IsTrue(binding);
    if (bound < 0) {
        Py_DECREF(binding);
        return -1;
    }
    if (!bound) {
        Py_DECREF(binding);
        binding = PyObject_CallMethodNoArgs(self->recorder, s__bind);
        if (binding == NULL) {
            return -1;
        }
    }
    Py_XSETREF(self->binding, binding);

    PyObject *frame;
    if (PyContextVar_Get(FRAME, Py_None, &frame) < 0) {
        return -1;
    }
    if (frame != Py_None && !(PyTuple_Check(frame) && PyTuple_GET_SIZE(frame) == 2)) {
        Py_DECREF(frame);
        PyErr_SetString(PyExc_TypeError, "otel-inference frame is not an (account, stage) pair");
        return -1;
    }
    PyObject *account = frame == Py_None ? Py_None : PyTuple_GET_ITEM(frame, 0);
    PyObject *parent = frame == Py_None ? Py_None : PyTuple_GET_ITEM(frame, 1);
    int status = -1;
    PyObject *tally = NULL, *key = NULL, *result = NULL;
    if (account == Py_None) {
        result = PyObject_CallMethodObjArgs((PyObject *)self, s__enter_alone, binding, parent,
                                            NULL);
        if (result == NULL) {
            goto done;
        }
    }
    else {
        /* Inside a request. Unsampled, this is all a call costs: no context or span
         * lookups (the request's sampling decision holds for its stages). */
        SET_FIELD(account, account);
        SET_FIELD(parent, parent);
        PyObject *cold = slot_get(account, &ACCOUNT_COLD);
        if (cold == NULL) {
            goto done;
        }
        Py_XSETREF(self->cold, cold);
        PyObject *tallies = slot_get(account, &ACCOUNT_TALLIES);
        if (tallies == NULL) {
            goto done;
        }
        key = PyTuple_Pack(2, self->name, parent);
        tally = key == NULL ? NULL : tally_of(self, account, tallies, key);
        Py_DECREF(tallies);
        if (tally == NULL) {
            goto done;
        }
        int recording = slot_truth(account, &ACCOUNT_RECORDING);
        if (recording < 0) {
            goto done;
        }
        if (recording) {
            if (enter_sampled(self, binding, account, tally, current) < 0) {
                goto done;
            }
        }
        else {
            PyObject *call_duration = slot_get(binding, &BINDING_CALL_DURATION);
            if (call_duration == NULL) {
                goto done;
            }
            if (call_duration == Py_None) {
                SET_FIELD(tally, tally); /* finish() only counts the call */
            }
            Py_DECREF(call_duration);
        }
    }
    PyObject *pair = PyTuple_Pack(2, account, self->name);
    if (pair == NULL) {
        goto done;
    }
    PyObject *token = PyContextVar_Set(FRAME, pair);
    Py_DECREF(pair);
    if (token == NULL) {
        goto done;
    }
    Py_XSETREF(self->frame_token, token);
    status = 0;
done:
    Py_XDECREF(result);
    Py_XDECREF(tally);
    Py_XDECREF(key);
    Py_DECREF(frame);
    return status;
}

static PyObject *
enter_in(StageCore *self, PyObject *current)
{
    if (FRAME == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "otel_inference._speedups: bind() was not called");
        return NULL;
    }
    long long enter_ns;
    PyObject *clock; /* looked up once for both readings */
    if (patched_clock(&clock) < 0) {
        return NULL;
    }
    if (read_clock(clock, &enter_ns) < 0) {
        Py_XDECREF(clock);
        return NULL;
    }
    /* A scope entered this soon after it was made was made for this ``with``: its
     * making is our time too. One made long before (kept, then entered) is not. */
    if (enter_ns - self->created_ns < FRESH_SCOPE_NS) {
        enter_ns = self->created_ns;
    }
    SET_FIELD(span, Py_None);
    SET_FIELD(joined, Py_None);
    SET_FIELD(tally, Py_None);
    SET_FIELD(metric_context, Py_None);
    if (enter_frame(self, current) < 0) {
        /* never break the host application */
        if (swallow_exception(s_stage_enter) < 0) {
            Py_XDECREF(clock);
            return NULL;
        }
        SET_FIELD(binding, Py_None);
        SET_FIELD(frame_token, Py_None);
        SET_FIELD(account, Py_None);
        SET_FIELD(tally, Py_None);
    }
    self->enter_ns = enter_ns;
    int read = read_clock(clock, &self->start_ns);
    Py_XDECREF(clock);
    if (read < 0) {
        return NULL;
    }
    /* Watches the running loop; a sync stage's thread CPU clock (#16). */
    int started = slot_truth(LOOP, &LOOP_STARTED);
    if (started < 0) {
        return NULL;
    }
    if (started) {
        PyObject *probe = PyObject_CallMethodOneArg(LOOP, s_stage_probe, self->span);
        if (probe == NULL) {
            return NULL;
        }
        Py_XSETREF(self->probe, probe);
    }
    else {
        SET_FIELD(probe, Py_None);
    }
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
core_enter(StageCore *self, PyObject *Py_UNUSED(ignored))
{
    return enter_in(self, NULL);
}

/* ``enter_in(context)``: ``__enter__`` for a caller that has just read the current
 * OpenTelemetry context (the serializers' wrapper, for its suppression check): a
 * sampled request's stage then does not read it again. */
static PyObject *
core_enter_in(StageCore *self, PyObject *context)
{
    return enter_in(self, context);
}

static PyObject *
call_with_ns(PyObject *self, PyObject *method, long long first, PyObject *second)
{
    PyObject *value = PyLong_FromLongLong(first);
    if (value == NULL) {
        return NULL;
    }
    PyObject *result = second == NULL
                           ? PyObject_CallMethodOneArg(self, method, value)
                           : PyObject_CallMethodObjArgs(self, method, value, second, NULL);
    Py_DECREF(value);
    return result;
}

static PyObject *
pair_of(long long first, long long second)
{
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        return NULL;
    }
    PyObject *a = PyLong_FromLongLong(first), *b = PyLong_FromLongLong(second);
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_DECREF(pair);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, a);
    PyTuple_SET_ITEM(pair, 1, b);
    return pair;
}

/* Add ``delta`` to the int attribute ``name`` of ``obj``. */
static int
add_to_attr(PyObject *obj, PyObject *name, long long delta)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    PyObject *step = PyLong_FromLongLong(delta);
    PyObject *total = step == NULL ? NULL : PyNumber_Add(value, step);
    Py_DECREF(value);
    Py_XDECREF(step);
    if (total == NULL) {
        return -1;
    }
    int status = PyObject_SetAttr(obj, name, total);
    Py_DECREF(total);
    return status;
}

/* Add ``delta`` to the int slot ``ref`` of ``obj``. */
static int
add_to_slot(PyObject *obj, const SlotRef *ref, long long delta)
{
    PyObject **address = slot_address(obj, ref);
    if (address == NULL || *address == NULL || !PyLong_CheckExact(*address)) {
        return add_to_attr(obj, ref->name, delta);
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(*address, &overflow);
    if (overflow || (delta > 0 && value > LLONG_MAX - delta)
        || (delta < 0 && value < LLONG_MIN - delta)) {
        return add_to_attr(obj, ref->name, delta); /* past 64 bits: Python ints */
    }
    PyObject *total = PyLong_FromLongLong(value + delta);
    if (total == NULL) {
        return -1;
    }
    Py_SETREF(*address, total);
    return 0;
}

/* accounting.HeldSpan.join: one more call in the held (compressed) span. */
static int
join_held(PyObject *held, long long start_ns, long long end_ns)
{
    if (Py_IS_TYPE(held, HeldSpanType)) {
        held_join((HeldSpan *)held, start_ns, end_ns);
        return 0;
    }
    if (add_to_attr(held, s_calls, 1) < 0 || add_to_attr(held, s_busy_ns, end_ns - start_ns) < 0) {
        return -1;
    }
    PyObject *value = PyObject_GetAttr(held, s_end_ns);
    if (value == NULL) {
        return -1;
    }
    long long held_end_ns = as_ll(value);
    Py_DECREF(value);
    if (held_end_ns == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (end_ns <= held_end_ns) {
        return 0;
    }
    if (add_to_attr(held, s_end_wall_ns, end_ns - held_end_ns) < 0) {
        return -1;
    }
    PyObject *end = PyLong_FromLongLong(end_ns);
    if (end == NULL) {
        return -1;
    }
    int status = PyObject_SetAttr(held, s_end_ns, end);
    Py_DECREF(end);
    return status;
}

/* The hot path of ``finish``: the call joins its request's tally. 0 or -1. */
static int
add_to_tally(StageCore *self, long long end_ns)
{
    PyObject *account = self->account, *tally = self->tally;
    if (PyContextVar_Reset(FRAME, self->frame_token) < 0) {
        return -1;
    }
    SET_FIELD(frame_token, Py_None);
    long long start_ns = self->start_ns;
    Py_INCREF(account);
    Py_INCREF(tally);
    int status = -1;
    PyObject *result = NULL, *un = NULL, *intervals = NULL, *interval = NULL;
    int closed = slot_truth(account, &ACCOUNT_CLOSED);
    if (closed < 0) {
        goto done;
    }
    if (closed) { /* its request ended: a single call */
        result = call_with_ns((PyObject *)self, s_record, end_ns - start_ns, NULL);
        status = result == NULL ? -1 : 0;
        goto done;
    }
    un = slot_get(tally, &TALLY_UNION);
    if (un == NULL) {
        goto done;
    }
    intervals = slot_get(un, &UNION_INTERVALS);
    if (intervals == NULL || !PyList_Check(intervals)) {
        if (intervals != NULL) {
            PyErr_SetString(PyExc_TypeError, "IntervalUnion.intervals is not a list");
        }
        goto done;
    }
    interval = pair_of(start_ns, end_ns);
    if (interval == NULL || PyList_Append(intervals, interval) < 0) {
        goto done;
    }
    if (PyList_GET_SIZE(intervals) > MAX_UNSETTLED) {
        result = PyObject_CallMethodNoArgs(un, s_settle);
        if (result == NULL) {
            goto done;
        }
        Py_CLEAR(result);
    }
    if (self->joined != Py_None && self->joined != NULL
        && join_held(self->joined, start_ns, end_ns) < 0) {
        goto done;
    }
    if (self->parent == Py_None) {
        /* Our own enter and exit work, around the stage: not the application's. */
        long long exit_ns;
        if (now_ns(&exit_ns) < 0) {
            goto done;
        }
        if (add_to_slot(account, &ACCOUNT_INSTRUMENTATION_NS,
                        start_ns - self->enter_ns + exit_ns - end_ns) < 0) {
            goto done;
        }
    }
    int pending = PyObject_IsTrue(GC_PENDING);
    if (pending < 0) {
        goto done;
    }
    if (pending) {
        result = PyObject_CallOneArg(DRAIN_GC, self->binding);
        if (result == NULL) {
            goto done;
        }
    }
    status = 0;
done:
    Py_XDECREF(result);
    Py_XDECREF(interval);
    Py_XDECREF(intervals);
    Py_XDECREF(un);
    Py_DECREF(tally);
    Py_DECREF(account);
    return status;
}

/* StageScope._stays_joined: a call that joined its stage's held span stays in it
 * when within the span's join limit (the compression threshold, or the budget if
 * shorter), the held span still the stage's latest. 1, 0, or -1. */
static int
stays_joined(StageCore *self, long long end_ns)
{
    long long limit_ns;
    if (Py_IS_TYPE(self->joined, HeldSpanType)) {
        limit_ns = ((HeldSpan *)self->joined)->limit_ns;
    }
    else {
        PyObject *value = PyObject_GetAttr(self->joined, s_limit_ns);
        if (value == NULL) {
            return -1;
        }
        limit_ns = as_ll(value);
        Py_DECREF(value);
        if (limit_ns == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    if (end_ns - self->start_ns > limit_ns) {
        return 0;
    }
    PyObject *held = slot_get(self->tally, &TALLY_HELD);
    if (held == NULL) {
        return -1;
    }
    Py_DECREF(held); /* identity only */
    return held == self->joined;
}

static PyObject *
core_finish_at(StageCore *self, long long end_ns, PyObject *exc)
{
    PyObject *tally = self->tally;
    if (tally != NULL && tally != Py_None && exc == Py_None) {
        int hot = 1;
        if (self->joined != NULL && self->joined != Py_None) {
            hot = stays_joined(self, end_ns);
            if (hot < 0) {
                return NULL;
            }
        }
        if (hot) {
            /* A successful call in an unsampled request, or one that joins its stage's
             * held span, added to the request's tally; recorded when the request ends. */
            if (add_to_tally(self, end_ns) < 0 && swallow_exception(s_stage_exit) < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
    }
    return call_with_ns((PyObject *)self, s__finish_slow, end_ns, exc);
}

static PyObject *
core_exit(StageCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long end_ns;
    if (now_ns(&end_ns) < 0) {
        return NULL;
    }
    PyObject *exc = nargs >= 2 ? args[1] : Py_None;
    PyObject *result = core_finish_at(self, end_ns, exc);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_FALSE;
}

static PyObject *
core_finish(StageCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *usage = "finish(end_ns, exc=None)";
    PyObject *end = NULL, *exc = Py_None;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 1 || nargs > 2 || nargs + nkw > 2) {
        PyErr_Format(PyExc_TypeError, "%s takes 1 or 2 arguments", usage);
        return NULL;
    }
    end = args[0];
    if (nargs == 2) {
        exc = args[1];
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *keyword = PyTuple_GET_ITEM(kwnames, i);
        if (!PyUnicode_Check(keyword) || PyUnicode_CompareWithASCIIString(keyword, "exc") != 0
            || nargs == 2) {
            PyErr_Format(PyExc_TypeError, "%s: unexpected keyword argument %R", usage, keyword);
            return NULL;
        }
        exc = args[nargs + i];
    }
    long long end_ns = as_ll(end);
    if (end_ns == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return core_finish_at(self, end_ns, exc);
}

static int
core_traverse(StageCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->recorder);
    Py_VISIT(self->name);
    Py_VISIT(self->attributes);
    Py_VISIT(self->account);
    Py_VISIT(self->binding);
    Py_VISIT(self->cold);
    Py_VISIT(self->context_token);
    Py_VISIT(self->frame_token);
    Py_VISIT(self->joined);
    Py_VISIT(self->metric_context);
    Py_VISIT(self->outer_context);
    Py_VISIT(self->parent);
    Py_VISIT(self->probe);
    Py_VISIT(self->span);
    Py_VISIT(self->start_wall_ns);
    Py_VISIT(self->tally);
    return 0;
}

static int
core_clear(StageCore *self)
{
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->name);
    Py_CLEAR(self->attributes);
    Py_CLEAR(self->account);
    Py_CLEAR(self->binding);
    Py_CLEAR(self->cold);
    Py_CLEAR(self->context_token);
    Py_CLEAR(self->frame_token);
    Py_CLEAR(self->joined);
    Py_CLEAR(self->metric_context);
    Py_CLEAR(self->outer_context);
    Py_CLEAR(self->parent);
    Py_CLEAR(self->probe);
    Py_CLEAR(self->span);
    Py_CLEAR(self->start_wall_ns);
    Py_CLEAR(self->tally);
    return 0;
}

static void
core_dealloc(StageCore *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    core_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

#define FIELD(name, member) \
    {name, T_OBJECT_EX, offsetof(StageCore, member), 0, NULL}

static PyMemberDef core_members[] = {
    FIELD("_recorder", recorder),
    FIELD("_name", name),
    FIELD("_attributes", attributes),
    FIELD("_account", account),
    FIELD("_binding", binding),
    FIELD("_cold", cold),
    FIELD("_context_token", context_token),
    FIELD("_frame_token", frame_token),
    FIELD("_joined", joined),
    FIELD("_metric_context", metric_context),
    FIELD("_outer_context", outer_context),
    FIELD("_parent", parent),
    FIELD("_probe", probe),
    FIELD("_span", span),
    FIELD("_start_wall_ns", start_wall_ns),
    FIELD("_tally", tally),
    {"_created_ns", T_LONGLONG, offsetof(StageCore, created_ns), 0, NULL},
    {"_enter_ns", T_LONGLONG, offsetof(StageCore, enter_ns), 0, NULL},
    {"_start_ns", T_LONGLONG, offsetof(StageCore, start_ns), 0, NULL},
    {NULL},
};

static PyObject *
core_is_recording(StageCore *self, void *Py_UNUSED(closure))
{
    if (self->span == NULL || self->span == Py_None) {
        Py_RETURN_FALSE;
    }
    return PyObject_CallMethod(self->span, "is_recording", NULL);
}

static PyGetSetDef core_getset[] = {
    {"is_recording", (getter)core_is_recording, NULL,
     "True when this stage has a sampled span (worth computing costly attributes).", NULL},
    {NULL},
};

static PyMethodDef core_methods[] = {
    {"__enter__", (PyCFunction)core_enter, METH_NOARGS, "Open the stage."},
    {"enter_in", (PyCFunction)core_enter_in, METH_O,
     "enter_in(context): open the stage; context is the current OpenTelemetry context."},
    {"__exit__", (PyCFunction)(void (*)(void))core_exit, METH_FASTCALL,
     "Close the stage now; exceptions propagate."},
    {"finish", (PyCFunction)(void (*)(void))core_finish, METH_FASTCALL | METH_KEYWORDS,
     "finish(end_ns, exc=None): close the stage as having ended at end_ns (perf_counter_ns)."},
    {NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_doc, "The compiled hot path of a stage scope (see otel_inference.stages)."},
    {Py_tp_init, core_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_members, core_members},
    {Py_tp_getset, core_getset},
    {Py_tp_methods, core_methods},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "otel_inference._speedups.StageCore",
    .basicsize = sizeof(StageCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = core_slots,
};

/* ---- Interval unions (accounting.py's merge_intervals, union_ns, settle_intervals) ---- */

typedef struct {
    long long lo, hi;
} Interval;

static int
interval_order(const void *a, const void *b)
{
    const Interval *x = a, *y = b;
    if (x->lo != y->lo) {
        return x->lo < y->lo ? -1 : 1;
    }
    return (x->hi > y->hi) - (x->hi < y->hi);
}

/* The non-empty intervals of ``sequence`` (pairs of ints), clipped to start at
 * ``floor`` when floor >= 0 (those ending at or before it dropped), merged into
 * sorted disjoint intervals (touching ones merge). *count is how many; the array
 * is PyMem_Malloc'ed (NULL when none). -1 with an exception set on bad input. */
static int
merged_intervals(PyObject *sequence, long long floor, Interval **out, Py_ssize_t *count)
{
    *out = NULL;
    *count = 0;
    PyObject *items = PySequence_Fast(sequence, "intervals must be a sequence of pairs");
    if (items == NULL) {
        return -1;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(items);
    if (size == 0) {
        Py_DECREF(items);
        return 0;
    }
    Interval *intervals = PyMem_Malloc(sizeof(Interval) * (size_t)size);
    if (intervals == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t n = 0;
    int sorted = 1;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        long long lo, hi;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
            lo = as_ll(PyTuple_GET_ITEM(item, 0));
            hi = as_ll(PyTuple_GET_ITEM(item, 1));
        }
        else {
            PyObject *pair = PySequence_Tuple(item);
            if (pair == NULL || PyTuple_GET_SIZE(pair) != 2) {
                if (pair != NULL) {
                    PyErr_SetString(PyExc_ValueError, "an interval is a (start, end) pair");
                }
                Py_XDECREF(pair);
                goto failed;
            }
            lo = as_ll(PyTuple_GET_ITEM(pair, 0));
            hi = as_ll(PyTuple_GET_ITEM(pair, 1));
            Py_DECREF(pair);
        }
        if (PyErr_Occurred()) {
            goto failed;
        }
        if (floor >= 0) {
            if (hi <= floor) {
                continue;
            }
            if (lo < floor) {
                lo = floor;
            }
        }
        if (hi <= lo) {
            continue;
        }
        if (n > 0 && interval_order(&intervals[n - 1], &(Interval){lo, hi}) > 0) {
            sorted = 0;
        }
        intervals[n].lo = lo;
        intervals[n].hi = hi;
        n++;
    }
    Py_DECREF(items);
    if (!sorted) {
        qsort(intervals, (size_t)n, sizeof(Interval), interval_order);
    }
    Py_ssize_t merged = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (merged > 0 && intervals[i].lo <= intervals[merged - 1].hi) {
            if (intervals[i].hi > intervals[merged - 1].hi) {
                intervals[merged - 1].hi = intervals[i].hi;
            }
        }
        else {
            intervals[merged++] = intervals[i];
        }
    }
    if (merged == 0) {
        PyMem_Free(intervals);
        return 0;
    }
    *out = intervals;
    *count = merged;
    return 0;
failed:
    Py_DECREF(items);
    PyMem_Free(intervals);
    return -1;
}

static PyObject *
interval_list(const Interval *intervals, Py_ssize_t count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = pair_of(intervals[i].lo, intervals[i].hi);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return list;
}

static PyObject *
merge_intervals(PyObject *module, PyObject *intervals)
{
    Interval *merged;
    Py_ssize_t count;
    if (merged_intervals(intervals, -1, &merged, &count) < 0) {
        return NULL;
    }
    PyObject *result = interval_list(merged, count);
    PyMem_Free(merged);
    return result;
}

static PyObject *
union_ns(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "union_ns(intervals, start_ns, end_ns)");
        return NULL;
    }
    long long start = as_ll(args[1]), end = as_ll(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Interval *merged;
    Py_ssize_t count;
    if (merged_intervals(args[0], -1, &merged, &count) < 0) {
        return NULL;
    }
    long long covered = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        long long lo = merged[i].lo > start ? merged[i].lo : start;
        long long hi = merged[i].hi < end ? merged[i].hi : end;
        if (hi > lo) {
            covered += hi - lo;
        }
    }
    PyMem_Free(merged);
    return PyLong_FromLongLong(covered);
}

static PyObject *
settle_intervals(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "settle_intervals(intervals, floor, keep)");
        return NULL;
    }
    long long floor = as_ll(args[1]);
    Py_ssize_t keep = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (keep < 0) {
        PyErr_SetString(PyExc_ValueError, "keep must be >= 0");
        return NULL;
    }
    Interval *merged;
    Py_ssize_t count;
    if (merged_intervals(args[0], floor, &merged, &count) < 0) {
        return NULL;
    }
    Py_ssize_t settled = count > keep ? count - keep : 0;
    long long settled_ns = 0;
    for (Py_ssize_t i = 0; i < settled; i++) {
        settled_ns += merged[i].hi - merged[i].lo;
    }
    PyObject *kept = interval_list(merged + settled, count - settled);
    PyObject *result = NULL;
    if (kept != NULL) {
        if (settled > 0) {
            result = Py_BuildValue("(LLN)", settled_ns, merged[settled - 1].hi, kept);
        }
        else {
            result = Py_BuildValue("(LON)", settled_ns, Py_None, kept);
        }
    }
    PyMem_Free(merged);
    return result;
}

static PyObject *
bind(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"frame",        "loop",         "gc_pending",    "drain_gc",
                               "failed",       "max_unsettled", "fresh_scope_ns", "clock_namespace",
                               "get_context",  "account_type", "tally_type",    "union_type",
                               "binding_type", "recorder_type", NULL};
    PyObject *frame, *loop, *gc_pending, *drain_gc, *failed, *clock_namespace, *get_context,
        *account_type, *tally_type, *union_type, *binding_type, *recorder_type;
    Py_ssize_t max_unsettled;
    long long fresh_scope_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOnLO!OOOOOO:bind", keywords, &frame,
                                     &loop, &gc_pending, &drain_gc, &failed, &max_unsettled,
                                     &fresh_scope_ns, &PyDict_Type, &clock_namespace,
                                     &get_context, &account_type, &tally_type, &union_type,
                                     &binding_type, &recorder_type)) {
        return NULL;
    }
    struct {
        PyObject *cls;
        const char *name;
        SlotRef *ref;
    } slots[] = {
        {account_type, "cold", &ACCOUNT_COLD},
        {account_type, "tallies", &ACCOUNT_TALLIES},
        {account_type, "recording", &ACCOUNT_RECORDING},
        {account_type, "closed", &ACCOUNT_CLOSED},
        {account_type, "_instrumentation_ns", &ACCOUNT_INSTRUMENTATION_NS},
        {account_type, "span_seq", &ACCOUNT_SPAN_SEQ},
        {tally_type, "name", &TALLY_NAME},
        {tally_type, "parent", &TALLY_PARENT},
        {tally_type, "cold", &TALLY_COLD},
        {tally_type, "context", &TALLY_CONTEXT},
        {tally_type, "error_type", &TALLY_ERROR_TYPE},
        {tally_type, "held", &TALLY_HELD},
        {tally_type, "union", &TALLY_UNION},
        {union_type, "intervals", &UNION_INTERVALS},
        {union_type, "settled", &UNION_SETTLED},
        {binding_type, "call_duration", &BINDING_CALL_DURATION},
        {recorder_type, "_binding", &RECORDER_BINDING},
        {(PyObject *)Py_TYPE(loop), "started", &LOOP_STARTED},
    };
    int tallies_resolved = 1;
    for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++) {
        if (resolve_slot(slots[i].cls, slots[i].name, slots[i].ref) < 0) {
            return NULL;
        }
        if (slots[i].ref->type == NULL && (slots[i].cls == tally_type
                                           || slots[i].cls == union_type)) {
            tallies_resolved = 0;
        }
    }
    /* Tallies are made here only when every field has a slot (make_tally); their
     * classes must also have no other field that __init__ would set. */
    int exact = tallies_resolved
                && ((PyTypeObject *)tally_type)->tp_basicsize
                       == (Py_ssize_t)(sizeof(PyObject) + 7 * sizeof(PyObject *))
                && ((PyTypeObject *)union_type)->tp_basicsize
                       == (Py_ssize_t)(sizeof(PyObject) + 2 * sizeof(PyObject *))
                && ((PyTypeObject *)tally_type)->tp_dictoffset == 0
                && ((PyTypeObject *)union_type)->tp_dictoffset == 0;
    Py_XSETREF(TALLY_TYPE, exact ? (PyTypeObject *)Py_NewRef(tally_type) : NULL);
    Py_XSETREF(UNION_TYPE, exact ? (PyTypeObject *)Py_NewRef(union_type) : NULL);
    Py_INCREF(get_context);
    Py_XSETREF(GET_CONTEXT, get_context);
    Py_INCREF(clock_namespace);
    Py_XSETREF(CLOCK_NAMESPACE, clock_namespace);
    if (!PyContextVar_CheckExact(frame)) {
        PyErr_SetString(PyExc_TypeError, "bind(): frame must be a ContextVar");
        return NULL;
    }
    Py_INCREF(frame);
    Py_XSETREF(FRAME, frame);
    Py_INCREF(loop);
    Py_XSETREF(LOOP, loop);
    Py_INCREF(gc_pending);
    Py_XSETREF(GC_PENDING, gc_pending);
    Py_INCREF(drain_gc);
    Py_XSETREF(DRAIN_GC, drain_gc);
    Py_INCREF(failed);
    Py_XSETREF(FAILED, failed);
    MAX_UNSETTLED = max_unsettled;
    FRESH_SCOPE_NS = fresh_scope_ns;
    Py_RETURN_NONE;
}

/* ---- The request's end: stages._tally_rows and fastpath._record_rows, compiled ---- */

/* A float, or an int a double holds exactly: its value in *out (1); else 0. */
static inline int
exact_double(PyObject *number, double *out)
{
    if (PyFloat_CheckExact(number)) {
        *out = PyFloat_AS_DOUBLE(number);
        return 1;
    }
    if (PyLong_CheckExact(number)) {
        int overflow;
        long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
        if (!overflow && value < (1LL << 53) && value > -(1LL << 53)) {
            *out = (double)value;
            return 1;
        }
        PyErr_Clear();
    }
    return 0;
}

/* ``a <op> b`` as Python compares them: floats and small ints as doubles (the
 * same answers, NaN included), anything else through the objects. */
static inline int
compare(PyObject *a, PyObject *b, int op)
{
    double x, y;
    if (exact_double(a, &x) && exact_double(b, &y)) {
        switch (op) {
        case Py_LT:
            return x < y;
        case Py_GT:
            return x > y;
        case Py_GE:
            return x >= y;
        default:
            break;
        }
    }
    return PyObject_RichCompareBool(a, b, op);
}

/* ``a + b``: two floats, or two ints within 62 bits, added here; anything else by
 * Python. */
static inline PyObject *
add(PyObject *a, PyObject *b)
{
    if (PyFloat_CheckExact(a) && PyFloat_CheckExact(b)) {
        return PyFloat_FromDouble(PyFloat_AS_DOUBLE(a) + PyFloat_AS_DOUBLE(b));
    }
    if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        int overflow_a, overflow_b;
        long long x = PyLong_AsLongLongAndOverflow(a, &overflow_a);
        long long y = PyLong_AsLongLongAndOverflow(b, &overflow_b);
        if (!overflow_a && !overflow_b && x < (1LL << 62) && x > -(1LL << 62)
            && y < (1LL << 62) && y > -(1LL << 62)) {
            return PyLong_FromLongLong(x + y);
        }
    }
    return PyNumber_Add(a, b);
}


static PyObject *s__attribute_sets, *s_budgets, *s_metric_attributes, *s_count, *s_total_ns,
    *s__pairs, *s_boundaries;
static PyObject *BILLION = NULL, *ONE = NULL, *ZERO = NULL; /* 1e9 (seconds = ns / 1e9), 1, 0 */

/* The calls and the union of one tally's intervals: 1 (set), 0 (no finished call
 * yet: not recorded), -1. A single call is its own length, as in Python. */
static int
tally_figures(PyObject *tally, PyObject **seconds, PyObject **calls)
{
    PyObject *un = slot_get(tally, &TALLY_UNION);
    if (un == NULL) {
        return -1;
    }
    int status = -1;
    PyObject *intervals = slot_get(un, &UNION_INTERVALS), *settled = NULL, *total = NULL;
    if (intervals == NULL || (settled = slot_get(un, &UNION_SETTLED)) == NULL) {
        goto done;
    }
    if (settled == Py_None && PyList_CheckExact(intervals)) {
        /* Nothing settled yet: the calls are the intervals, the time their union
         * (IntervalUnion.count and total_ns(), as Python computes them). */
        Py_ssize_t count = PyList_GET_SIZE(intervals);
        if (count == 0) {
            status = 0;
            goto done;
        }
        long long covered = 0;
        if (count == 1 && PyTuple_CheckExact(PyList_GET_ITEM(intervals, 0))
            && PyTuple_GET_SIZE(PyList_GET_ITEM(intervals, 0)) == 2) {
            PyObject *only = PyList_GET_ITEM(intervals, 0); /* a single call: its length */
            covered = as_ll(PyTuple_GET_ITEM(only, 1)) - as_ll(PyTuple_GET_ITEM(only, 0));
        }
        else {
            Interval *merged;
            Py_ssize_t merged_count;
            if (merged_intervals(intervals, -1, &merged, &merged_count) < 0) {
                goto done;
            }
            for (Py_ssize_t i = 0; i < merged_count; i++) {
                covered += merged[i].hi - merged[i].lo;
            }
            PyMem_Free(merged);
        }
        if (PyErr_Occurred()) {
            goto done;
        }
        if (covered < (1LL << 53) && covered > -(1LL << 53)) { /* exact as a double */
            *seconds = PyFloat_FromDouble((double)covered / 1e9);
            *calls = *seconds == NULL ? NULL : PyLong_FromSsize_t(count);
            status = *calls == NULL ? -1 : 1;
            goto done;
        }
    }
    *calls = PyObject_GetAttr(un, s_count);
    int any = *calls == NULL ? -1 : PyObject_IsTrue(*calls);
    if (any <= 0) {
        status = any;
        goto done;
    }
    total = PyObject_CallMethodNoArgs(un, s_total_ns);
    *seconds = total == NULL ? NULL : PyNumber_TrueDivide(total, BILLION);
    status = *seconds == NULL ? -1 : 1;
done:
    if (status <= 0) {
        Py_CLEAR(*calls);
        Py_CLEAR(*seconds);
    }
    Py_XDECREF(total);
    Py_XDECREF(settled);
    Py_XDECREF(intervals);
    Py_DECREF(un);
    return status;
}

/* mapping.get(key): a new reference (None when absent), or NULL. */
static PyObject *
get_or_none(PyObject *mapping, PyObject *key)
{
    if (PyDict_CheckExact(mapping)) {
        PyObject *value = PyDict_GetItemWithError(mapping, key);
        if (value == NULL && PyErr_Occurred()) {
            return NULL;
        }
        return Py_NewRef(value == NULL ? Py_None : value);
    }
    /* Budgets are a read-only view (a mappingproxy): a lookup through its protocol
     * costs half a call of .get(). */
    int present = PySequence_Contains(mapping, key);
    if (present < 0) {
        return NULL;
    }
    return present ? PyObject_GetItem(mapping, key) : Py_NewRef(Py_None);
}

/* One tally's records: appends to rows (and breaches), ends its held span. */
static int
tally_row(PyObject *tally, PyObject *binding, PyObject *attribute_sets, PyObject *budgets,
          PyObject *end_held, PyObject *error_key, PyObject *rows, PyObject *breaches)
{
    PyObject *seconds = NULL, *calls = NULL;
    int found = tally_figures(tally, &seconds, &calls);
    if (found <= 0) {
        return found;
    }
    int status = -1;
    PyObject *name = NULL, *parent = NULL, *cold = NULL, *key = NULL, *attributes = NULL,
             *error_type = NULL, *budget = NULL, *held = NULL, *context = NULL, *row = NULL;
    if ((name = slot_get(tally, &TALLY_NAME)) == NULL
        || (parent = slot_get(tally, &TALLY_PARENT)) == NULL
        || (cold = slot_get(tally, &TALLY_COLD)) == NULL
        || (key = PyTuple_Pack(3, name, parent, cold)) == NULL) {
        goto done;
    }
    if (PyDict_CheckExact(attribute_sets)) {
        attributes = PyDict_GetItemWithError(attribute_sets, key);
        if (attributes == NULL && PyErr_Occurred()) {
            goto done;
        }
        Py_XINCREF(attributes);
    }
    else if ((attributes = get_or_none(attribute_sets, key)) == NULL) {
        goto done;
    }
    int cached = attributes == NULL ? 0 : PyObject_IsTrue(attributes);
    if (cached < 0) {
        goto done;
    }
    if (!cached) {
        Py_XSETREF(attributes, PyObject_CallMethodObjArgs(binding, s_metric_attributes, name,
                                                          parent, cold, NULL));
        if (attributes == NULL) {
            goto done;
        }
    }
    if ((error_type = slot_get(tally, &TALLY_ERROR_TYPE)) == NULL) {
        goto done;
    }
    if (error_type != Py_None) { /* {**attributes, error.type: ...} */
        PyObject *with_error = PyDict_New();
        if (with_error == NULL || PyDict_Update(with_error, attributes) < 0
            || PyDict_SetItem(with_error, error_key, error_type) < 0) {
            Py_XDECREF(with_error);
            goto done;
        }
        Py_SETREF(attributes, with_error);
    }
    if ((budget = get_or_none(budgets, name)) == NULL) {
        goto done;
    }
    int exceeded = budget == Py_None ? 0 : compare(seconds, budget, Py_GT);
    if (exceeded < 0 || (held = slot_get(tally, &TALLY_HELD)) == NULL) {
        goto done;
    }
    if (held != Py_None) {
        PyObject *ended = PyObject_CallFunctionObjArgs(end_held, held, budget,
                                                       exceeded ? Py_True : Py_False, NULL);
        if (ended == NULL) {
            goto done;
        }
        Py_DECREF(ended);
        if (slot_set(tally, &TALLY_HELD, Py_None) < 0) {
            goto done;
        }
    }
    if ((context = slot_get(tally, &TALLY_CONTEXT)) == NULL
        || (row = PyTuple_Pack(4, seconds, calls, attributes, context)) == NULL
        || PyList_Append(rows, row) < 0) {
        goto done;
    }
    if (exceeded) {
        Py_SETREF(row, PyTuple_Pack(3, name, attributes, context));
        if (row == NULL || PyList_Append(breaches, row) < 0) {
            goto done;
        }
    }
    status = 0;
done:
    Py_XDECREF(row);
    Py_XDECREF(context);
    Py_XDECREF(held);
    Py_XDECREF(budget);
    Py_XDECREF(error_type);
    Py_XDECREF(attributes);
    Py_XDECREF(key);
    Py_XDECREF(cold);
    Py_XDECREF(parent);
    Py_XDECREF(name);
    Py_DECREF(calls);
    Py_DECREF(seconds);
    return status;
}

static PyObject *
tally_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "tally_rows(tallies, binding, end_held, error_key)");
        return NULL;
    }
    PyObject *binding = args[1], *end_held = args[2], *error_key = args[3];
    PyObject *tallies = PySequence_Fast(args[0], "tallies must be a sequence");
    if (tallies == NULL) {
        return NULL;
    }
    PyObject *result = NULL, *rows = NULL, *breaches = NULL;
    PyObject *attribute_sets = PyObject_GetAttr(binding, s__attribute_sets);
    PyObject *budgets = attribute_sets == NULL ? NULL : PyObject_GetAttr(binding, s_budgets);
    if (budgets == NULL || (rows = PyList_New(0)) == NULL
        || (breaches = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(tallies); i++) {
        if (tally_row(PySequence_Fast_GET_ITEM(tallies, i), binding, attribute_sets, budgets,
                      end_held, error_key, rows, breaches) < 0) {
            goto done;
        }
    }
    result = PyTuple_Pack(2, rows, breaches);
done:
    Py_XDECREF(breaches);
    Py_XDECREF(rows);
    Py_XDECREF(budgets);
    Py_XDECREF(attribute_sets);
    Py_DECREF(tallies);
    return result;
}

/* _Series fields (fastpath._Figures' slots), resolved by bind_series(). */
static SlotRef SERIES_COUNTS, SERIES_SUM, SERIES_MIN, SERIES_MAX, SERIES_COUNT,
    SERIES_EXEMPLARS;

static PyObject *
bind_series(PyObject *module, PyObject *series_type)
{
    if (resolve_slot(series_type, "counts", &SERIES_COUNTS) < 0
        || resolve_slot(series_type, "sum", &SERIES_SUM) < 0
        || resolve_slot(series_type, "min", &SERIES_MIN) < 0
        || resolve_slot(series_type, "max", &SERIES_MAX) < 0
        || resolve_slot(series_type, "count", &SERIES_COUNT) < 0
        || resolve_slot(series_type, "exemplars", &SERIES_EXEMPLARS) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* bisect.bisect_left(boundaries, amount) on a tuple of numbers. */
static Py_ssize_t
bucket_of(PyObject *boundaries, PyObject *amount)
{
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(boundaries);
    double value = 0, bound;
    int as_double = exact_double(amount, &value);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        PyObject *boundary = PyTuple_GET_ITEM(boundaries, mid);
        int less;
        if (as_double && exact_double(boundary, &bound)) {
            less = bound < value;
        }
        else {
            less = PyObject_RichCompareBool(boundary, amount, Py_LT);
            if (less < 0) {
                return -1;
            }
        }
        if (less) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* One histogram update of record(): the bucket, sum, min, max and exemplar. */
static int
add_to_series(PyObject *series, PyObject *boundaries, PyObject *amount, PyObject *exemplar_tail)
{
    Py_ssize_t index = bucket_of(boundaries, amount);
    if (index < 0) {
        return -1;
    }
    int status = -1;
    PyObject *counts = slot_get(series, &SERIES_COUNTS), *figure = NULL, *updated = NULL;
    if (counts == NULL) {
        return -1;
    }
    if (!PyList_CheckExact(counts) || index >= PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_IndexError, "series counts do not match the boundaries");
        goto done;
    }
    updated = add(PyList_GET_ITEM(counts, index), ONE);
    if (updated == NULL) {
        goto done;
    }
    PyList_SetItem(counts, index, updated); /* steals updated */
    updated = NULL;
    if ((figure = slot_get(series, &SERIES_SUM)) == NULL
        || (updated = add(figure, amount)) == NULL
        || slot_set(series, &SERIES_SUM, updated) < 0) {
        goto done;
    }
    Py_CLEAR(figure);
    if ((figure = slot_get(series, &SERIES_MIN)) == NULL) {
        goto done;
    }
    int beyond = compare(amount, figure, Py_LT);
    if (beyond < 0 || (beyond && slot_set(series, &SERIES_MIN, amount) < 0)) {
        goto done;
    }
    Py_CLEAR(figure);
    if ((figure = slot_get(series, &SERIES_MAX)) == NULL) {
        goto done;
    }
    beyond = compare(amount, figure, Py_GT);
    if (beyond < 0 || (beyond && slot_set(series, &SERIES_MAX, amount) < 0)) {
        goto done;
    }
    Py_CLEAR(figure);
    if (slot_set(series, &SERIES_COUNT, ONE) < 0) { /* has figures */
        goto done;
    }
    if (exemplar_tail != NULL) { /* (when, span, attributes): the latest per bucket */
        PyObject *exemplar = PyTuple_Pack(4, amount, PyTuple_GET_ITEM(exemplar_tail, 0),
                                          PyTuple_GET_ITEM(exemplar_tail, 1),
                                          PyTuple_GET_ITEM(exemplar_tail, 2));
        PyObject *bucket = exemplar == NULL ? NULL : PyLong_FromSsize_t(index);
        figure = bucket == NULL ? NULL : slot_get(series, &SERIES_EXEMPLARS);
        int stored = figure == NULL ? -1 : PyObject_SetItem(figure, bucket, exemplar);
        Py_XDECREF(bucket);
        Py_XDECREF(exemplar);
        if (stored < 0) {
            goto done;
        }
    }
    status = 0;
done:
    Py_XDECREF(updated);
    Py_XDECREF(figure);
    Py_DECREF(counts);
    return status;
}

static long long
wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* fastpath._record_rows, compiled: the loop of FastHistogram.record_pairs (both
 * locks held by the caller). */
static PyObject *
record_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "record_rows(histogram, other, rows, filtered, pair_of, negative)");
        return NULL;
    }
    PyObject *histogram = args[0], *other = args[1], *pair_of_attributes = args[4],
             *negative = args[5];
    int filtered = PyObject_IsTrue(args[3]);
    if (filtered < 0) {
        return NULL;
    }
    PyObject *rows = PySequence_Fast(args[2], "rows must be a sequence");
    if (rows == NULL) {
        return NULL;
    }
    PyObject *result = NULL, *judged = NULL, *span = Py_NewRef(Py_None), *tail = NULL;
    PyObject *pairs = PyObject_GetAttr(histogram, s__pairs);
    PyObject *boundaries = pairs == NULL ? NULL : PyObject_GetAttr(histogram, s_boundaries);
    PyObject *other_boundaries = boundaries == NULL ? NULL : PyObject_GetAttr(other, s_boundaries);
    if (other_boundaries == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(pairs) || !PyTuple_CheckExact(boundaries)
        || !PyTuple_CheckExact(other_boundaries)) {
        PyErr_SetString(PyExc_TypeError, "record_rows: not a FastHistogram's fields");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(rows); i++) {
        PyObject *row = PySequence_Fast_GET_ITEM(rows, i);
        if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 4) {
            PyErr_SetString(PyExc_TypeError, "a row is (amount, other_amount, attributes, context)");
            goto done;
        }
        PyObject *amount = PyTuple_GET_ITEM(row, 0), *other_amount = PyTuple_GET_ITEM(row, 1),
                 *attributes = PyTuple_GET_ITEM(row, 2), *context = PyTuple_GET_ITEM(row, 3);
        PyObject *id = PyLong_FromVoidPtr(attributes);
        if (id == NULL) {
            goto done;
        }
        PyObject *pair = PyDict_GetItemWithError(pairs, id);
        Py_DECREF(id);
        if (pair == NULL && PyErr_Occurred()) {
            goto done;
        }
        if (pair != NULL && PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 4
            && PyTuple_GET_ITEM(pair, 0) == attributes && PyTuple_GET_ITEM(pair, 1) == other) {
            Py_INCREF(pair);
        }
        else {
            pair = PyObject_CallFunctionObjArgs(pair_of_attributes, other, attributes, NULL);
            if (pair == NULL) {
                goto done;
            }
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 4) {
                Py_DECREF(pair);
                PyErr_SetString(PyExc_TypeError, "_pair_locked must return a 4-tuple");
                goto done;
            }
        }
        if (filtered && context != judged) { /* one verdict per distinct context */
            judged = context;
            Py_SETREF(span, PyObject_CallMethod(histogram, "_sampled", "O", context));
            if (span == NULL) {
                Py_DECREF(pair);
                goto done;
            }
        }
        Py_CLEAR(tail);
        if (span != Py_None) { /* the exemplar's (time, span, attributes) */
            tail = Py_BuildValue("(LOO)", wall_ns(), span, attributes);
            if (tail == NULL) {
                Py_DECREF(pair);
                goto done;
            }
        }
        int failed = 0;
        PyObject *amounts[2] = {amount, other_amount};
        PyObject *instruments[2] = {histogram, other};
        PyObject *bounds[2] = {boundaries, other_boundaries};
        for (int k = 0; k < 2 && !failed; k++) {
            int below = compare(amounts[k], ZERO, Py_LT);
            if (below < 0) {
                failed = 1;
            }
            else if (below) { /* as the SDK's histogram (and record()): dropped */
                PyObject *logged = PyObject_CallOneArg(negative, instruments[k]);
                failed = logged == NULL;
                Py_XDECREF(logged);
            }
            else {
                failed = add_to_series(PyTuple_GET_ITEM(pair, 2 + k), bounds[k], amounts[k],
                                       tail) < 0;
            }
        }
        Py_DECREF(pair);
        if (failed) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(tail);
    Py_XDECREF(span);
    Py_XDECREF(other_boundaries);
    Py_XDECREF(boundaries);
    Py_XDECREF(pairs);
    Py_DECREF(rows);
    return result;
}

/* ---- StageRecorder.stage, compiled: the scope made without a Python frame ---- */

static PyTypeObject *CORE_TYPE = NULL;  /* StageCore */
static PyTypeObject *SCOPE_TYPE = NULL; /* stages.StageScope, from bind_scope() */

static PyObject *
bind_scope(PyObject *module, PyObject *scope_type)
{
    if (!PyType_Check(scope_type) || !PyType_IsSubtype((PyTypeObject *)scope_type, CORE_TYPE)) {
        PyErr_SetString(PyExc_TypeError, "bind_scope(): not a subclass of StageCore");
        return NULL;
    }
    Py_XSETREF(SCOPE_TYPE, (PyTypeObject *)Py_NewRef(scope_type));
    Py_RETURN_NONE;
}

/* ``StageScope(recorder, name, attributes or None)``: what the Python method does
 * (its ``**attributes`` dict is only made when there are some: a scope reads them
 * only when truthy). */
static PyObject *
recorder_stage(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (SCOPE_TYPE == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "otel_inference._speedups: bind_scope() was not called");
        return NULL;
    }
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "stage() takes a stage name and attributes as keywords (%zd positional "
                     "arguments given)",
                     nargs - 1);
        return NULL;
    }
    PyObject *attributes = Py_None;
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (keywords > 0) {
        attributes = PyDict_New();
        if (attributes == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < keywords; i++) {
            if (PyDict_SetItem(attributes, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                Py_DECREF(attributes);
                return NULL;
            }
        }
    }
    else {
        Py_INCREF(attributes);
    }
    StageCore *scope = (StageCore *)SCOPE_TYPE->tp_alloc(SCOPE_TYPE, 0);
    if (scope == NULL) {
        Py_DECREF(attributes);
        return NULL;
    }
    scope->recorder = Py_NewRef(args[0]);
    scope->name = Py_NewRef(args[1]);
    scope->attributes = attributes;
    /* Making the scope is our work too: ``with stage(...)`` counts from here. */
    if (now_ns(&scope->created_ns) < 0) {
        Py_DECREF(scope);
        return NULL;
    }
    return (PyObject *)scope;
}

static PyMethodDef recorder_stage_def = {
    "stage", (PyCFunction)(void (*)(void))recorder_stage, METH_FASTCALL | METH_KEYWORDS,
    "stage($self, name, /, **attributes)\n--\n\n"
    "A stage as a context manager (sync or async) or a decorator.",
};

static PyObject *
module_now_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    long long value;
    if (now_ns(&value) < 0) {
        return NULL;
    }
    return PyLong_FromLongLong(value);
}

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_VARARGS | METH_KEYWORDS,
     "bind(*, frame, loop, gc_pending, drain_gc, failed, max_unsettled, fresh_scope_ns, "
     "clock_namespace, get_context, account_type, tally_type, union_type, binding_type, "
     "recorder_type): the stages module's state the hot path reads, and the classes whose "
     "slots it reads in place."},
    {"merge_intervals", merge_intervals, METH_O,
     "merge_intervals(intervals): sorted, disjoint intervals covering the same points."},
    {"union_ns", (PyCFunction)(void (*)(void))union_ns, METH_FASTCALL,
     "union_ns(intervals, start_ns, end_ns): the union's length clipped to [start, end]."},
    {"settle_intervals", (PyCFunction)(void (*)(void))settle_intervals, METH_FASTCALL,
     "settle_intervals(intervals, floor, keep): (settled_ns, settled_end, kept)."},
    {"tally_rows", (PyCFunction)(void (*)(void))tally_rows, METH_FASTCALL,
     "tally_rows(tallies, binding, end_held, error_key): (rows, breaches) of an ended "
     "request's tallies (stages._tally_rows)."},
    {"bind_series", bind_series, METH_O,
     "bind_series(series_type): the fast path's series class, updated at its slots."},
    {"record_rows", (PyCFunction)(void (*)(void))record_rows, METH_FASTCALL,
     "record_rows(histogram, other, rows, filtered, pair_of, negative): "
     "FastHistogram.record_pairs' loop, both locks held (fastpath._record_rows)."},
    {"bind_scope", bind_scope, METH_O,
     "bind_scope(scope_type): the StageScope class stage_method makes."},
    {"now_ns", module_now_ns, METH_NOARGS,
     "The clock StageCore reads: time.perf_counter_ns()'s."},
    {NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "otel_inference._speedups",
    .m_doc = "Compiled hot path of otel_inference.stages (optional; Python is the fallback).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                              \
    do {                                               \
        var = PyUnicode_InternFromString(text);        \
        if (var == NULL) {                             \
            return NULL;                               \
        }                                              \
    } while (0)

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s__bind, "_bind");
    INTERN(s__enter_alone, "_enter_alone");
    INTERN(s__new_tally, "_new_tally");
    INTERN(s__enter_sampled, "_enter_sampled");
    INTERN(s_stage_probe, "stage_probe");
    INTERN(s_record, "record");
    INTERN(s_settle, "settle");
    INTERN(s_compressible, "compressible");
    INTERN(s_context, "context");
    INTERN(s_seq, "seq");
    INTERN(s_span_seq, "span_seq");
    INTERN(s_limit_ns, "limit_ns");
    INTERN(s_calls, "calls");
    INTERN(s_busy_ns, "busy_ns");
    INTERN(s_end_ns, "end_ns");
    INTERN(s_end_wall_ns, "end_wall_ns");
    INTERN(s__finish_slow, "_finish_slow");
    INTERN(s_stage_enter, "stage-enter");
    INTERN(s_stage_exit, "stage-exit");
    INTERN(s_perf_counter_ns, "perf_counter_ns");
    INTERN(s__attribute_sets, "_attribute_sets");
    INTERN(s_budgets, "budgets");
    INTERN(s_metric_attributes, "metric_attributes");
    INTERN(s_count, "count");
    INTERN(s_total_ns, "total_ns");
    INTERN(s__pairs, "_pairs");
    INTERN(s_boundaries, "boundaries");
    BILLION = PyFloat_FromDouble(1e9);
    ONE = PyLong_FromLong(1);
    ZERO = PyLong_FromLong(0);
    if (BILLION == NULL || ONE == NULL || ZERO == NULL) {
        return NULL;
    }

    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL) {
        return NULL;
    }
    PERF_COUNTER_NS = PyObject_GetAttrString(time_module, "perf_counter_ns");
    Py_DECREF(time_module);
    if (PERF_COUNTER_NS == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    HeldSpanType = (PyTypeObject *)PyType_FromSpec(&held_spec);
    if (HeldSpanType == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(HeldSpanType);
    if (PyModule_AddObject(module, "HeldSpan", (PyObject *)HeldSpanType) < 0) {
        Py_DECREF(HeldSpanType);
        Py_DECREF(module);
        return NULL;
    }
    PyObject *core = PyType_FromSpec(&core_spec);
    if (core == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    CORE_TYPE = (PyTypeObject *)Py_NewRef(core);
    if (PyModule_AddObject(module, "StageCore", core) < 0) {
        Py_DECREF(core);
        Py_DECREF(module);
        return NULL;
    }
    /* StageRecorder.stage: a function made a method (bound to the recorder on access). */
    PyObject *function = PyCFunction_NewEx(&recorder_stage_def, NULL, NULL);
    PyObject *method = function == NULL ? NULL : PyInstanceMethod_New(function);
    Py_XDECREF(function);
    if (method == NULL || PyModule_AddObject(module, "stage_method", method) < 0) {
        Py_XDECREF(method);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
