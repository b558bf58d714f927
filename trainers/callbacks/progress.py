"""What kiln prints while it works, and what it keeps off the console.

`kiln fit`: on a terminal, Lightning's rich bar counting optimizer steps of `max_steps` (its own
counts batches of the epoch, and reads "Epoch 0/-2" when the run is bounded by steps) with the
time `max_time` leaves; elsewhere (a SLURM log, a pipe), where a live bar prints nothing until the
end, one plain line every `every_s` seconds. `kiln eval` and `kiln sample`: progress on stderr
(stdout holds their result) over generation batches, or the time one long call has taken.
`quiet()`: the one-off Lightning and W&B messages that ask nothing a kiln user can or need do.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichModelSummary, RichProgressBar, Timer
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.console import Console
from rich.table import Table

# Lightning warnings a kiln user can do nothing about (regular expressions, matched at the start).
NOT_ACTIONABLE = (
    # Outside a job srun is merely installed; `kiln slurm` writes the srun line for jobs.
    r"The `srun` command is available on your system but is not used",
    # Families judged by a callback (the GANs, diffusion) have held-out data and no validation_step.
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"You defined a `validation_step` but have no `val_dataloader`",
    # Lightning's own call of a torch API that torch has deprecated.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _NoTips(logging.Filter):
    """Lightning's advertisements for its cloud products ("💡 Tip: ... try installing litlogger")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


_NO_TIPS = _NoTips()


def quiet() -> None:
    """Before the Trainer exists; in every process that runs `kiln fit` (DDP's children too)."""
    for message in NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=message)
    # Lightning logs through whichever of the two its last import named.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NO_TIPS)


class ModelSummary(RichModelSummary):
    """Lightning's rich summary without its FLOPs column and "Total FLOPs: 0": it counts FLOPs
    only for a module with an `example_input_array`, which no kiln family has."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, style="dim" if name == " " else None,
                             justify="left" if name in (" ", "Name", "Type", "Mode") else "right")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)


def progress_bar(every_s: float = 30.0) -> ProgressBar:
    """The rich bar where it can redraw itself, else plain lines."""
    console = get_console()
    return StepBar() if console.is_interactive or console.is_jupyter else ProgressLines(every_s)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, int(seconds))))  # max_time overshoots by the last step


def _max_time(trainer: L.Trainer) -> tuple[float, float] | None:
    """(elapsed, left) of `max_time`, when it is set."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    left = timer.time_remaining("train") if timer else None
    return None if left is None else (timer.time_elapsed("train"), left)


def _without_run_id(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's run id: the same all run long
    return metrics


class StepBar(RichProgressBar):
    """A run bounded by `max_steps` counts optimizer steps (as `max_steps` does, across epochs and
    from where a resumed run starts), so its time column is the time to the end."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        text = "step" if self._by_steps() else f"Epoch {current_epoch}" + (
            f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else "")
        if clock := _max_time(trainer):
            text += f" · max_time {_clock(clock[0])} elapsed, {_clock(clock[1])} left"
        return text

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps() and self.progress is not None and self.train_progress_bar_id is not None:
            # reset, not update: a resumed run's jump to its step is no measure of speed.
            self.progress.reset(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.progress is not None and self.is_enabled:
            if self.train_progress_bar_id is None:  # resumed mid-epoch
                self._initialize_train_progress_bar_id()
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()
        if self.progress is not None and self.train_progress_bar_id is not None and _max_time(trainer):
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_run_id(super().get_metrics(trainer, pl_module))


class ProgressLines(ProgressBar):
    """One line after the first step, then every `every_s` seconds, and one at the end:
    `step 120/800 · train/loss 2.345 · 4.10 steps/s · 0:00:29 elapsed · 0:02:45 left`."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._start = self._last = (0.0, 0)  # (time, step) of the start and of the last line
        self._printed = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_run_id(super().get_metrics(trainer, pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = (time.monotonic(), trainer.global_step)
        self._printed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._printed or time.monotonic() - self._last[0] >= self.every_s:
            self._line(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last[1]:
            self._line(trainer, pl_module)

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now, step = time.monotonic(), trainer.global_step
        rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last, self._printed = (now, step), True
        if not self._enabled:
            return
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else
                 f"epoch {trainer.current_epoch} · step {step}"]
        for name, value in self.get_metrics(trainer, pl_module).items():
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        parts.append(f"{rate:.2f} steps/s")
        elapsed, left = now - self._start[0], []
        if trainer.max_steps > 0 and rate > 0:
            left.append((trainer.max_steps - step) / rate)
        if clock := _max_time(trainer):
            elapsed = clock[0]
            left.append(clock[1])
        parts.append(f"{_clock(elapsed)} elapsed")
        if left:
            parts.append(f"{_clock(min(left))} left")
        print(" · ".join(parts), flush=True)


def _stderr() -> Console:
    return Console(stderr=True)


def track(items: Iterable, description: str, total: int | None = None, every_s: float = 10.0) -> Iterator:
    """`items` as they are, with progress on stderr: rich's bar on a terminal, else a line at the
    start, every `every_s` seconds and at the end; nothing for no items."""
    console = _stderr()
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    if total == 0:  # nothing to wait for
        yield from items
        return
    if console.is_interactive:
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, console=console, transient=True)
        return
    start = last = time.monotonic()
    print(f"{description}: 0/{total or '?'}", file=sys.stderr, flush=True)
    done = 0
    for item in items:
        yield item  # the caller's work on it runs until the next item is asked for
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            print(f"{description}: {done}/{total or '?'} · {_clock(now - start)} elapsed", file=sys.stderr, flush=True)
            last = now


@contextlib.contextmanager
def working(description: str) -> Iterator[None]:
    """One long call that reports no progress of its own: a spinner with the time taken on a
    terminal, else a line when it starts and one when it is done, on stderr."""
    console, start = _stderr(), time.monotonic()
    if console.is_interactive:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            bar.add_task(description, total=None)
            yield
        return
    print(f"{description} ...", file=sys.stderr, flush=True)
    yield
    print(f"{description}: done in {_clock(time.monotonic() - start)}", file=sys.stderr, flush=True)
