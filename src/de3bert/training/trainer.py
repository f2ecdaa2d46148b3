"""The Trainer: trains an EarlyExitModel with a recipe, scores every epoch on dev, keeps the best, calibrates.

A plain loop you can read top to bottom: per stage of the recipe, per epoch, per global batch — forward
(only the heads the loss reads), loss, backward, clip, step — then every exit scored on dev, the best
epoch kept, and at the end the exit policies calibrated (`exits.calibration`) and the checkpoint written.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from de3bert.atomic import write_file
from de3bert.data import Collator, EncodedExample, TaskSpec, main_metric
from de3bert.errors import CheckpointError, De3bertError
from de3bert.exits.calibration import calibrated_table, choose_policy, promise_of, promise_row
from de3bert.exits.criteria import applicable_criteria, own_criterion
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs, layer_metrics
from de3bert.model.modeling import EarlyExitModel
from de3bert.training.arguments import TrainingArguments
from de3bert.training.distributed import Placement, process_share, training_accelerator
from de3bert.training.job import TrainingJob
from de3bert.training.losses import LossConfig, early_exit_loss
from de3bert.training.phase_timer import PhaseTimer
from de3bert.training.recipes import RECIPES, Stage, stage_loss, trained_exits
from de3bert.training.state import STATE_DIR, StateWriter, TrainingState, capture_rng, restore_rng, state_path

PROGRESS_EVERY = 10
"""Steps between progress-bar updates of the loss (reading the loss waits for the device)."""
STOP_AFTER_STEPS_ENV = "DE3BERT_STOP_AFTER_STEPS"
"""Testing hook: when set to N, the training process SIGKILLs itself right after optimizer step N (and the
state checkpoint of that step, if one is due), to test crash recovery deterministically."""


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    history: list[dict] = field(default_factory=list)
    best_score: float = float("nan")



def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(size: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The shuffled order of the training examples in one epoch: a pure function of seed, stage and epoch."""
    return np.random.default_rng([seed, stage, epoch]).permutation(size).tolist()


@dataclass
class PreparedStage:
    """One training stage made ready: the (possibly process-wrapped) model, optimizer, schedule and loss."""

    index: int
    stage: Stage
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss: LossConfig


class Trainer:
    """Trains an EarlyExitModel with a recipe, evaluates every epoch, keeps the best, calibrates.

    One process, or several under `accelerate launch` / `torchrun` (DDP): each process computes its share of
    every global batch, every process evaluates the whole dev set (so all keep the same best epoch), and only
    the main process writes files and prints. The training state is saved for `resume` every
    `save_every_steps` optimizer steps and at every epoch end.
    """

    def __init__(self, model: EarlyExitModel, args: TrainingArguments, task: TaskSpec,
                 train: list[EncodedExample], dev: list[EncodedExample], calibration: list[EncodedExample],
                 job: TrainingJob | None = None, dev_split: str = "dev", placement: Placement | None = None):
        self.model, self.args, self.task, self.job, self.dev_split = model, args, task, job, dev_split
        self.train_examples, self.dev, self.calibration = train, dev, calibration
        self.recipe = RECIPES[args.recipe]
        self.placement = placement or Placement.resolve(args.device, args.precision)
        self.accelerator = training_accelerator(self.placement)
        self.scaler = self.placement.grad_scaler()
        self.collator = Collator(model.tokenizer)
        self.timer = PhaseTimer(enabled=False)
        """Charges each step's phases to data/forward/backward/optimizer (benchmarks/train_throughput.py)."""
        self.state_writer = StateWriter()
        self.history: list[dict] = []
        self.steps_per_epoch = math.ceil(len(train) / args.batch_size)
        self.global_step = 0
        self.best_score, self.best_state = -math.inf, None
        self.stop_after_steps = int(os.environ.get(STOP_AFTER_STEPS_ENV, 0))
        supported = applicable_criteria(model.config.is_regression, model.has_prototypes)
        if args.criterion is not None and args.criterion not in supported:
            raise De3bertError(f"criterion '{args.criterion}' does not apply to a model for task {model.config.task}; "
                               f"choose one of {', '.join(supported)}")

    def _set_trainable(self, stage: Stage) -> list[torch.nn.Parameter]:
        last = len(self.model.heads) - 1
        loss = stage_loss(self.recipe, stage, self.args.alpha, self.args.beta)
        for p in self.model.backbone.parameters():
            p.requires_grad_(stage.train_backbone)
        for index, head in enumerate(self.model.heads):
            on = stage.train_heads == "all" or (stage.train_heads == "final") == (index == last)
            for name, p in head.named_parameters():
                # With α = β = 0 no loss term reaches the prototypical networks, and DDP refuses trainable
                # parameters that get no gradient.
                prototypical = name.startswith(("projection.", "prototypes"))
                p.requires_grad_(on and (not prototypical or bool(loss.alpha or loss.beta)))
        return [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        head_lr = self.args.head_learning_rate or self.args.learning_rate
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            decay = 0.0 if (name.endswith("bias") or "LayerNorm" in name or "prototypes" in name) else self.args.weight_decay
            lr = self.args.learning_rate if name.startswith("backbone.") else head_lr
            groups.setdefault((lr, decay), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()])

    def _score(self, outputs: LayerOutputs, select_by: str) -> tuple[float, list[dict]]:
        rows = layer_metrics(outputs, self.task)
        scores = [main_metric(self.task, r) for r in rows]
        return (scores[-1] if select_by == "last" else sum(scores) / len(scores)), rows

    def train(self, state: TrainingState | None = None) -> TrainResult:
        """Run every stage of the recipe, or what a stopped run left (`state`); the best weights end up on disk."""
        seed_everything(self.args.seed)
        first_stage = 0
        if state is not None:
            if state.examples != len(self.train_examples):
                raise CheckpointError(f"the training state is for {state.examples} training examples, but the data "
                                      f"has {len(self.train_examples)}; resume on the data the run started with")
            self.model.load_state_dict(state.model)
            self.history, self.global_step, first_stage = list(state.history), state.global_step, state.stage
            if len(state.rng) == self.accelerator.num_processes:
                # Nothing from here to the next training step draws random numbers: dropout continues exactly.
                restore_rng(state.rng[self.accelerator.process_index])
            else:
                self.accelerator.print(f"note: the run was saved by {len(state.rng)} processes and continues on "
                                       f"{self.accelerator.num_processes}, so dropout draws fresh random numbers")
        for stage_index in range(first_stage, len(self.recipe.stages)):
            self._train_stage(stage_index, state if stage_index == first_stage else None)
        self._save(calibrate_policies=True)
        self.state_writer.wait()
        if self.accelerator.is_main_process:
            shutil.rmtree(state_path(self.args.output_dir).parent, ignore_errors=True)
        return TrainResult(Path(self.args.output_dir), self.history, self.best_score)

    def start_stage(self, stage_index: int, state: TrainingState | None = None) -> PreparedStage:
        """Make a stage ready to train: its trainable parts, optimizer, schedule and process wrapping (restored
        from `state` when the run stopped inside this stage)."""
        stage = self.recipe.stages[stage_index]
        self._set_trainable(stage)
        optimizer = self._optimizer()
        steps = self.args.epochs * self.steps_per_epoch
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.args.warmup_ratio * steps), steps)
        # No prepared DataLoader: the trainer draws (epoch_order) and shards (process_share) its batches itself,
        # so the global batch and the data order are the same for any number of processes, and a resumed
        # epoch simply starts at a later step of the same order.
        model, optimizer = self.accelerator.prepare(self.model, optimizer)
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        return PreparedStage(stage_index, stage, model, optimizer, scheduler, stage_loss(self.recipe, stage, self.args.alpha, self.args.beta))

    def _train_stage(self, stage_index: int, state: TrainingState | None) -> None:
        """Train one stage for its epochs (the rest of them when `state` stopped inside it); keep its best epoch."""
        args, run = self.args, self.start_stage(stage_index, state)
        self.best_score, self.best_state, first_epoch = -math.inf, None, 1
        if state is not None:
            self.best_score, self.best_state, first_epoch = state.best_score, state.best_model, state.epoch
        main = self.accelerator.is_main_process
        for epoch in range(first_epoch, args.epochs + 1):
            resumed = state is not None and epoch == first_epoch
            order = (state.permutation if resumed and state.permutation
                     else epoch_order(len(self.train_examples), args.seed, stage_index, epoch))
            first_step = state.step if resumed else 0
            # the smoothed loss stays on the device: reading it every step would stall the GPU
            running = (torch.tensor(state.running_loss, dtype=torch.float64, device=self.accelerator.device)
                       if resumed and state.running_loss is not None else None)
            run.model.train()
            bar = tqdm(range(first_step, self.steps_per_epoch), initial=first_step, total=self.steps_per_epoch,
                       desc=f"stage {stage_index + 1} epoch {epoch}/{args.epochs}",
                       disable=not (args.progress and main), dynamic_ncols=True)
            started, seen = time.perf_counter(), 0
            for step in bar:
                indices = order[step * args.batch_size:(step + 1) * args.batch_size]
                loss = self.train_step(run, indices).double()
                seen += len(indices)
                running = loss if running is None else 0.9 * running + 0.1 * loss
                self.global_step += 1
                if (step + 1) % PROGRESS_EVERY == 0 or step == self.steps_per_epoch - 1:
                    bar.set_postfix(loss=f"{running.item():.4f}",
                                    samples_per_s=f"{seen / (time.perf_counter() - started):.1f}")
                if args.save_every_steps and self.global_step % args.save_every_steps == 0:
                    self._save_state(run, (stage_index, epoch, step + 1), order, running)
                if self.global_step == self.stop_after_steps:
                    self.state_writer.wait()  # the state checkpoint of this step, if one was due, is on disk
                    os.kill(os.getpid(), signal.SIGKILL)
            running = None if running is None else running.item()
            unwrapped = self.accelerator.unwrap_model(run.model)
            with self.timer.phase("scoring"):
                outputs = collect_layer_outputs(unwrapped, self.dev, args.eval_batch_size, args.progress and main)
                score, rows = self._score(outputs, run.stage.select_by)
            record = {"stage": stage_index + 1, "epoch": epoch, "train_loss": running, "score": score,
                      "seconds": time.perf_counter() - started, "layer_metrics": rows}
            self.history.append(record)
            self.accelerator.print(
                f"stage {stage_index + 1} epoch {epoch}: loss {running:.4f}, dev {self.task.main_metric} by layer "
                + " ".join(f"{main_metric(self.task, r):.3f}" for r in rows) + f" (selection score {score:.4f})")
            if score > self.best_score:
                self.best_score = score
                self.best_state = copy.deepcopy(unwrapped.state_dict())
                with self.timer.phase("checkpoint"):
                    self._save(calibrate_policies=False)
            self._save_state(run, (stage_index, epoch + 1, 0), [], None)
        self.model.load_state_dict(self.best_state)

    def train_step(self, run: PreparedStage, indices: list[int]) -> torch.Tensor:
        """One optimizer step on a global batch, of which this process computes its share; the batch's mean loss,
        as a tensor on the device (reading it waits for the step to finish)."""
        own, weight = process_share(indices, self.accelerator.process_index, self.accelerator.num_processes)
        with self.timer.phase("data"):
            batch = self.collator([self.train_examples[i] for i in own])
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            # a process's stand-in row (weight 0) must not move the running-mean prototypes: label −1 is not counted
            prototype_labels = labels if weight else torch.full_like(labels, -1)
        with self.timer.phase("forward"), self.placement.autocast():
            output = run.model(**batch, with_prototypes=self.recipe.prototypes, labels=prototype_labels,
                               exits=trained_exits(run.loss, self.model.num_layers))
            loss = weight * early_exit_loss(output.layers, labels, run.loss)
        with self.timer.phase("backward"):
            self.accelerator.backward(self.scaler.scale(loss))
        with self.timer.phase("optimizer"):
            self.scaler.unscale_(run.optimizer)  # clip the true gradients (nothing to undo unless fp16)
            self.accelerator.clip_grad_norm_(run.model.parameters(), self.args.max_grad_norm)
            self.scaler.step(run.optimizer)
            self.scaler.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(loss.detach(), "mean")

    def _save_state(self, run: PreparedStage, position: tuple[int, int, int], permutation: list[int],
                    running_loss: torch.Tensor | float | None) -> None:
        """Write the training state in the background; position: (stage, epoch, step) of the next batch to train."""
        with self.timer.phase("state"):
            rng = gather_object([capture_rng()])  # a collective: every process takes part, the main one writes
            if not self.accelerator.is_main_process:
                return
            stage, epoch, step = position
            state = TrainingState(
                run=self.job.to_dict() if self.job else {}, examples=len(self.train_examples), stage=stage,
                epoch=epoch, step=step, global_step=self.global_step,
                running_loss=float(running_loss) if running_loss is not None else None, permutation=permutation,
                model=self.model.state_dict(), optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict(), best_score=self.best_score, best_model=self.best_state,
                history=self.history, rng=rng)
            self.state_writer.save(state, self.args.output_dir)

    def _save(self, calibrate_policies: bool) -> None:
        """Write the checkpoint; at the end of training, with per-layer metrics and calibrated policies."""
        if not self.accelerator.is_main_process:
            return
        config = self.model.config
        splits = {"train": self.train_examples, "calibration": self.calibration, "dev": self.dev}
        config.training = {**self.args.to_dict(), "train_examples": len(self.train_examples),
                           "calibration_examples": len(self.calibration), "dev_examples": len(self.dev),
                           "dev_split": self.dev_split,
                           "class_counts": {s: self.task.class_counts(e.label for e in es) for s, es in splits.items()},
                           "history": [{k: v for k, v in h.items() if k != "layer_metrics"} for h in self.history]}
        if self.job is not None:
            config.training["data"] = self.job.data.to_dict()
        if calibrate_policies:
            dev = collect_layer_outputs(self.model, self.dev, self.args.eval_batch_size, self.args.progress)
            config.training["layer_metrics"] = layer_metrics(dev, self.task)
            self._calibrate(dev)
        self.model.save_pretrained(self.args.output_dir, keep=(STATE_DIR,))
        write_file(Path(self.args.output_dir) / "training_history.json",
                   lambda handle: handle.write(json.dumps(self.history, indent=2).encode()))

    def _calibrate(self, dev: LayerOutputs) -> None:
        """Calibrate every criterion the model supports on the calibration split; the default policy is the reference
        criterion's at the target speed-up unless another criterion beats it there beyond noise (or the one
        --criterion asks for), with what it promises: the speed-up there and its bootstrap interval."""
        config = self.model.config
        grid = {"patience": self.args.pcee_patience, "lam": self.args.lam}
        calibration = collect_layer_outputs(self.model, self.calibration or self.dev, self.args.eval_batch_size)
        criteria = applicable_criteria(self.model.config.is_regression, self.model.has_prototypes, early_only=True)
        config.calibration = calibrated_table(criteria, calibration, dev, self.task, **grid)
        preferred = self.args.criterion or own_criterion(self.args.recipe, self.task.is_regression)
        policy, config.policy_selection = choose_policy(criteria, calibration, self.task, self.args.target_speedup,
                                                        preferred, forced=self.args.criterion is not None,
                                                        seed=self.args.seed, **grid)
        config.policy = policy.to_dict()
        inputs = "the calibration split held out from the training data" if self.calibration else \
            f"the {self.dev_split} set"
        config.calibrated_speedup = promise_of(promise_row(policy, calibration, self.args.target_speedup,
                                                           seed=self.args.seed), inputs)
        reached = any("metric" in r and r["criterion"] == config.policy_selection["criterion"]
                      for r in config.policy_selection["standings"])
        self.accelerator.print(f"{'default exit policy' if reached else 'warning'}: "
                               f"{config.policy_selection['summary']}")
