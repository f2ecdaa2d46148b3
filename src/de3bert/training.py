"""Training: the arguments dataclass, the recipes (de3, pabee, deebert) and the Trainer loop."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from de3bert.atomic import write_file
from de3bert.data import (Collator, DataSource, EncodedExample, GlueSource, TaskSpec, as_source, encode_examples,
                          load_run_data, main_metric, source_from_dict, with_location)
from de3bert.devices import PRECISIONS, resolve_device, resolve_precision
from de3bert.errors import CheckpointError, De3bertError, DeviceError
from de3bert.evaluation import (CLASSIFICATION_CRITERIA, LayerOutputs, calibrated_table, choose_policy,
                                collect_layer_outputs, criteria_for, layer_metrics)
from de3bert.losses import LossConfig, early_exit_loss, layer_weights
from de3bert.model_card import describe_choice
from de3bert.modeling import EarlyExitModel, ExitHeadConfig
from de3bert.phase_timer import PhaseTimer
from de3bert.training_state import (STATE_DIR, StateWriter, TrainingState, capture_rng, load_training_state,
                                    restore_rng, state_path)

PROGRESS_EVERY = 10
"""Steps between progress-bar updates of the loss (reading the loss waits for the device)."""
STOP_AFTER_STEPS_ENV = "DE3BERT_STOP_AFTER_STEPS"
"""Testing hook: when set to N, the training process SIGKILLs itself right after optimizer step N (and the
state checkpoint of that step, if one is due), to test crash recovery deterministically."""


@dataclass
class Stage:
    """One training stage of a recipe.

    loss: the loss terms and layer weighting. train_backbone: whether the encoder is updated.
    train_heads: "all", "final" (last exit head only) or "internal" (every head but the last).
    select_by: "mean" (metric averaged over all exits) or "last" (final exit) to keep the best epoch.
    """

    loss: LossConfig
    train_backbone: bool = True
    train_heads: str = "all"
    select_by: str = "mean"


@dataclass
class Recipe:
    """A training method: its stages, whether its heads carry prototypes, and its own exit criterion."""

    stages: list[Stage]
    prototypes: bool
    criterion: str


RECIPES = {
    # DE³-BERT: joint, linearly weighted CE + α prototype CE + β DAR on every layer.
    "de3": Recipe([Stage(LossConfig(1.0, 1.0, "linear"))], prototypes=True, criterion="edr"),
    # PABEE: joint, linearly weighted CE.
    "pabee": Recipe([Stage(LossConfig(0.0, 0.0, "linear"))], prototypes=False, criterion="patience"),
    # DeeBERT: fine-tune backbone + final head, then freeze them and train the internal heads.
    "deebert": Recipe(
        [Stage(LossConfig(0.0, 0.0, "last"), train_heads="final", select_by="last"),
         Stage(LossConfig(0.0, 0.0, "internal"), train_backbone=False, train_heads="internal")],
        prototypes=False, criterion="entropy"),
}


@dataclass
class TrainingArguments:
    """Every knob of a training run."""

    output_dir: str
    """Folder of the best checkpoint (written atomically)."""
    recipe: str = "de3"
    """Training method: de3 (DE³-BERT), pabee (joint weighted CE) or deebert (two-stage)."""
    epochs: int = 3
    """Epochs per stage."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate of the backbone."""
    head_learning_rate: float | None = 1e-3
    """Peak learning rate of the freshly initialized exit heads and prototypes (None: learning_rate).
    Shallow heads get a small share of the depth-weighted loss; at the backbone's rate they barely learn."""
    batch_size: int = 32
    """Global training batch size: with several processes each computes an equal share of every batch, so the
    optimizer steps, and the results, do not depend on the number of processes."""
    eval_batch_size: int = 64
    """Batch size for evaluation (per process; every process evaluates the whole dev set)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up, then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed of initialization, data order, dropout and the calibration split."""
    alpha: float | None = None
    """Prototype CE weight α (None: the recipe's; 0 switches it off)."""
    beta: float | None = None
    """DAR weight β (None: the recipe's; 0 switches it off)."""
    target_speedup: float = 2.0
    """Layer speed-up the default exit policy is calibrated to after training."""
    lam: float = 1.0
    """λ of the hybrid indicator EDR."""
    pcee_patience: int = 2
    """Patience t of PCEE when it is swept and calibrated."""
    criterion: str | None = None
    """Criterion of the default exit policy (None: the one that scores best on the calibration split at
    target_speedup, the recipe's own on a tie)."""
    max_train_samples: int | None = None
    """Train on a fixed random subsample of this many examples (None: all)."""
    calibration_fraction: float = 0.1
    """Fraction of the training data held out to calibrate exit thresholds (0: calibrate on dev)."""
    validation_fraction: float = 0.1
    """Fraction of the training data held out, stratified by class, to pick the best epoch when the data has no
    dev set of its own (a user's files without a validation file; a dataset without a validation split)."""
    max_length: int = 128
    """Maximum tokens per input; longer inputs are truncated (and counted)."""
    save_every_steps: int = 200
    """Write the training state (to resume a stopped run) every this many optimizer steps, and at every epoch
    end (0: at epoch ends only)."""
    device: str = "auto"
    """Where to train: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N. Under several
    processes (torchrun) each process trains on its own GPU."""
    precision: str = "auto"
    """Mixed precision of forward and backward: fp32, bf16, fp16 (CUDA only) or auto (fp32 on the CPU, bf16 on a
    GPU that has it). Weights and optimizer state stay float32."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise De3bertError(f"unknown recipe '{self.recipe}'; choose one of {', '.join(RECIPES)}")
        if self.epochs < 1:
            raise De3bertError(f"epochs must be at least 1, got {self.epochs}")
        for name in ("calibration_fraction", "validation_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise De3bertError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.batch_size < 1:
            raise De3bertError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.save_every_steps < 0:
            raise De3bertError(f"save_every_steps must be 0 or more, got {self.save_every_steps}")
        if self.precision not in PRECISIONS:
            raise De3bertError(f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if self.criterion is not None and self.criterion not in (*CLASSIFICATION_CRITERIA, "regression-patience"):
            raise De3bertError(f"unknown criterion '{self.criterion}'; choose one of "
                               f"{', '.join(CLASSIFICATION_CRITERIA)} or regression-patience")
        if self.criterion in ("edr", "dr") and not RECIPES[self.recipe].prototypes:
            raise De3bertError(f"criterion '{self.criterion}' reads prototypes, which recipe '{self.recipe}' does not "
                               "train; use --recipe de3")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class RunSpec:
    """What a training run was asked to do; saved with its training state, so that `resume` needs only the folder."""

    data: DataSource
    backbone: str
    args: TrainingArguments
    heads: ExitHeadConfig = field(default_factory=ExitHeadConfig)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        """Inverse of to_dict; reads the GLUE task, data_dir and hub_dataset that states from before data sources
        hold instead of a source."""
        data = dict(data)
        if "task" in data:
            data["data"] = GlueSource(data.pop("task"), data.pop("data_dir", None), data.pop("hub_dataset", None))
        else:
            data["data"] = source_from_dict(data["data"])
        return cls(**{**data, "args": TrainingArguments(**data["args"]), "heads": ExitHeadConfig(**data["heads"])})


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


def process_share(indices: list[int], process: int, processes: int) -> tuple[list[int], float]:
    """This process's contiguous part of a global batch, and the weight of its mean loss.

    The weight processes·b/B makes the average over processes (what DDP does to gradients) equal the gradient
    of the mean loss over the whole batch of B. A process left without examples (B < processes) runs one with
    weight 0, because every process has to take part in each step.
    """
    own = np.array_split(np.asarray(indices), processes)[process].tolist()
    return (own, processes * len(own) / len(indices)) if own else (indices[:1], 0.0)


def process_state(device: str = "auto") -> PartialState:
    """This process's place in the run: the only one, or one of several under `accelerate launch` / `torchrun`.

    On the CPU, several processes talk over gloo.
    """
    return PartialState(cpu=resolve_device(device).type == "cpu")


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def training_accelerator(device: str, precision: str) -> Accelerator:
    """The Accelerator of a run on `device` with mixed `precision` (names as in TrainingArguments)."""
    chosen = resolve_device(device)
    precision = resolve_precision(precision, chosen)
    if precision == "fp16" and chosen.type != "cuda":
        raise DeviceError("fp16 mixed precision needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    processes = process_state(device).num_processes
    if chosen.type == "cuda" and ":" in device:
        if processes > 1:
            raise DeviceError(f"--device {device} names one GPU, but {processes} processes each train on their own; "
                              "use --device cuda")
        torch.cuda.set_device(chosen)
    state = AcceleratorState._shared_state  # set up by an earlier Accelerator of this process, if any
    if state and (state["_mixed_precision"] != MIXED_PRECISION[precision] or state["device"].type != chosen.type):
        # Accelerate keeps one process-wide state; a single process may start another run with other settings
        # (a notebook, the test suite), several processes of one run cannot
        if processes > 1:
            raise DeviceError("this distributed run was set up for another device or precision")
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=chosen.type == "cpu", mixed_precision=MIXED_PRECISION[precision])


@dataclass
class StageRun:
    """One training stage made ready: the (possibly process-wrapped) model, optimizer, schedule and loss."""

    index: int
    stage: Stage
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss: LossConfig


def trained_exits(loss: LossConfig, num_layers: int) -> list[int]:
    """Indices of the exit heads a loss reads (layers it weighs by 0 need not be computed)."""
    return [m for m, weight in enumerate(layer_weights(num_layers, loss.layer_weighting).tolist()) if weight]


def stage_loss(recipe: Recipe, stage: Stage, args: TrainingArguments) -> LossConfig:
    """The stage's loss with the run's α/β overrides applied (prototype recipes only)."""
    if not recipe.prototypes:
        return stage.loss
    return LossConfig(stage.loss.alpha if args.alpha is None else args.alpha,
                      stage.loss.beta if args.beta is None else args.beta, stage.loss.layer_weighting)


class Trainer:
    """Trains an EarlyExitModel with a recipe, evaluates every epoch, keeps the best, calibrates.

    One process, or several under `accelerate launch` / `torchrun` (DDP): each process computes its share of
    every global batch, every process evaluates the whole dev set (so all keep the same best epoch), and only
    the main process writes files and prints. The training state is saved for `resume` every
    `save_every_steps` optimizer steps and at every epoch end.
    """

    def __init__(self, model: EarlyExitModel, args: TrainingArguments, task: TaskSpec,
                 train: list[EncodedExample], dev: list[EncodedExample], calibration: list[EncodedExample],
                 run: RunSpec | None = None, dev_split: str = "dev"):
        self.model, self.args, self.task, self.run, self.dev_split = model, args, task, run, dev_split
        self.train_examples, self.dev, self.calibration = train, dev, calibration
        self.recipe = RECIPES[args.recipe]
        self.accelerator = training_accelerator(args.device, args.precision)
        self.collator = Collator(model.tokenizer)
        self.timer = PhaseTimer(enabled=False)
        """Charges each step's phases to data/forward/backward/optimizer (benchmarks/train_throughput.py)."""
        self.state_writer = StateWriter()
        self.history: list[dict] = []
        self.steps_per_epoch = math.ceil(len(train) / args.batch_size)
        self.global_step = 0
        self.best_score, self.best_state = -math.inf, None
        self.stop_after_steps = int(os.environ.get(STOP_AFTER_STEPS_ENV, 0))
        if args.criterion is not None and args.criterion not in criteria_for(model):
            raise De3bertError(f"criterion '{args.criterion}' does not apply to a model for task {model.config.task}; "
                               f"choose one of {', '.join(criteria_for(model))}")

    def _set_trainable(self, stage: Stage) -> list[torch.nn.Parameter]:
        last = len(self.model.heads) - 1
        loss = stage_loss(self.recipe, stage, self.args)
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

    def start_stage(self, stage_index: int, state: TrainingState | None = None) -> StageRun:
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
        return StageRun(stage_index, stage, model, optimizer, scheduler, stage_loss(self.recipe, stage, self.args))

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

    def train_step(self, run: StageRun, indices: list[int]) -> torch.Tensor:
        """One optimizer step on a global batch, of which this process computes its share; the batch's mean loss,
        as a tensor on the device (reading it waits for the step to finish)."""
        own, weight = process_share(indices, self.accelerator.process_index, self.accelerator.num_processes)
        with self.timer.phase("data"):
            batch = self.collator([self.train_examples[i] for i in own])
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            # a process's stand-in row (weight 0) must not move the running-mean prototypes: label −1 is not counted
            prototype_labels = labels if weight else torch.full_like(labels, -1)
        with self.timer.phase("forward"):
            output = run.model(**batch, with_prototypes=self.recipe.prototypes, labels=prototype_labels,
                               exits=trained_exits(run.loss, self.model.num_layers))
            loss = weight * early_exit_loss(output.layers, labels, run.loss)
        with self.timer.phase("backward"):
            self.accelerator.backward(loss)
        with self.timer.phase("optimizer"):
            self.accelerator.clip_grad_norm_(run.model.parameters(), self.args.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(loss.detach(), "mean")

    def _save_state(self, run: StageRun, position: tuple[int, int, int], permutation: list[int],
                    running_loss: torch.Tensor | float | None) -> None:
        """Write the training state in the background; position: (stage, epoch, step) of the next batch to train."""
        with self.timer.phase("state"):
            rng = gather_object([capture_rng()])  # a collective: every process takes part, the main one writes
            if not self.accelerator.is_main_process:
                return
            stage, epoch, step = position
            state = TrainingState(
                run=self.run.to_dict() if self.run else {}, examples=len(self.train_examples), stage=stage,
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
        if self.run is not None:
            config.training["data"] = self.run.data.to_dict()
        if calibrate_policies:
            dev = collect_layer_outputs(self.model, self.dev, self.args.eval_batch_size, self.args.progress)
            config.training["layer_metrics"] = layer_metrics(dev, self.task)
            self._calibrate(dev)
        self.model.save_pretrained(self.args.output_dir, keep=(STATE_DIR,))
        write_file(Path(self.args.output_dir) / "training_history.json",
                   lambda handle: handle.write(json.dumps(self.history, indent=2).encode()))

    def _calibrate(self, dev: LayerOutputs) -> None:
        """Calibrate every criterion the model supports on the calibration split; the default policy is the one
        that scores best there at the target speed-up (or the one --criterion asks for)."""
        config = self.model.config
        grid = {"patience": self.args.pcee_patience, "lam": self.args.lam}
        calibration = collect_layer_outputs(self.model, self.calibration or self.dev, self.args.eval_batch_size)
        criteria = criteria_for(self.model)
        config.calibration = calibrated_table(criteria, calibration, dev, self.task, **grid)
        preferred = self.args.criterion or ("regression-patience" if self.task.is_regression else self.recipe.criterion)
        policy, config.policy_selection = choose_policy(criteria, calibration, self.task, self.args.target_speedup,
                                                        preferred, forced=self.args.criterion is not None, **grid)
        config.policy = policy.to_dict()
        reached = any("metric" in r and r["criterion"] == config.policy_selection["criterion"]
                      for r in config.policy_selection["standings"])
        self.accelerator.print(f"{'default exit policy' if reached else 'warning'}: "
                               f"{describe_choice(config.policy_selection)}")


def train(data: DataSource | str, backbone: str, args: TrainingArguments, data_dir: str | None = None,
          hub_dataset: str | None = None, heads: ExitHeadConfig | None = None) -> TrainResult:
    """The whole job: read the data, build the model on a backbone, train, calibrate, save.

    data: where the examples come from (GlueSource, FileSource, DatasetSource), or a GLUE task name, read from
    data_dir or hub_dataset.
    """
    if state_path(args.output_dir).exists():
        raise CheckpointError(
            f"{args.output_dir} holds the training state of an unfinished run: continue it with `de3bert train "
            f"--resume {args.output_dir}` (de3bert.training.resume), or delete {state_path(args.output_dir).parent}")
    return _run(RunSpec(as_source(data, data_dir, hub_dataset), backbone, args, heads or ExitHeadConfig()))


def resume(output_dir: str | Path, data_dir: str | None = None, progress: bool | None = None,
           device: str | None = None) -> TrainResult:
    """Continue a stopped run from <output_dir>/training_state, with the arguments it was started with.

    It ends with the weights the uninterrupted run would have reached. data_dir: where a GLUE task's data lies
    now, if it moved. progress: show progress bars (None: as the run did). device: where to continue (None: where
    the run was asked to train; another device gives the same run up to floating-point differences).
    """
    state = load_training_state(output_dir)
    if not state.run:
        raise CheckpointError(f"the training state in {output_dir} was saved by a Trainer driven directly; "
                              "continue it with Trainer(...).train(load_training_state(...))")
    try:
        run = RunSpec.from_dict(state.run)
    except (TypeError, De3bertError) as exc:
        raise CheckpointError(f"{state_path(output_dir)} holds arguments this de3bert cannot use: {exc}") from exc
    args = replace(run.args, output_dir=str(output_dir), progress=run.args.progress if progress is None else progress,
                   device=run.args.device if device is None else device)
    process_state(args.device).print(f"resuming the run in {output_dir} after optimizer step {state.global_step}")
    return _run(replace(run, args=args, data=with_location(run.data, data_dir, None)), state)


def _run(run: RunSpec, state: TrainingState | None = None) -> TrainResult:
    """Read the run's data, build the model, and train it from the start or from `state`."""
    args = run.args
    processes = process_state(args.device)
    data = load_run_data(run.data, args.max_train_samples, args.validation_fraction, args.calibration_fraction,
                         args.seed)
    task = data.task
    heads = run.heads if RECIPES[args.recipe].prototypes else replace(run.heads, prototype_dim=0)
    seed_everything(args.seed)
    model = EarlyExitModel.from_backbone(run.backbone, task.name, list(task.labels), heads, args.max_length,
                                         list(task.label_names))
    encoded = {}
    for split, examples in (("train", data.train), ("calibration", data.calibration), ("dev", data.dev)):
        encoded[split] = encode_examples(model.tokenizer, examples, args.max_length)
        truncated = sum(e.truncated for e in encoded[split])
        if truncated:
            processes.print(f"note: {truncated} of {len(examples)} {split} inputs were longer than {args.max_length} "
                            "tokens and were truncated")
    held_out = ("" if data.dev_split == "dev"
                else f" (held out from train{'' if task.is_regression else ', stratified by class'})")
    processes.print(
        f"task {task.name}: {len(data.train)} training, {len(data.calibration)} calibration, "
        f"{len(data.dev)} {data.dev_split}{held_out} examples; "
        + (f"{task.num_labels} classes; " if task.num_labels > 2 else "")
        + f"backbone {run.backbone} ({model.num_layers} layers); recipe {args.recipe}"
        + (f"; {processes.num_processes} processes, {args.batch_size} examples per step in all"
           if processes.num_processes > 1 else ""))
    trainer = Trainer(model, args, task, encoded["train"], encoded["dev"], encoded["calibration"], run,
                      data.dev_split)
    return trainer.train(state)
