"""Isolation for submitted code: run it in a separate process with a time and a memory limit.

A submitted defense is arbitrary Python. Run in the harness's own process, a segfault, an
``os._exit``, an endless loop or an unbounded allocation takes the runner down with it (or
hangs it); the result store survives that (every batch is one SQLite transaction), but the
evaluation does not. :func:`run_isolated` runs a callable in a CHILD process instead and always
comes back with a :class:`SandboxResult`:

=============  =============================================================================
``ok``         the callable returned; ``value`` is its result
``exception``  it raised; ``error_type``, the one-line ``message`` and the child's ``traceback``
``memory``     it hit the memory limit (``MemoryError`` or a failed tensor allocation)
``timeout``    it ran past ``timeout`` seconds: the child's whole process group was SIGKILLed
``crash``      the child died without reporting: a signal (``SIGSEGV``, ``SIGKILL`` from the
               out-of-memory killer, ``SIGXCPU`` past the CPU-time limit) or an exit status
               (``sys.exit`` / ``os._exit`` in the submitted code); ``output_tail`` holds the
               child's last output, with Python's faulthandler dump after a fatal signal
``bad_result`` it returned something that cannot be passed back safely (see below)
=============  =============================================================================

``result.unwrap()`` returns the value or raises :class:`SandboxError`, whose ``str()`` is one
line naming what happened and the fix (the CLI prints it as ``robustmatrix: error: ...``).

How the child is limited
------------------------
* its own process and session (``os.setsid``): a timeout kills the whole process group, so the
  submitted code's own subprocesses go too;
* ``RLIMIT_AS`` = the child's address space at start + ``memory_limit`` (the child starts with
  torch imported, a few GB of virtual mappings already, so the limit is on what the submitted
  code ADDS); an allocation past it fails with ``MemoryError`` / a torch allocator error in the
  child, reported as ``memory``. CUDA reserves huge virtual ranges at initialisation, so on a GPU
  pass ``memory_limit=None`` (the device's memory bounds the GPU side) or
  ``memory_rlimit="DATA"`` (``RLIMIT_DATA``: private writable memory only);
* optional ``cpu_time_limit`` (``RLIMIT_CPU``), ``file_size_limit`` (``RLIMIT_FSIZE``),
  ``threads`` (``torch.set_num_threads``); core dumps are off (``RLIMIT_CORE`` = 0).

What comes back, and how
------------------------
The child serialises the return value with ``torch.save`` and the parent reads it with
``torch.load(weights_only=True)``: tensors, numbers, strings, bytes, ``None`` and
lists/tuples/dicts of them. Anything else (an arbitrary object, whose unpickling could run code
in the parent) is refused as ``bad_result``. The report itself is JSON. The parent never imports
the submitted module: give the target as ``"path/to/file.py:function"`` or
``"package.module:function"`` and it is imported in the child only.

Start methods: ``"forkserver"`` (default; the server preloads torch and the harness once, so a
child starts in milliseconds instead of re-importing torch) or ``"spawn"`` (a fresh
interpreter per call). Never ``fork``: the parent may hold threads and CUDA state.

Use in the harness (``robustmatrix submit``): :func:`probe_defense` imports, builds and runs a
submitted defense on a few images in a child (refusing a crashing / hanging / memory-hungry one
with a clear message before anything else runs); :func:`submit_isolated` runs the whole
``bench.harness.submission.submit.submit`` in a child, which writes the result store itself
(a crash there loses at most the batch in progress; the same command resumes).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

#: seconds; a whole CPU submission on the quick suite fits in this
DEFAULT_TIMEOUT = 3600.0
#: bytes the child may add to its address space (RLIMIT_AS headroom)
DEFAULT_MEMORY_LIMIT = 8 << 30
#: modules the forkserver imports once (children start with them loaded)
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "numpy", "pandas", "safetensors.torch",
           "bench.core.registry", "bench.artifacts", "bench.data", "bench.models", "defenses.base",
           "attacks.base")
STATUSES = ("ok", "exception", "memory", "timeout", "crash", "bad_result")
_OUTPUT_TAIL = 8000
_ALLOC_PATTERNS = ("can't allocate memory", "cannot allocate memory", "out of memory",
                   "std::bad_alloc", "not enough memory")


class SandboxError(RuntimeError):
    """Submitted code that failed in its sandbox; ``str()`` is one line, ``.result`` the full
    :class:`SandboxResult` (traceback, output tail)."""

    def __init__(self, result: SandboxResult) -> None:
        super().__init__(result.message)
        self.result = result


@dataclass
class SandboxResult:
    status: str
    value: Any = None
    message: str = ""
    exit_code: int | None = None
    signal: str | None = None
    error_type: str | None = None
    #: the first line of the child's exception (``str(exc)``), without the sandbox's wording
    error_message: str = ""
    traceback: str = ""
    output_tail: str = ""
    wall_time: float = 0.0
    limits: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def unwrap(self) -> Any:
        """The value, or :class:`SandboxError` with the one-line message."""
        if not self.ok:
            raise SandboxError(self)
        return self.value

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report (without the value)."""
        d = asdict(self)
        d.pop("value")
        return d


# limits ---------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(value: int | float | str | None) -> int | None:
    """Bytes from ``1024``, ``"512MiB"``, ``"2G"``, ``"1.5 GB"``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory size: expected bytes or e.g. '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size: cannot read {value!r}; write e.g. 512MiB or 2G")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n == n or n <= 0 or n > 1 << 60:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _vm_size() -> int:
    """The current address-space size of this process in bytes (0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _apply_limits(limits: dict[str, Any]) -> None:
    import resource

    def setlim(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, hard))

    setlim(resource.RLIMIT_CORE, 0)
    mem = limits.get("memory_limit")
    if mem is not None:
        if limits.get("memory_rlimit", "AS") == "DATA":
            setlim(resource.RLIMIT_DATA, _data_size() + mem)
        else:
            setlim(resource.RLIMIT_AS, _vm_size() + mem)
    if limits.get("cpu_time_limit"):
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = used.ru_utime + used.ru_stime
        setlim(resource.RLIMIT_CPU, int(spent + limits["cpu_time_limit"]) + 1)
    if limits.get("file_size_limit"):
        setlim(resource.RLIMIT_FSIZE, int(limits["file_size_limit"]))


def _data_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# targets --------------------------------------------------------------------------------------
def resolve_target(spec: str) -> Callable[..., Any]:
    """``"path/to/file.py:attr"`` or ``"package.module:attr"`` -> the object (imported HERE;
    call it in the child only). A dotted ``attr`` walks attributes (``Class.method``)."""
    import importlib
    import importlib.util

    head, sep, attr = spec.rpartition(":")
    if not sep or not head or not attr:
        raise ValueError(f"target {spec!r}: write path/to/file.py:function or "
                         "package.module:function")
    if head.endswith(".py"):
        path = Path(head).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        name = f"robustmatrix_sandboxed_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(head)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{mod}:{name}" if mod and name else repr(target)


# the child ------------------------------------------------------------------------------------
def _is_alloc_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(p in text for p in _ALLOC_PATTERNS)


def _child_main(conn: Any, target: Any, args: tuple, kwargs: dict, limits: dict[str, Any],
                output_path: str | None) -> None:
    header: dict[str, Any] = {"status": "exception", "error_type": "SandboxError",
                              "message": "the sandboxed child failed before reporting"}
    payload = b""
    try:
        try:
            os.setsid()
        except OSError:
            pass
        if output_path is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        import faulthandler

        faulthandler.enable(file=sys.stderr, all_threads=True)
        for k, v in (limits.get("env") or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        if limits.get("threads"):
            import torch

            torch.set_num_threads(int(limits["threads"]))
        header, payload = _call(target, args, kwargs, limits)
    finally:
        try:
            conn.send_bytes(json.dumps(header).encode())
            conn.send_bytes(payload)
            conn.close()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0)


def _call(target: Any, args: tuple, kwargs: dict, limits: dict[str, Any]
          ) -> tuple[dict[str, Any], bytes]:
    """Apply the limits, import and call the target; the report header and the payload."""
    try:
        _apply_limits(limits)  # before importing: module-level code of the submission counts
        fn = resolve_target(target) if isinstance(target, str) else target
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - everything the submitted code does is reported
        status = "memory" if _is_alloc_failure(exc) else "exception"
        try:
            first = (str(exc).strip().splitlines() or [""])[0][:2000]
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:]
        except BaseException:  # noqa: BLE001 - formatting can itself run out of memory
            first, tb = "", ""
        return ({"status": status, "error_type": type(exc).__name__, "message": first,
                 "traceback": tb}, b"")
    return _encode_value(value)


def _encode_value(value: Any) -> tuple[dict[str, Any], bytes]:
    import torch

    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # same check as parent
    except MemoryError as exc:
        return ({"status": "memory", "error_type": type(exc).__name__,
                 "message": "no memory left to serialise the result"}, b"")
    except Exception as exc:  # noqa: BLE001
        return ({"status": "bad_result", "error_type": type(exc).__name__,
                 "message": f"returned a {type(value).__name__} that cannot be passed back safely "
                            "(only tensors, numbers, strings, bytes, None and lists/tuples/dicts "
                            "of them)"}, b"")
    return {"status": "ok"}, data


# the parent -----------------------------------------------------------------------------------
def _context(start_method: str) -> Any:
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([m for m in PRELOAD])
    return ctx


def _kill_group(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _read_tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * _OUTPUT_TAIL))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # faulthandler's list of loaded extension modules is one long line of noise
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("Extension modules:"))
    return text[-_OUTPUT_TAIL:]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


_SIGNAL_HINTS = {
    "SIGSEGV": "a segmentation fault (invalid memory access, e.g. in a C extension or ctypes)",
    "SIGBUS": "a bus error (invalid memory access)",
    "SIGABRT": "an abort (a failed C/C++ assertion or an uncaught C++ exception)",
    "SIGKILL": "SIGKILL (the system's out-of-memory killer, or another process)",
    "SIGXCPU": "SIGXCPU: it used up its CPU-time limit",
    "SIGXFSZ": "SIGXFSZ: it wrote a file larger than its file-size limit",
    "SIGFPE": "a floating-point exception",
    "SIGILL": "an illegal instruction (a binary built for another CPU?)",
}


def run_isolated(target: Callable[..., Any] | str, *args: Any, kwargs: dict | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT,
                 memory_limit: int | str | None = DEFAULT_MEMORY_LIMIT,
                 memory_rlimit: str = "AS", cpu_time_limit: float | None = None,
                 file_size_limit: int | str | None = None, threads: int | None = None,
                 env: dict[str, str | None] | None = None, start_method: str = "forkserver",
                 capture_output: bool = True, label: str | None = None) -> SandboxResult:
    """Run ``target(*args, **kwargs)`` in a child process under limits; never raises for what
    the child does (see the module docstring for the statuses). ``target`` is a picklable
    callable (a module-level function) or a ``"file.py:attr"`` / ``"module:attr"`` string
    imported in the child only; ``args`` must be picklable."""
    if memory_rlimit not in ("AS", "DATA"):
        raise ValueError(f"memory_rlimit must be 'AS' or 'DATA', got {memory_rlimit!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    limits = {"timeout": timeout, "memory_limit": parse_size(memory_limit),
              "memory_rlimit": memory_rlimit, "cpu_time_limit": cpu_time_limit,
              "file_size_limit": parse_size(file_size_limit), "threads": threads,
              "env": dict(env or {})}
    what = label or _describe(target)
    ctx = _context(start_method)
    out_path = None
    if capture_output:
        fd, out_path = tempfile.mkstemp(prefix="robustmatrix-sandbox-", suffix=".log")
        os.close(fd)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(writer, target, tuple(args), dict(kwargs or {}),
                                                 limits, out_path), name=f"sandbox:{what}")
    header: dict[str, Any] | None = None
    payload = b""
    timed_out = False
    t0 = time.monotonic()
    try:
        proc.start()  # with forkserver: returns once the child is forked (server preloaded)
        writer.close()
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        while True:
            wait = 0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic()))
            if reader.poll(wait):
                try:
                    header = json.loads(reader.recv_bytes().decode())
                    payload = reader.recv_bytes()
                except (EOFError, OSError, ValueError):
                    header = None
                break
            if not proc.is_alive():
                if reader.poll(0):
                    continue
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
        if timed_out:
            _kill_group(proc.pid)
            proc.kill()
        proc.join(timeout=10)
        if proc.is_alive():
            _kill_group(proc.pid)
            proc.kill()
            proc.join(timeout=10)
    finally:
        if proc.pid is not None:
            _kill_group(proc.pid)  # the submitted code's own leftover subprocesses
        reader.close()
        tail = _read_tail(out_path)
        if out_path:
            try:
                os.unlink(out_path)
            except OSError:
                pass
    wall = time.monotonic() - t0
    res = SandboxResult(status="crash", exit_code=proc.exitcode, output_tail=tail,
                        wall_time=wall, limits={k: v for k, v in limits.items() if k != "env"})
    if proc.exitcode is not None and proc.exitcode < 0:
        res.signal = _signal_name(-proc.exitcode)
    return _classify(res, header, payload, what, timed_out)


def _classify(res: SandboxResult, header: dict[str, Any] | None, payload: bytes, what: str,
              timed_out: bool) -> SandboxResult:
    lim = res.limits
    if header is not None:
        res.status = header.get("status", "crash")
        res.error_type = header.get("error_type")
        res.traceback = header.get("traceback", "")
        msg = header.get("message", "")
        res.error_message = msg if res.status != "ok" else ""
        if res.status == "ok":
            import torch

            try:
                res.value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the security boundary: refuse, never run
                res.status = "bad_result"
                res.error_type = type(exc).__name__
                why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                res.message = (f"{what}: its result was refused: not plain tensors and "
                               f"containers ({why})")
            else:
                res.message = f"{what}: finished in {res.wall_time:.1f} s"
        elif res.status == "memory":
            detail = f"{res.error_type}: {msg}" if msg else res.error_type
            res.message = (f"{what}: ran out of memory (limit {_fmt_bytes(lim.get('memory_limit'))}"
                           f" above its start): {detail}; use less memory (smaller batches) or "
                           "raise the memory limit")
        elif res.status == "bad_result":
            res.message = f"{what}: {msg}; return plain tensors and containers"
        else:
            res.message = (f"{what}: raised {res.error_type}" + (f": {msg}" if msg else "")
                           + "; fix it (the traceback is in the sandbox report)")
        return res
    if timed_out:
        res.status = "timeout"
        res.message = (f"{what}: did not finish within {lim.get('timeout'):g} s and was killed "
                       "(with its subprocesses); make it faster or raise the time limit")
        return res
    res.status = "crash"
    if res.signal is not None:
        hint = _SIGNAL_HINTS.get(res.signal, res.signal)
        if res.signal == "SIGKILL" and lim.get("memory_limit") is not None:
            hint += f"; memory limit {_fmt_bytes(lim['memory_limit'])}"
        res.message = f"{what}: crashed: the process was killed by {hint}"
    else:
        res.message = (f"{what}: the process exited with status {res.exit_code} without returning "
                       "a result (sys.exit or os._exit in the submitted code?)")
    where = _fatal_location(res.output_tail)
    last = [ln for ln in res.output_tail.strip().splitlines() if ln.strip()]
    if where:
        res.message += f"; at {where}"
    elif last:
        res.message += f"; its last output: {last[-1].strip()[:200]}"
    return res


def _fatal_location(output: str) -> str | None:
    """The innermost frame of faulthandler's dump after a fatal signal ('File "x.py", line 5
    in f'), for the one-line message."""
    lines = output.splitlines()
    for i, ln in enumerate(lines):
        if "most recent call first" in ln and (i == 0 or "Current thread" in ln
                                               or any("Fatal Python error" in x
                                                      for x in lines[max(0, i - 5):i])):
            for nxt in lines[i + 1:i + 3]:
                if nxt.strip().startswith("File "):
                    return nxt.strip()[:300]
    return None


# the harness's uses ---------------------------------------------------------------------------
def _probe_child(spec: str, options: dict[str, Any], dataset: str, images: Any,
                 device: str, preset: str, label: str | None) -> dict[str, Any]:
    import torch

    from bench.artifacts import prepare_defense
    from bench.harness.submission.load import load_submission, register_submission

    obj, source = load_submission(spec)
    name = register_submission(obj, source, label or source.get("class") or "defense")
    defense, info = prepare_defense(name, dict(options), dataset=dataset, device=device,
                                    preset=preset, progress=False, log=lambda m: None)
    defense.eval()
    with torch.no_grad():
        out = defense(images.to(device))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"forward returned a {type(out).__name__}, not a tensor of logits")
    return {"registry_name": name, "logits": out.detach().cpu(),
            "source": json.loads(json.dumps(source, default=str)),
            "artifact": json.loads(json.dumps(info, default=str))}


def probe_defense(spec: str, images: Any, *, dataset: str, options: dict[str, Any] | None = None,
                  device: str = "cpu", preset: str = "quick", label: str | None = None,
                  **limits: Any) -> SandboxResult:
    """Import, build (fit if needed) and run a submitted defense on ``images`` in a sandboxed
    child; ``value`` is ``{"registry_name", "logits", "source", "artifact"}``. ``limits`` are
    :func:`run_isolated`'s keywords (``timeout``, ``memory_limit``, ...)."""
    limits.setdefault("label", f"defense {spec}")
    return run_isolated(_probe_child, spec, dict(options or {}), dataset, images, device, preset,
                        label, **limits)


def _submit_child(spec: str, meta: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    from bench.harness.submission.submit import submit
    from bench.harness.submission.suites import Metadata, SubmitOptions

    def log(msg: str) -> None:
        print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)

    result = submit(spec, Metadata(**meta), SubmitOptions(**opts), log=log)
    validation = result.validation.as_dict() if hasattr(result.validation, "as_dict") else {}
    return json.loads(json.dumps({
        "entries": [str(p) for p in result.entries], "run_dir": str(result.run_dir),
        "registry_name": result.registry_name, "validation": validation,
        "wall_time": float(result.wall_time)}, default=str))


def submit_isolated(spec: str, meta: Any, opts: Any, **limits: Any) -> SandboxResult:
    """``bench.harness.submission.submit.submit`` in a sandboxed child; ``meta`` and ``opts``
    are the ``Metadata`` / ``SubmitOptions`` dataclasses (or dicts of their fields). The child
    writes the result store and the entries; ``value`` is ``{"entries", "run_dir", "registry_name",
    "validation", "wall_time"}``. A failure keeps every batch already committed (rerun resumes).
    By default the child's output goes to this process's stderr (progress, log lines)."""
    m = asdict(meta) if hasattr(meta, "__dataclass_fields__") else dict(meta)
    o = asdict(opts) if hasattr(opts, "__dataclass_fields__") else dict(opts)
    limits.setdefault("label", f"submission {spec}")
    limits.setdefault("capture_output", False)
    limits.setdefault("env", harness_env())
    return run_isolated(_submit_child, spec, m, o, **limits)


def harness_env() -> dict[str, str | None]:
    """The harness's own environment variables (cache, data and weights roots, the test
    hooks), passed to a child explicitly: a forkserver started earlier holds an older
    environment."""
    keys = ("ROBUSTMATRIX_CACHE", "ROBUSTMATRIX_DATA", "ROBUSTMATRIX_WEIGHTS")
    return {k: os.environ.get(k) for k in keys}


def _verify_child(path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from bench.harness.submission.verify import verify_entry

    def log(msg: str) -> None:
        print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)

    rep = verify_entry(path, log=log, **kwargs)
    return json.loads(json.dumps(rep.as_dict(), default=str))


def verify_isolated(path: str, *, rerun: int, seed: int, device: str, use_snapshot: bool,
                    **limits: Any) -> SandboxResult:
    """``verify_entry`` in a sandboxed child (the entry's defense is submitted code: the child
    imports it, rebuilds and re-attacks it); ``value`` is the report as a dict
    (:meth:`VerifyReport.from_dict`)."""
    limits.setdefault("label", f"verification of {path}")
    limits.setdefault("capture_output", False)
    limits.setdefault("env", harness_env())
    return run_isolated(_verify_child, str(path), {"rerun": rerun, "seed": seed,
                                                   "device": device,
                                                   "use_snapshot": use_snapshot}, **limits)


def _sweep_child(path: str, eps: list[float], attack: Any, device: str | None,
                 progress: bool) -> dict[str, Any]:
    from bench.harness.submission.sweep import run_sweep

    def log(msg: str) -> None:
        print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)

    out = run_sweep(path, eps, attack=attack, device=device, progress=progress, log=log)
    return json.loads(json.dumps(out, default=str))


def sweep_isolated(path: str, eps: list[float], *, attack: Any, device: str | None = None,
                   progress: bool = False, **limits: Any) -> SandboxResult:
    """``run_sweep`` in a sandboxed child (it writes the store and the entry itself); ``value``
    is the entry's new ``sweep`` record."""
    limits.setdefault("label", f"sweep of {path}")
    limits.setdefault("capture_output", False)
    limits.setdefault("env", harness_env())
    return run_isolated(_sweep_child, str(path), list(eps), attack, device, progress, **limits)
