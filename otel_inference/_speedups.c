/* The stage hot path, compiled: ``StageCore``, the base of ``stages.StageScope``.
 *
 * A ``with stage(...)`` call inside a request is a handful of steps (read the
 * context's frame, find the stage's tally, set the frame, read the clock, and on
 * exit append the call's interval to the tally). In Python each step costs tens of
 * nanoseconds of interpreter overhead and the whole call ~2 us; here it is a few
 * hundred nanoseconds. Only that path is compiled: every other branch (outside a
 * request, sampled requests' spans, a first call's new tally, failures, late
 * records) calls the same Python methods of ``StageScope`` that the pure-Python
 * core (``stages._PyStageCore``, the reference this file mirrors line by line)
 * calls. Build failures are not fatal: the package then runs the Python core.
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

static PyObject *s__binding, *s__bind, *s__enter_alone, *s__new_tally, *s__enter_sampled,
    *s_cold, *s_tallies, *s_recording, *s_call_duration, *s_started, *s_stage_probe, *s_closed,
    *s_record, *s_union, *s_intervals, *s_settle, *s__instrumentation_ns,
    *s__finish_slow, *s_stage_enter, *s_stage_exit, *s_perf_counter_ns, *s_held, *s_compressible,
    *s_context, *s_seq, *s_span_seq, *s_limit_ns, *s_calls, *s_busy_ns,
    *s_end_ns, *s_end_wall_ns;

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

static inline int
now_ns(long long *out)
{
    if (CLOCK_NAMESPACE != NULL) {
        /* A test's deterministic clock (monkeypatched stages.perf_counter_ns) is read
         * by both cores alike. */
        PyObject *clock = PyDict_GetItemWithError(CLOCK_NAMESPACE, s_perf_counter_ns);
        if (clock != NULL && clock != PERF_COUNTER_NS) {
            return call_clock(clock, out);
        }
        if (clock == NULL && PyErr_Occurred()) {
            return -1;
        }
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
        PyObject *span_seq = PyObject_GetAttr(account, s_span_seq);
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
    PyObject *held = PyObject_GetAttr(tally, s_held);
    int join = held == NULL ? -1 : can_join(held, context, account);
    int status = -1;
    if (join < 0) {
        goto done;
    }
    if (join) {
        SET_FIELD(joined, held);
        PyObject *call_duration = PyObject_GetAttr(binding, s_call_duration);
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

/* The body of ``__enter__``'s ``try``: 0, or -1 with an exception set. */
static int
enter_frame(StageCore *self, PyObject *current)
{
    PyObject *binding = PyObject_GetAttr(self->recorder, s__binding);
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
        PyObject *cold = PyObject_GetAttr(account, s_cold);
        if (cold == NULL) {
            goto done;
        }
        Py_XSETREF(self->cold, cold);
        PyObject *tallies = PyObject_GetAttr(account, s_tallies);
        if (tallies == NULL) {
            goto done;
        }
        key = PyTuple_Pack(2, self->name, parent);
        if (key == NULL) {
            Py_DECREF(tallies);
            goto done;
        }
        tally = PyDict_Check(tallies) ? PyDict_GetItemWithError(tallies, key) : NULL;
        Py_DECREF(tallies);
        if (tally != NULL) {
            Py_INCREF(tally);
        }
        else {
            if (PyErr_Occurred()) {
                goto done;
            }
            tally = PyObject_CallMethodOneArg((PyObject *)self, s__new_tally, account);
            if (tally == NULL) {
                goto done;
            }
        }
        int recording = truth_of_attr(account, s_recording);
        if (recording < 0) {
            goto done;
        }
        if (recording) {
            if (enter_sampled(self, binding, account, tally, current) < 0) {
                goto done;
            }
        }
        else {
            PyObject *call_duration = PyObject_GetAttr(binding, s_call_duration);
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
    if (now_ns(&enter_ns) < 0) {
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
            return NULL;
        }
        SET_FIELD(binding, Py_None);
        SET_FIELD(frame_token, Py_None);
        SET_FIELD(account, Py_None);
        SET_FIELD(tally, Py_None);
    }
    self->enter_ns = enter_ns;
    if (now_ns(&self->start_ns) < 0) {
        return NULL;
    }
    /* Watches the running loop; a sync stage's thread CPU clock (#16). */
    int started = truth_of_attr(LOOP, s_started);
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
    int closed = truth_of_attr(account, s_closed);
    if (closed < 0) {
        goto done;
    }
    if (closed) { /* its request ended: a single call */
        result = call_with_ns((PyObject *)self, s_record, end_ns - start_ns, NULL);
        status = result == NULL ? -1 : 0;
        goto done;
    }
    un = PyObject_GetAttr(tally, s_union);
    if (un == NULL) {
        goto done;
    }
    intervals = PyObject_GetAttr(un, s_intervals);
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
        if (add_to_attr(account, s__instrumentation_ns,
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
    PyObject *held = PyObject_GetAttr(self->tally, s_held);
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
    static char *keywords[] = {"frame",         "loop",           "gc_pending", "drain_gc", "failed",
                               "max_unsettled", "fresh_scope_ns", "clock_namespace",
                               "get_context", NULL};
    PyObject *frame, *loop, *gc_pending, *drain_gc, *failed, *clock_namespace, *get_context;
    Py_ssize_t max_unsettled;
    long long fresh_scope_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOnLO!O:bind", keywords, &frame, &loop,
                                     &gc_pending, &drain_gc, &failed, &max_unsettled,
                                     &fresh_scope_ns, &PyDict_Type, &clock_namespace,
                                     &get_context)) {
        return NULL;
    }
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
     "clock_namespace, get_context): "
     "the stages module's state the hot path reads."},
    {"merge_intervals", merge_intervals, METH_O,
     "merge_intervals(intervals): sorted, disjoint intervals covering the same points."},
    {"union_ns", (PyCFunction)(void (*)(void))union_ns, METH_FASTCALL,
     "union_ns(intervals, start_ns, end_ns): the union's length clipped to [start, end]."},
    {"settle_intervals", (PyCFunction)(void (*)(void))settle_intervals, METH_FASTCALL,
     "settle_intervals(intervals, floor, keep): (settled_ns, settled_end, kept)."},
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
    INTERN(s__binding, "_binding");
    INTERN(s__bind, "_bind");
    INTERN(s__enter_alone, "_enter_alone");
    INTERN(s__new_tally, "_new_tally");
    INTERN(s__enter_sampled, "_enter_sampled");
    INTERN(s_cold, "cold");
    INTERN(s_tallies, "tallies");
    INTERN(s_recording, "recording");
    INTERN(s_call_duration, "call_duration");
    INTERN(s_started, "started");
    INTERN(s_stage_probe, "stage_probe");
    INTERN(s_closed, "closed");
    INTERN(s_record, "record");
    INTERN(s_union, "union");
    INTERN(s_intervals, "intervals");
    INTERN(s_settle, "settle");
    INTERN(s__instrumentation_ns, "_instrumentation_ns");
    INTERN(s_held, "held");
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
    if (core == NULL || PyModule_AddObject(module, "StageCore", core) < 0) {
        Py_XDECREF(core);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
