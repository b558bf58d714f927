"""What bench/overhead.py times a step with, on both of its sides: per-thread CPU time, getrusage
counters and phase marks; and kiln's side's in-memory data module and `StepClock` callback (which
jsonargparse imports as `instruments.InMemoryData` / `instruments.StepClock`)."""
from __future__ import annotations

import json
import os
import resource
import time

import lightning as L

from common import peak_rss_mib, rss_mib, sync


def thread_cpu() -> dict[int, list]:
    """CPU seconds of each thread of this process, by thread id, with its Python name where it
    has one (OpenMP workers and other native threads have none)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tid = int(tid)
        name = "main" if tid == main else names.get(tid, "native (OpenMP, ...)")
        out[tid] = [name, (int(fields[11]) + int(fields[12])) / tick]
    return out


def thread_split(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two `thread_cpu` snapshots, summed by thread name."""
    split: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        name = name.split("-")[0] if name.startswith("Thread-") else name
        split[name] = split.get(name, 0.0) + cpu - before.get(tid, [name, 0.0])[1]
    return split


def rusage_counters() -> list[int]:
    """Minor page faults, voluntary and involuntary context switches of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return [r.ru_minflt, r.ru_nvcsw, r.ru_nivcsw]


# -- what kiln's side runs with (imported by jsonargparse as `overhead.InMemoryData` / `overhead.StepClock`) --

class _Repeat:
    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


class InMemoryData(L.LightningDataModule):
    """The same batch (loaded from `path`) at every step, `steps` times."""

    def __init__(self, path: str, steps: int):
        super().__init__()
        self.path, self.steps = path, steps

    def setup(self, stage: str) -> None:
        import torch

        self.batch = torch.load(self.path, weights_only=True)

    def train_dataloader(self):
        return _Repeat(self.batch, self.steps)


PHASES = ("between steps", "zero_grad, forward, loss", "backward", "update")


class Marks:
    """(wall, CPU) stamps at the phase boundaries of each step: start, before backward, after
    backward, end; `phases` turns them into each phase's mean per timed step."""

    def __init__(self):
        self.steps: list[dict[str, tuple[float, float]]] = []

    def mark(self, name: str) -> None:
        if name == "start":
            self.steps.append({})
        self.steps[-1][name] = (time.perf_counter(), time.process_time())

    def phases(self, warmup: int) -> dict[str, list[float]]:
        """phase -> [wall s, CPU s], means over the steps after `warmup` (each from the previous end)."""
        order = ("start", "backward", "update", "end")
        out = {p: [0.0, 0.0] for p in PHASES}
        timed = list(zip(self.steps[warmup:], self.steps[warmup + 1:]))
        for prev, step in timed:
            bounds = [prev["end"]] + [step[k] for k in order]
            for phase, a, b in zip(PHASES, bounds, bounds[1:]):
                out[phase][0] += (b[0] - a[0]) / len(timed)
                out[phase][1] += (b[1] - a[1]) / len(timed)
        return out


def _timed(fn, into: list[float]):
    """`fn`, adding each call's wall and CPU seconds to into[0] and into[1]."""
    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            into[0] += time.perf_counter() - w
            into[1] += time.process_time() - c

    return wrapper


class StepClock(L.Callback):
    """Stamps each step's phases (Lightning's hooks) and end; times `self.log` and the EMA update by
    thin wrappers (no profiler); at the end of training writes it all to `out`."""

    def __init__(self, out: str, warmup: int, steps: int, device: str = "cpu"):
        self.out, self.warmup, self.steps, self.device = out, warmup, steps, device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loss0 = None
        self.marks = Marks()
        self.log_s, self.ema_s = [0.0, 0.0], [0.0, 0.0]

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self.rss_before = rss_mib()
        self.threads = torch.get_num_threads()
        self.callbacks = [type(c).__name__ for c in trainer.callbacks]
        self.loggers = [type(lg).__name__ for lg in trainer.loggers]
        self.precision = str(trainer.precision)
        pl_module.log = _timed(pl_module.log, self.log_s)
        for callback in trainer.callbacks:
            if type(callback).__name__ == "EMA":
                callback.on_train_batch_end = _timed(callback.on_train_batch_end, self.ema_s)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marks.mark("start")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.marks.mark("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.marks.mark("update")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.wall) in (self.warmup, self.warmup + self.steps):  # the timed window's ends
            sync(self.device)
        self.marks.mark("end")
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.loss0 is None:  # a GAN's manual optimisation returns nothing: its G loss is logged
            loss = outputs.get("loss") if isinstance(outputs, dict) else None
            self.loss0 = float(loss if loss is not None else trainer.callback_metrics.get("train/Gmain/loss", float("nan")))
        if len(self.wall) == self.warmup + 1:
            self.threads_before = thread_cpu()
            self.log_before, self.ema_before = list(self.log_s), list(self.ema_s)
            self.rusage_before = rusage_counters()

    def on_train_end(self, trainer, pl_module) -> None:
        split = thread_split(self.threads_before, thread_cpu())
        steps = len(self.wall) - self.warmup - 1
        phases = self.marks.phases(self.warmup)
        phases["of which self.log"] = [(a - b) / steps for a, b in zip(self.log_s, self.log_before)]
        phases["of which EMA"] = [(a - b) / steps for a, b in zip(self.ema_s, self.ema_before)]
        result = {"stamps_wall": self.wall, "stamps_cpu": self.cpu, "loss0": self.loss0, "thread_cpu_s": split,
                  "phases": phases, "rusage_per_step": [(a - b) / steps for a, b in zip(rusage_counters(), self.rusage_before)],
                  "rss_before_step_mib": self.rss_before, "peak_rss_mib": peak_rss_mib(),
                  "threads": self.threads, "callbacks": self.callbacks, "loggers": self.loggers,
                  "precision": self.precision}
        with open(self.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
