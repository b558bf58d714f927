"""Surviving preemption and time limits: SLURM sends SIGUSR1 some seconds ahead
(`#SBATCH --signal=USR1@120`); kiln finishes the step in flight, saves `last.ckpt`, requeues the
job and exits. The requeued job (same job id, so the same run directory and W&B run) starts with
`--ckpt_path auto` and resumes from that checkpoint: weights, optimizer, schedulers, RNG, data
position.

The signal handler only raises a flag. Saving waits for the step boundary, where every rank
agrees (one all-reduce of the flag) and no optimizer step is half applied; Lightning's own
handler saves inside the signal handler, wherever each rank happens to be.
"""
from __future__ import annotations

import signal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from kiln.launch import env


class Preemption(L.Callback):
    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool | None = None):
        self.signum = signum
        self.requeue = env.in_slurm_job() if requeue is None else requeue
        self.received = False
        self._previous = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        rank_zero_info(f"kiln: {signal.Signals(self.signum).name} received: saving at step {trainer.global_step}"
                       + (" and requeueing" if self.requeue else ""))
        checkpoint = trainer.checkpoint_callback
        checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        if self.requeue and trainer.is_global_zero:
            env.requeue()
        trainer.should_stop = True
