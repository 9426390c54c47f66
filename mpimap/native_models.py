"""Native models: a C function ``int f(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)`` as a map's
function, evaluated a chunk at a time by the C extension (``mpimap._native``) with the GIL released, or through
ctypes one point at a time where the extension is missing or off (``MPIMAP_NO_EXTENSION=1``).  Both ways give the
same values and the same failures.  docs/native.rst is the user's guide.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import pickle
import select
import signal
import time

import numpy as np

from .failures import Failure, signal_name

# -- the extension -----------------------------------------------------------------------------------------------
OFF_ENV = "MPIMAP_NO_EXTENSION"
SLICE_SECONDS = 0.05  # a rank evaluating a native chunk takes its messages (cancel, stop) at least this often
MAX_OUTPUTS = 2 ** 24  # doubles per point (128 MiB a point): beyond, surely a mistake
PROBE_SECONDS = 60  # a library that has not loaded in a forked child by then hangs in its initialisation


def _load_extension():
    if os.environ.get(OFF_ENV, "") not in ("", "0"):
        return None, f"off ({OFF_ENV}={os.environ[OFF_ENV]}): pure Python"
    try:
        from . import _native
    except ImportError as exc:
        if importlib.util.find_spec(f"{__package__}._native") is None:  # Python's message would say "circular import"
            return None, "not built (no C compiler when mpimap was installed?): pure Python"
        return None, f"built but does not load ({exc}): pure Python"
    return _native, f"in use ({_native.__file__})"


extension, _STATE = _load_extension()


def describe() -> str:
    """One line for ``mpimap info``: whether the C extension is in use, and if not, why."""
    return f"C extension: {_STATE}"


# -- the native function ---------------------------------------------------------------------------------------
_SIGNATURE = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
_NativeFn = ctypes.CFUNCTYPE(ctypes.c_int, *_SIGNATURE)


class NativeError(RuntimeError):
    """A native function returned a non-zero code for a point (``code``: that value)."""

    def __init__(self, name: str, code: int):
        super().__init__(f"{name} returned {code}")
        self.name, self.code = name, code

    def __reduce__(self):
        return NativeError, (self.name, self.code)


def _failure(name: str, code: int) -> Failure:
    """The Failure of a point whose evaluation returned ``code``: the same record with and without the extension."""
    exc = NativeError(name, int(code))
    return Failure("NativeError", str(exc), f"mpimap.NativeError: {exc}\n", pickle.dumps(exc, protocol=5))


class NativeFunction:
    """A native model that ``Pool.map`` accepts like any function (made by :func:`native`).

    Called directly, ``f(point)`` evaluates one point through ctypes and returns
    a float (``outputs=1``) or an array of ``outputs`` floats, or raises
    :class:`NativeError`.  It travels to the workers as its library's path and
    symbol (or, for a numba ``cfunc``, as the module attribute that holds it),
    with its context bytes.
    """

    def __init__(self, library: str | None, symbol: str, outputs: int, context: bytes | None = None,
                 ref: tuple | None = None):
        self.library, self.symbol, self.outputs, self.context, self.ref = library, symbol, outputs, context, ref
        self._address = None  # resolved in each process, on first use
        self._cfn = None
        self._ctx = None

    @property
    def spec(self) -> str:
        """How the results file names the function."""
        where = self.library if self.ref is None else ":".join(self.ref)
        return f"native:{where}:{self.symbol}:outputs={self.outputs}"

    def __repr__(self):
        return f"mpimap.native({self.spec})"

    def __reduce__(self):
        return NativeFunction, (self.library, self.symbol, self.outputs, self.context, self.ref)

    # -- resolving, in each process -----------------------------------------------------------------------------
    def _resolve(self) -> None:
        if self._address is not None:
            return
        if self.ref is not None:
            module, qualname = self.ref
            target = importlib.import_module(module)
            for part in qualname.split("."):
                target = getattr(target, part)
            address = int(target.address)
        else:
            address = _symbol_address(self.library, self.symbol)
        if self.context is not None:  # the model's own copy, writable, alive as long as this object
            self._ctx = ctypes.create_string_buffer(bytes(self.context), len(self.context))
        self._cfn = _NativeFn(address)
        self._address = address

    @property
    def context_address(self) -> int:
        return 0 if self._ctx is None else ctypes.addressof(self._ctx)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def __call__(self, *point):
        """Evaluate one point: ``f([a, b, c])``, or ``f(a, b, c)`` as ``Pool.map(f, as_, bs, cs)`` calls it."""
        x = _numbers(point[0] if len(point) == 1 else point).reshape(1, -1)
        y = np.empty((1, self.outputs))
        codes = np.empty(1, np.int32)
        self.run(x, y, codes, None, 0, 1, extension=None)
        if codes[0]:
            raise NativeError(self.symbol, int(codes[0]))
        return float(y[0, 0]) if self.outputs == 1 else y[0]

    def run(self, x, y, codes, durations, start: int, stop: int, seconds: float = float("inf"), slot: int = 0,
            positions=None, extension=extension) -> int:
        """Evaluate rows ``start..stop-1`` of ``x`` into ``y`` and ``codes`` (and ``durations``, if given); return
        the next row: ``stop``, or earlier once ``seconds`` have passed.  ``slot``: the address of a child's
        :class:`mpimap.isolation._Slot`, written before each point with ``positions[row]``."""
        self._resolve()
        nx = x.shape[1]
        if extension is not None:
            return extension.run_chunk(self._address, self.context_address, x, nx, y, self.outputs, codes,
                                       durations, positions, start, stop, seconds, slot)
        return self._run_ctypes(x, y, codes, durations, start, stop, seconds, slot, positions)

    def _run_ctypes(self, x, y, codes, durations, start, stop, seconds, slot, positions) -> int:
        """What the extension's loop does, through ctypes: a call costs ~1 µs more than the model."""
        from .isolation import _Slot, _write_slot

        cfn, ctx, nx, ny = self._cfn, self._ctx, x.shape[1], self.outputs
        xp, yp = x.ctypes.data, y.ctypes.data
        slot = _Slot.from_address(slot) if slot else None
        clock = time.monotonic
        deadline = clock() + seconds
        i = start
        while i < stop:
            if slot is not None or durations is not None:
                started = clock()
                if slot is not None:
                    _write_slot(slot, int(positions[i]) if positions is not None else i, started)
                codes[i] = cfn(xp + 8 * nx * i, nx, yp + 8 * ny * i, ny, ctx)
                ended = clock()
                if durations is not None:
                    durations[i] = ended - started
            else:
                codes[i] = cfn(xp + 8 * nx * i, nx, yp + 8 * ny * i, ny, ctx)
                ended = clock() if seconds != float("inf") else 0.0
            i += 1
            if ended >= deadline:
                break
        return i

    def results(self, y, codes, start: int, stop: int, packed: bool):
        """``(values, failures)`` of rows ``start..stop-1``, as the function called point by point would give them:
        floats (``outputs=1``) or rows; with ``packed`` and no failure, one array."""
        block = y[start:stop, 0] if self.outputs == 1 else y[start:stop]
        failed = np.flatnonzero(codes[start:stop])
        failures = {int(k): _failure(self.symbol, codes[start + k]) for k in failed}
        if packed and not failures:
            return block, failures
        values = block.tolist() if self.outputs == 1 else list(block.copy())
        for k in failures:
            values[k] = None
        return values, failures


def _numbers(points) -> np.ndarray:
    """``points`` as float64 numbers; TypeError for anything else (None, strings, complex, huge integers), which
    float64 would turn into NaN, parse, or truncate without a word."""
    a = np.asarray(points)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"a native function's point must be real numbers, not {a.dtype} values "
                        f"(e.g. {a.flat[0]!r})" if a.size else "a native function's point must be real numbers")
    return np.ascontiguousarray(a, dtype=np.float64)


def arrays(fn: NativeFunction, args):
    """``(x, y, codes)`` for a chunk: its points as one float64 array, a row per point (each point flattened, as a
    call with one point does it), and the arrays the loop fills.  None if the chunk cannot go to the loop as one
    (points that are not numbers of one shape, a library that does not load here, no memory): then each point is
    evaluated on its own, and fails on its own with why."""
    try:
        x = _numbers(args)
        if not x.ndim or not x.size:
            return None
        x = x.reshape(len(x), -1)
        fn._resolve()
        return x, np.empty((len(x), fn.outputs)), np.empty(len(x), np.int32)
    except Exception:
        return None


def evaluate_chunk(fn: NativeFunction, x: np.ndarray, y: np.ndarray, codes: np.ndarray, timed: bool, packed: bool,
                   tick=lambda: True):
    """``(values, failures, durations)`` of the points ``x`` (see :func:`arrays`) evaluated in this process
    (``isolation='rank'``); None if ``tick()``, called between time slices of SLICE_SECONDS, abandoned them (their
    map was cancelled, the rank stops)."""
    n = len(x)
    durations = np.empty(n) if timed else None
    t0 = time.perf_counter()
    done = 0
    while (done := fn.run(x, y, codes, durations, done, n, SLICE_SECONDS)) < n:
        if not tick():
            return None
    if durations is None:
        durations = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    values, failures = fn.results(y, codes, 0, n, packed)
    return values, failures, durations


# -- making one ------------------------------------------------------------------------------------------------
def native(function, symbol: str | None = None, *, outputs: int = 1, context=None) -> NativeFunction:
    """A native model as a map's function.

    ``function``: the path of a shared library (with ``symbol``, the function's
    name in it), a ctypes or cffi function pointer, a numba ``cfunc`` defined at
    a module's top level, or a function's address.  ``outputs``: how many
    doubles it writes per point.  ``context``: bytes (or any buffer, e.g. a
    numpy array) copied to every worker and given to the function as ``ctx``.
    Raises ValueError with one line saying what is wrong and how to fix it.
    """
    if isinstance(outputs, bool) or not isinstance(outputs, (int, np.integer)) or not 1 <= outputs <= MAX_OUTPUTS:
        raise ValueError(f"outputs must be a whole number from 1 to {MAX_OUTPUTS} (the doubles written per point), "
                         f"not {outputs!r}")
    if context is not None:
        try:
            context = memoryview(context).tobytes()
        except TypeError:
            raise ValueError(f"context must be bytes or a buffer (e.g. a numpy array), not "
                             f"{type(context).__name__}") from None
    outputs = int(outputs)
    if isinstance(function, bytes):
        function = os.fsdecode(function)
    if isinstance(function, (str, os.PathLike)):
        if symbol is not None and (not isinstance(symbol, str) or "\0" in symbol):
            raise ValueError(f"symbol must be the function's name, a string without NUL, not {symbol!r}")
        if not symbol:
            raise ValueError(f"give the function's name in {os.fspath(function)}: "
                             f"mpimap.native({os.fspath(function)!r}, 'symbol', outputs=...)")
        library = _library_path(os.fspath(function))
        _probe(library)  # where the user gives it; the workers load it as it is
        if not _executable(_symbol_address(library, symbol)):  # in one line here, not a crash per point there
            raise ValueError(f"{symbol!r} in {library} is data, not a function: give the name of a function of "
                             "the signature in mpimap_native.h")
        return NativeFunction(library, symbol, outputs, context)
    if symbol is not None:
        raise ValueError("symbol goes with a library path only; a function pointer names its own function")
    ref = None
    if isinstance(function, ctypes._CFuncPtr):
        _check_ctypes_signature(function)
        address = ctypes.cast(function, ctypes.c_void_p).value
    elif type(function).__module__ == "_cffi_backend":
        address = _cffi_address(function)
    elif hasattr(function, "address") and hasattr(function, "_pyfunc"):  # numba's CFunc
        _check_numba_signature(function)
        address = int(function.address)
        ref = _module_reference(function)
    elif isinstance(function, (int, np.integer)) and not isinstance(function, bool):
        address = int(function)
    else:
        raise ValueError(f"mpimap.native takes a library path and a symbol, a ctypes or cffi function pointer, a "
                         f"numba cfunc or an address, not {type(function).__name__}")
    if ref is not None:
        return NativeFunction(None, function.__name__, outputs, context, ref)
    library, name = _where(address)
    return NativeFunction(library, name, outputs, context)


def _library_path(path: str) -> str:
    if os.sep not in path and not os.path.exists(path):
        raise ValueError(f"native library {path!r} not found: give its path (e.g. ./{path})")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"native library {path} is a directory: give the path of the shared library (.so) in it")
    if not os.path.isfile(full):
        raise ValueError(f"native library {path} not found: no such file")
    return full


_probed: set = set()  # (path, mtime) of libraries loaded once in a forked child


def _probe(library: str) -> None:
    """Load the library first in a forked child: if its initialisation (a constructor, or a library it needs)
    exits, crashes or hangs, the child goes (what it printed reaches stderr) and the user reads why, where this
    process would end without a word.  A fork, not a new interpreter: the program may embed Python."""
    key = (library, os.stat(library).st_mtime_ns)
    if key in _probed:
        return
    read, write = os.pipe()  # close-on-exec: a helper process the library starts does not keep it open
    pid = os.fork()
    if pid == 0:  # the child: load, say so, and leave at once (nothing of the parent's runs at exit)
        try:
            os.close(read)
            try:
                ctypes.CDLL(library)
                os.write(write, b"1")
            except OSError:  # not loadable: said in full where the library is loaded for real
                os.write(write, b"0")
        finally:
            os._exit(0)
    os.close(write)
    said = None
    try:
        if select.select([read], [], [], PROBE_SECONDS)[0]:
            said = os.read(read, 1)
    finally:  # also when Ctrl-C ends the wait: no child is left behind
        os.close(read)
        if said is None:
            os.kill(pid, signal.SIGKILL)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if said is None:
        raise ValueError(f"native library {library} did not finish loading in {PROBE_SECONDS} s: its initialisation "
                         "(a constructor, or a library it needs) hangs; load it outside mpimap to see why")
    if not said:  # the child ended before it could say it had loaded the library
        raise ValueError(f"loading native library {library} ends the process ({_how_it_ended(status)}) before any "
                         "point runs: its initialisation (a constructor, or a library it needs) exits or crashes; "
                         "load it outside mpimap to see why")
    _probed.add(key)


def _how_it_ended(status: int) -> str:
    """``exit status N`` or ``signal NAME`` of a child's exit code (negative: the signal that ended it)."""
    return f"exit status {status}" if status >= 0 else f"signal {signal_name(-status)}"


def _symbol_address(library: str, symbol: str) -> int:
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise ValueError(f"cannot load native library {library}: {exc}") from None
    try:
        return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    except AttributeError:
        raise ValueError(f"native library {library} has no function {symbol!r} (is it exported with C "
                         "linkage? see mpimap_native.h)") from None


def _executable(address: int) -> bool:
    """Whether ``address`` lies in executable memory (Linux: /proc/self/maps; elsewhere assumed)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, perms = line.split(None, 2)[:2]
                start, end = (int(bound, 16) for bound in span.split("-"))
                if start <= address < end:
                    return perms[2] == "x"
    except OSError:
        return True
    return False


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _where(address: int) -> tuple[str, str]:
    """The shared library and exported symbol of a function's address: how it is found again on the workers."""
    info = _DlInfo()
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    if not address or not _executable(address) or not dladdr(address, ctypes.byref(info)) or not info.dli_sname \
            or info.dli_saddr != address:
        raise ValueError(f"address {address:#x} is not an exported function of a shared library: give "
                         "mpimap.native('path/lib.so', 'symbol') so the workers can load it")
    library = os.fsdecode(info.dli_fname)
    if not os.path.isfile(library) or os.path.samefile(library, "/proc/self/exe"):
        raise ValueError(f"{os.fsdecode(info.dli_sname)} is not in a shared library the workers can load")
    return os.path.abspath(library), os.fsdecode(info.dli_sname)


def _check_ctypes_signature(function) -> None:
    declared_args, declared_result = getattr(function, "argtypes", None), getattr(function, "restype", None)
    ok_args = declared_args is None or (
        len(declared_args) == 5
        and all(_same_ctype(got, want) for got, want in zip(declared_args, _SIGNATURE)))
    if not ok_args or declared_result not in (None, ctypes.c_int, ctypes.c_int32):
        raise ValueError(f"{getattr(function, '__name__', 'the function')} is declared with another signature: "
                         "a native function is int f(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)")


def _same_ctype(got, want) -> bool:
    pointers = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_double), ctypes.c_char_p)
    if want is ctypes.c_void_p:
        return got in pointers or getattr(got, "_type_", None) is not None and issubclass(got, ctypes._Pointer)
    return got in (ctypes.c_int64, ctypes.c_longlong) or (got is ctypes.c_long and ctypes.sizeof(got) == 8)


def _check_numba_signature(function) -> None:
    from numba import types

    sig = function._sig
    wanted = (types.CPointer(types.float64), types.int64, types.CPointer(types.float64), types.int64, types.voidptr)
    if tuple(sig.args) != wanted or sig.return_type not in (types.int32, types.intc):
        raise ValueError(f"numba cfunc {function.__name__} has signature {sig}: a native function is "
                         "int32(CPointer(float64), int64, CPointer(float64), int64, voidptr)")


def _module_reference(function) -> tuple[str, str]:
    """Where a numba cfunc is found again on the workers: the module attribute that holds it."""
    module = getattr(function._pyfunc, "__module__", None)
    qualname = getattr(function._pyfunc, "__qualname__", "")
    target = None
    if module and module != "__main__" and "<locals>" not in qualname:
        try:
            target = importlib.import_module(module)
            for part in qualname.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            target = None
    if target is not function:
        raise ValueError(f"numba cfunc {function.__name__} must be defined at the top level of an importable "
                         "module (not in __main__ or a function): the workers import it from there")
    return module, qualname


def _cffi_address(function) -> int:
    import _cffi_backend

    kind = _cffi_backend.typeof(function)
    if kind.kind != "function":
        raise ValueError(f"a cffi {kind.cname} is not a function pointer")
    wanted = "int(*)(double *, int64_t, double *, int64_t, void *)"
    int64 = ("long long", "long") if ctypes.sizeof(ctypes.c_long) == 8 else ("long long",)
    cname = kind.cname.replace("const ", "")
    for name in int64:
        cname = cname.replace(name, "int64_t")
    if cname != wanted:
        raise ValueError(f"cffi function {kind.cname} has another signature: a native function is "
                         "int f(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)")
    return int(_cffi_backend.cast(_cffi_backend.new_primitive_type("intptr_t"), function))
