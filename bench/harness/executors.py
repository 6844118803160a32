"""Executors: who computes the batches of a cell, and the GPU path they share.

The unit of work is ONE BATCH OF ONE CELL (a shard): the same batches, in the same order and
with the same per-batch seed (``cfg.seed + batch index``) whatever the executor, so every
executor stores identical per-sample results. The driver
(:class:`bench.harness.runner.MatrixRunner`) owns the result store; an executor only computes
batches and hands each result back through the job's ``on_batch`` callback, which writes it in
one transaction. A killed run therefore resumes from the store whatever the executor was.

* :class:`LocalExecutor` (default, ``executor: local``): in-process, synchronous, batch after
  batch: exactly the loop the runner always had.
* :class:`RayExecutor` (``executor: ray``, ``--executor ray [--address ADDR]``): one Ray task
  per batch; the driver submits every batch of a cell (and the next cells of the same defense,
  which do not depend on each other under the ``full`` schedule) and writes results as they
  arrive (a ``ray.wait`` loop). Tasks ask for ``num_cpus`` CPUs and, on CUDA, ``num_gpus`` GPUs
  (a fraction packs several tasks on one GPU). The defense reaches the workers either pickled
  once into the object store (``defense_transfer: put``, the default; measured in
  ``benchmarks/ray_vs_local.py``) or rebuilt on the worker from its registry name and options
  through :func:`bench.artifacts.prepare_defense` (``defense_transfer: rebuild``; trained
  artifacts come from the content-addressed cache, so the workers must share it). Either way a
  worker checks the defense's sha256 against the driver's before computing anything, and caches
  it per worker process. The data travel with each task (the batch's images only).

The GPU path (:class:`Acceleration`, :func:`resolve_batch_size`, :class:`AttackView`):
``batch_size: auto`` sizes batches from a memory probe; the data stay on the device; on CUDA the
defense runs channels-last; ``amp: true`` runs the ATTACK's forward/backward passes in bfloat16
autocast (``amp: fp16`` for float16), ``compile: true`` runs them through ``torch.compile``.
Re-scoring (clean accuracy, the adversarials, best-iterate recovery) always runs the plain
float32 defense, so a stored ``robust`` flag is always an fp32 fact about the stored
adversarial; amp and compile only change which adversarials the attack finds, and are part of
the cell key. See docs/performance.md.
"""

from __future__ import annotations

import copy
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.core.config import EXECUTOR_OPTIONS, EXECUTORS, ConfigError
from bench.core.schema import SampleRow

#: ``batch_size: auto`` on a CPU (larger batches do not pay there; fixed, so keys are stable)
CPU_AUTO_BATCH = 100
#: ``batch_size: auto`` on CUDA: this fraction of the device's TOTAL memory (not the free memory,
#: so the size, which is part of the cell key, is the same on every run on the same GPU model)
AUTO_MEMORY_FRACTION = 0.25
MAX_AUTO_BATCH = 4096
#: environment variables a Ray worker takes from the driver (data, weights and cache locations)
FORWARDED_ENV = ("ROBUSTMATRIX_CACHE", "ROBUSTMATRIX_DATA", "ROBUSTMATRIX_WEIGHTS")


class ExecutorError(ConfigError):
    """An executor that cannot run (one-line message with the fix)."""


# the batch computation both executors call ---------------------------------------------------
@dataclass
class BatchOutput:
    """One computed batch, as the driver stores it."""

    batch: int
    idx: torch.Tensor  # positions in the evaluation set (CPU)
    rows: list[SampleRow]
    adv: torch.Tensor | None
    records: dict
    wall_time: float
    mutated: bool = False  # the defense's sha256 changed while computing it (Ray workers)


def clean_rows(y: torch.Tensor, clean) -> list[SampleRow]:
    """The rows of a clean cell: the clean scores, nothing attacked."""
    return [SampleRow(label=int(y[i]), attacked=0, clean_correct=int(clean.correct[i]),
                      clean_flagged=int(clean.flagged[i]), adv_correct=int(clean.correct[i]),
                      adv_flagged=int(clean.flagged[i]),
                      robust=int(clean.correct[i] and not clean.flagged[i]), norm=0.0,
                      iterations=0, forward_passes=1, backward_passes=0,
                      adv_pred=int(clean.pred[i])) for i in range(len(y))]


def run_batch(defense, attack, x: torch.Tensor, y: torch.Tensor, clean, *, eps: float, seed: int,
              draws: int, attack_model: nn.Module | None = None, context: Any = None
              ) -> tuple[list[dict], torch.Tensor | None, dict]:
    """Compute one batch of one cell: ``(rows, adversarials or None, records)``.

    ``clean`` is the batch's slice of the clean scores; ``attack`` None is the clean cell.
    ``attack_model`` is what the attack runs on (an :class:`AttackView`); re-scoring always
    uses ``defense`` itself.
    """
    if attack is None:
        return clean_rows(y, clean), None, {}
    from bench.harness.scoring import attack_batch

    kw = {} if attack_model is None or attack_model is defense else {"attack_model": attack_model}
    return attack_batch(defense, attack, x, y, eps, clean=clean, seed=seed, draws=draws,
                        context=context, **kw)


# the GPU path --------------------------------------------------------------------------------
@dataclass
class Acceleration:
    """How the attack's passes run: autocast dtype, torch.compile, channels-last."""

    amp: torch.dtype | None = None
    compile: bool = False
    channels_last: bool = False

    @property
    def active(self) -> bool:
        return self.amp is not None or self.compile or self.channels_last

    def key(self) -> dict[str, Any]:
        """What changes results and so goes into the cell key (empty by default)."""
        out: dict[str, Any] = {}
        if self.amp is not None:
            out["amp"] = str(self.amp).replace("torch.", "")
        if self.compile:
            out["compile"] = True
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**self.key(), "channels_last": self.channels_last}


def acceleration(cfg, device: str) -> Acceleration:
    """The :class:`Acceleration` a config asks for on ``device`` (channels-last: CUDA only)."""
    amp = getattr(cfg, "amp", False)
    dtype = None
    if amp in (True, "bf16", "bfloat16"):
        dtype = torch.bfloat16
    elif amp in ("fp16", "float16"):
        dtype = torch.float16
    cl = getattr(cfg, "channels_last", "auto")
    cuda = torch.device(device).type == "cuda"
    return Acceleration(amp=dtype, compile=bool(getattr(cfg, "compile", False)),
                        channels_last=cuda if cl == "auto" else bool(cl))


class AttackView(nn.Module):
    """The defense as the ATTACK sees it: autocast and/or compiled and/or channels-last inputs.

    Logits come back in float32. Attribute look-ups fall through to the defense, so attacks that
    read ``classifier``, ``preprocessor``, ``detector`` or ``structure`` see the real ones (in
    float32: only calls through this view are autocast or compiled).
    """

    def __init__(self, defense: nn.Module, accel: Acceleration) -> None:
        super().__init__()
        self.defense = defense
        self.accel = accel
        fwd = defense
        if accel.compile:
            fwd = torch.compile(defense)
        object.__setattr__(self, "_fwd", fwd)  # not a registered submodule (no duplicate state)
        # a new Module is in training mode; attacks save and restore the mode of what they get,
        # which would otherwise put the defense (BatchNorm) in training mode afterwards
        self.train(defense.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.accel.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.accel.amp is None:
            return self._fwd(x)
        with torch.autocast(x.device.type, dtype=self.accel.amp):
            out = self._fwd(x)
        return out.float()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["defense"], name)


def attack_view(defense: nn.Module, accel: Acceleration, log: Callable[[str], None] = print
                ) -> nn.Module:
    """``defense`` itself when nothing is asked for, else an :class:`AttackView` of it.

    Channels-last converts the defense's 4-D parameters in place (same values, so the same
    sha256). A ``torch.compile`` that fails on its first call falls back to eager, with a note.
    """
    if not accel.active:
        return defense
    if accel.channels_last:
        defense.to(memory_format=torch.channels_last)
    view = AttackView(defense, accel)
    if accel.compile:
        view = _CompileGuard(view, Acceleration(accel.amp, False, accel.channels_last), log)
    return view


class _CompileGuard(AttackView):
    """Runs the compiled view; on a compilation error switches to eager for good."""

    def __init__(self, view: AttackView, eager: Acceleration, log: Callable[[str], None]) -> None:
        super().__init__(view.defense, eager)
        object.__setattr__(self, "_compiled", view)
        object.__setattr__(self, "_log", log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled")
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as exc:  # noqa: BLE001 - torch.compile raises many types
                self._log(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:120]}); "
                          "attacking this defense in eager mode")
                object.__setattr__(self, "_compiled", None)
        return super().forward(x)


def resolve_batch_size(requested: int | str, defense: nn.Module, x: torch.Tensor, *,
                       device: str) -> int:
    """``batch_size`` as an int; ``"auto"`` fills the device.

    On CUDA: a forward+backward of the defense on a probe batch measures the peak memory per
    sample; the batch is the largest power of two whose probe-measured footprint stays within
    :data:`AUTO_MEMORY_FRACTION` of the device's total memory (attacks keep a few copies of the
    batch besides the graph), at most :data:`MAX_AUTO_BATCH` and at most the number of samples.
    Elsewhere: :data:`CPU_AUTO_BATCH`. The result is part of the cell key.
    """
    if requested != "auto":
        return int(requested)
    n = max(1, len(x))
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return min(CPU_AUTO_BATCH, n)
    probe = min(32, n)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    was_training = defense.training
    defense.eval()
    try:
        with torch.random.fork_rng(devices=[dev]), torch.enable_grad():
            xp = x[:probe].detach().clone().requires_grad_(True)
            out = defense(xp)
            if out.requires_grad:
                out.float().logsumexp(1).sum().backward()
        torch.cuda.synchronize(dev)
        per_sample = max(1, (torch.cuda.max_memory_allocated(dev) - base)) / probe
    finally:
        defense.train(was_training)
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    fit = max(1, int(total * AUTO_MEMORY_FRACTION / per_sample))
    bs = 2 ** int(math.floor(math.log2(fit)))
    return max(1, min(bs, MAX_AUTO_BATCH, n))


# jobs ----------------------------------------------------------------------------------------
@dataclass
class CellJob:
    """The batches of one cell to compute, and where their results go."""

    key: str
    label: str
    defense: Any
    attack: Any  # an Attack, or None for the clean cell
    eps: float
    seed: int
    draws: int
    defense_sha256: str
    #: registry recipe of the defense, for workers that rebuild it (``defense_transfer: rebuild``)
    recipe: dict = field(default_factory=dict)
    on_batch: Callable[[BatchOutput], None] = lambda out: None
    on_done: Callable[[bool], None] = lambda mutated: None  # argument: the defense was mutated
    #: the run context every attack call of the cell gets (:class:`attacks.base.RunContext`)
    context: Any = None


class Executor:
    """Computes batches; results reach the driver through ``job.on_batch`` then ``job.on_done``.

    ``submit`` may return before the batches are computed (Ray); ``drain`` blocks until every
    submitted job is done. ``close`` releases what the executor started.
    """

    name = "base"

    def __init__(self, *, device: str, accel: Acceleration | None = None,
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
        self.device = device
        self.accel = accel or Acceleration()
        self.log = log
        self.progress = progress
        self._views: dict[int, tuple[Any, nn.Module]] = {}

    def view(self, defense: nn.Module) -> nn.Module:
        """The attack view of the driver's ``defense`` (built once per defense object)."""
        hit = self._views.get(id(defense))
        if hit is None or hit[0] is not defense:
            hit = (defense, attack_view(defense, self.accel, self.log))
            self._views = {id(defense): hit}  # one defense at a time
        return hit[1]

    def submit(self, job: CellJob, batches: Sequence[tuple[int, torch.Tensor]],
               x_all: torch.Tensor, y_all: torch.Tensor, clean) -> None:  # pragma: no cover
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "acceleration": self.accel.as_dict()}

    def _run_here(self, job: CellJob, b: int, idx: torch.Tensor, x_all, y_all, clean
                  ) -> BatchOutput:
        from bench.harness.scoring import Scored

        t0 = time.perf_counter()
        x, y = x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)]
        cl = Scored(clean.pred[idx], clean.correct[idx], clean.flagged[idx])
        model = self.view(job.defense) if job.attack is not None else None
        rows, adv, records = run_batch(job.defense, job.attack, x, y, cl, eps=job.eps,
                                       seed=job.seed + b, draws=job.draws, attack_model=model,
                                       context=job.context)
        return BatchOutput(b, idx, rows, adv, records, time.perf_counter() - t0)


class LocalExecutor(Executor):
    """In-process, batch after batch (the default)."""

    name = "local"

    def submit(self, job, batches, x_all, y_all, clean) -> None:
        from tqdm.auto import tqdm

        for b, idx in tqdm(batches, desc=job.label, disable=not self.progress, leave=False):
            job.on_batch(self._run_here(job, b, idx, x_all, y_all, clean))
        mutated = bool(job.defense_sha256) and hasattr(job.defense, "fingerprint") and \
            job.defense.fingerprint() != job.defense_sha256
        job.on_done(mutated)


# Ray -----------------------------------------------------------------------------------------
def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("the Ray executor needs ray, which is not installed; run "
                            "pip install -e '.[ray]' (or use --executor local)") from None
    return ray


class RayExecutor(Executor):
    """One Ray task per batch; results streamed back and stored by the driver as they arrive.

    ``address``: an existing cluster ("auto", "ray://host:10001", a GCS address); None starts a
    local one (or uses the one this process already started with ``ray.init``). ``threads``:
    torch threads per task; ``num_cpus`` / ``num_gpus``: resources per task. On CUDA: 1 thread,
    1 CPU and ``num_gpus`` 1 (a fraction packs tasks on a GPU). On a CPU the default is the
    driver's thread count for both ``threads`` and ``num_cpus``, because CPU float results
    depend on the thread count and the default must reproduce a local run bit for bit;
    ``threads: 1`` runs one task per core (more tasks at once, last-bit differences).
    """

    name = "ray"

    def __init__(self, *, device: str, accel: Acceleration | None = None, log=print,
                 progress: bool = False, address: str | None = None,
                 num_cpus: float | None = None,
                 num_gpus: float | None = None, threads: int | None = None,
                 defense_transfer: str = "put", max_in_flight: int | None = None) -> None:
        super().__init__(device=device, accel=accel, log=log, progress=progress)
        if defense_transfer not in ("put", "rebuild"):
            raise ExecutorError(f"executor option defense_transfer: expected put or rebuild, got "
                                f"{defense_transfer!r}")
        self.ray = import_ray()
        self.address = address
        cuda = torch.device(device).type == "cuda"
        # CPU float results depend on torch's intra-op thread count: by default a CPU task uses
        # the driver's, so a Ray run stores bit-identical results to a local run, and reserves
        # as many CPUs as it runs threads (no oversubscription)
        if threads is None:
            threads = int(num_cpus) if num_cpus else (1 if cuda else torch.get_num_threads())
        self.threads = max(1, int(threads))
        self.num_cpus = float(num_cpus if num_cpus is not None else
                              (1 if cuda else self.threads))
        self.num_gpus = float(num_gpus if num_gpus is not None else (1 if cuda else 0))
        if cuda and self.num_gpus <= 0:
            raise ExecutorError("executor option num_gpus must be > 0 when the device is cuda "
                                "(e.g. 0.25 to run four tasks per GPU)")
        self.defense_transfer = defense_transfer
        self.max_in_flight = max_in_flight
        self._owns = False
        self._remote = None
        self._handles: dict[int, tuple[Any, dict]] = {}
        self._pending: dict[Any, tuple[CellJob, int, torch.Tensor]] = {}
        self._queued: list[tuple[CellJob, dict, int, torch.Tensor, tuple]] = []
        self._left: dict[int, int] = {}
        self._mutated: dict[int, bool] = {}
        self._bar = None
        self._submitted: dict[Any, float] = {}
        #: per finished task: seconds from submission to the result in the driver, and the
        #: worker's compute time (their difference is the executor's overhead per task)
        self.task_times: list[dict[str, float]] = []

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._remote is not None:
            return
        ray = self.ray
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "ignore_reinit_error": True}
            if self.address:
                kw["address"] = self.address
            try:
                ray.init(**kw)
            except ConnectionError as exc:
                raise ExecutorError(f"cannot connect to the Ray cluster at {self.address!r} "
                                    f"({exc}); start it (ray start --head) or drop --address to "
                                    "run a local one") from None
            self._owns = True
        # a task asking for more CPUs or GPUs than any node has would wait forever
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
        if most_cpus and self.num_cpus > most_cpus:
            self.log(f"ray: tasks ask for {self.num_cpus:g} CPUs but the largest node has "
                     f"{most_cpus:g}; asking for {most_cpus:g}")
            self.num_cpus = float(most_cpus)
        if self.num_gpus and not any(n.get("GPU", 0) >= min(self.num_gpus, 1) for n in nodes):
            raise ExecutorError(f"the Ray cluster has no node with {self.num_gpus:g} GPU(s) for "
                                "the cuda device; add GPU nodes, lower num_gpus or use "
                                "--device cpu")
        self._remote = ray.remote(_ray_batch)

    def close(self) -> None:
        self.drain_quietly()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
            self._owns = False
        self._remote = None

    def drain_quietly(self) -> None:
        for ref in list(self._pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._pending.clear()
        self._queued.clear()
        self._submitted.clear()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "threads": self.threads, "defense_transfer": self.defense_transfer}

    # work ----------------------------------------------------------------------------------
    def _handle(self, job: CellJob) -> dict:
        hit = self._handles.get(id(job.defense))
        if hit is not None and hit[0] is job.defense:
            return hit[1]
        handle = {"token": uuid.uuid4().hex, "sha256": job.defense_sha256, "recipe": job.recipe,
                  "device": self.device, "accel": self.accel, "threads": self.threads,
                  "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
                  "ref": None}
        if self.defense_transfer == "put":
            try:
                portable = job.defense if torch.device(self.device).type == "cpu" else \
                    copy.deepcopy(job.defense).cpu()
                handle["ref"] = [self.ray.put(portable)]  # a list: the worker gets it once
            except Exception as exc:  # noqa: BLE001 - pickling errors come in many types
                if not job.recipe:
                    raise ExecutorError(f"cannot send the defense to Ray workers ({exc}); make "
                                        "it picklable or use --executor local") from None
                self.log(f"the defense cannot be pickled ({type(exc).__name__}); Ray workers "
                         "rebuild it from its registry name instead")
        self._handles = {id(job.defense): (job.defense, handle)}
        return handle

    def submit(self, job, batches, x_all, y_all, clean) -> None:
        if job.attack is None:  # a clean cell is bookkeeping only: do it here
            for b, idx in batches:
                job.on_batch(self._run_here(job, b, idx, x_all, y_all, clean))
            job.on_done(False)
            return
        self.start()
        if not batches:
            job.on_done(False)
            return
        handle = self._handle(job)
        self._left[id(job)] = len(batches)
        self._mutated[id(job)] = False
        for b, idx in batches:
            cpu = idx.cpu()
            args = (x_all[idx.to(x_all.device)].cpu(), y_all[idx.to(y_all.device)].cpu(),
                    (clean.pred[idx].cpu(), clean.correct[idx].cpu(), clean.flagged[idx].cpu()))
            self._queued.append((job, handle, b, cpu, args))
        if self._bar is None and self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="ray batches", total=0, leave=False)
        if self._bar is not None:
            self._bar.total += len(batches)
            self._bar.refresh()
        self._launch()
        self._collect(timeout=0)

    def _launch(self) -> None:
        cap = self.max_in_flight or len(self._queued) + len(self._pending)
        while self._queued and len(self._pending) < cap:
            job, handle, b, idx, (x, y, cl) = self._queued.pop(0)
            ref = self._remote.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                handle, job.attack, x, y, cl, job.eps, job.seed + b, job.draws, b, idx,
                job.context)
            self._pending[ref] = (job, b, idx)
            self._submitted[ref] = time.perf_counter()

    def _collect(self, timeout: float | None) -> None:
        """Store every finished batch (waiting up to ``timeout`` s for the first one)."""
        if not self._pending:
            return
        ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        if ready:
            more, _ = self.ray.wait(list(self._pending), num_returns=len(self._pending),
                                    timeout=0)
            ready = list(dict.fromkeys(list(ready) + list(more)))
        try:
            for ref in ready:
                job, b, idx = self._pending.pop(ref)
                out = self.ray.get(ref)  # a worker's exception is raised here, as its own type
                self.task_times.append({"latency": time.perf_counter() - self._submitted.pop(ref),
                                        "compute": out.wall_time})
                job.on_batch(out)
                if self._bar is not None:
                    self._bar.update(1)
                self._mutated[id(job)] |= out.mutated
                self._left[id(job)] -= 1
                if self._left[id(job)] == 0:
                    del self._left[id(job)]
                    job.on_done(self._mutated.pop(id(job)))
        except BaseException:  # a failed task or a failed store write: stop the others
            self.drain_quietly()
            raise
        self._launch()

    def drain(self) -> None:
        try:
            while self._pending or self._queued:
                self._launch()
                self._collect(timeout=None)
        except BaseException:
            self.drain_quietly()
            raise


# the worker side ----------------------------------------------------------------------------
_WORKER_DEFENSES: dict[str, tuple[Any, nn.Module]] = {}


def _worker_device(device: str) -> str:
    # Ray narrows CUDA_VISIBLE_DEVICES to the task's GPU(s): the driver's cuda:N is cuda here
    return "cuda" if torch.device(device).type == "cuda" else device


def _worker_defense(handle: dict) -> tuple[Any, nn.Module]:
    hit = _WORKER_DEFENSES.get(handle["token"])
    if hit is not None:
        return hit
    device = _worker_device(handle["device"])
    if handle["ref"] is not None:
        import ray

        defense = ray.get(handle["ref"][0])
        defense.to(device)
    else:
        from bench.artifacts import prepare_defense

        r = handle["recipe"]
        defense, _ = prepare_defense(r["name"], r["options"], dataset=r["dataset"],
                                     dataset_options=r["dataset_options"], device=device,
                                     preset=r["preset"], progress=False, allow_fit=False,
                                     log=lambda m: None)
    defense.eval()
    sha = handle["sha256"]
    if sha and hasattr(defense, "fingerprint") and defense.fingerprint() != sha:
        raise ExecutorError(f"the defense on this Ray worker ({handle['recipe'].get('name')}) "
                            "differs from the driver's (sha256 mismatch); share the artifact "
                            "cache (ROBUSTMATRIX_CACHE) with the workers or use "
                            "defense_transfer: put")
    hit = (defense, attack_view(defense, handle["accel"], log=lambda m: None))
    _WORKER_DEFENSES.clear()  # one defense per worker at a time
    _WORKER_DEFENSES[handle["token"]] = hit
    return hit


def _ray_batch(handle: dict, attack, x, y, clean_parts, eps, seed, draws, b, idx,
               context=None) -> BatchOutput:
    """A Ray task: compute batch ``b`` of a cell on this worker."""
    from bench.harness.scoring import Scored

    os.environ.update(handle["env"])
    torch.set_num_threads(handle["threads"])
    defense, view = _worker_defense(handle)  # once per worker (cached)
    t0 = time.perf_counter()
    device = _worker_device(handle["device"])
    x, y = x.to(device), y.to(device)
    cl = Scored(*(t.to(device) for t in clean_parts))
    rows, adv, records = run_batch(defense, attack, x, y, cl, eps=eps, seed=seed, draws=draws,
                                   attack_model=view, context=context)
    wall = time.perf_counter() - t0
    sha = handle["sha256"]
    mutated = bool(sha) and hasattr(defense, "fingerprint") and defense.fingerprint() != sha
    if mutated:
        _WORKER_DEFENSES.pop(handle["token"], None)
    return BatchOutput(b, idx, rows, adv.detach().cpu() if adv is not None else None, records,
                       wall, mutated)


# construction --------------------------------------------------------------------------------
def make_executor(cfg, *, device: str, log: Callable[[str], None] = print,
                  progress: bool = False) -> Executor:
    """The executor a config asks for (``executor`` and ``executor_options``)."""
    name = getattr(cfg, "executor", "local") or "local"
    opts = dict(getattr(cfg, "executor_options", {}) or {})
    accel = acceleration(cfg, device)
    if name == "local":
        if opts:
            raise ExecutorError(f"executor options {sorted(opts)} apply to the ray executor only")
        return LocalExecutor(device=device, accel=accel, log=log, progress=progress)
    if name == "ray":
        bad = set(opts) - set(EXECUTOR_OPTIONS)
        if bad:
            raise ExecutorError(f"unknown ray executor option {sorted(bad)[0]!r}; known: "
                                f"{list(EXECUTOR_OPTIONS)}")
        return RayExecutor(device=device, accel=accel, log=log, progress=progress, **opts)
    raise ExecutorError(f"executor: expected one of {list(EXECUTORS)}, got {name!r}")
