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
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from de3bert.atomic import write_file
from de3bert.data import (Collator, DataSource, EncodedExample, GlueSource, TaskSpec, as_source, encode_examples,
                          load_run_data, main_metric, source_from_dict, with_location)
from de3bert.errors import CheckpointError, De3bertError, PolicyError
from de3bert.evaluation import (CLASSIFICATION_CRITERIA, LayerOutputs, calibrate, calibrated_table, fastest_policy,
                                collect_layer_outputs, layer_metrics)
from de3bert.losses import LossConfig, early_exit_loss
from de3bert.modeling import EarlyExitModel, ExitHeadConfig
from de3bert.training_state import (STATE_DIR, TrainingState, capture_rng, load_training_state, restore_rng,
                                    save_training_state, state_path)

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


def process_state() -> PartialState:
    """This process's place in the run: the only one, or one of several under `accelerate launch` / `torchrun`.

    Without CUDA, several processes talk over gloo.
    """
    return PartialState(cpu=not torch.cuda.is_available())


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
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.history: list[dict] = []
        self.steps_per_epoch = math.ceil(len(train) / args.batch_size)
        self.global_step = 0
        self.best_score, self.best_state = -math.inf, None
        self.stop_after_steps = int(os.environ.get(STOP_AFTER_STEPS_ENV, 0))

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
        if self.accelerator.is_main_process:
            shutil.rmtree(state_path(self.args.output_dir).parent, ignore_errors=True)
        return TrainResult(Path(self.args.output_dir), self.history, self.best_score)

    def _train_stage(self, stage_index: int, state: TrainingState | None) -> None:
        """Train one stage for its epochs (the rest of them when `state` stopped inside it); keep its best epoch."""
        args, stage = self.args, self.recipe.stages[stage_index]
        self._set_trainable(stage)
        loss_config = stage_loss(self.recipe, stage, args)
        optimizer = self._optimizer()
        steps = args.epochs * self.steps_per_epoch
        scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
        # No prepared DataLoader: the trainer draws (epoch_order) and shards (process_share) its batches itself,
        # so the global batch and the data order are the same for any number of processes, and a resumed
        # epoch simply starts at a later step of the same order.
        model, optimizer = self.accelerator.prepare(self.model, optimizer)
        self.best_score, self.best_state, first_epoch = -math.inf, None, 1
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            self.best_score, self.best_state, first_epoch = state.best_score, state.best_model, state.epoch
        main = self.accelerator.is_main_process
        for epoch in range(first_epoch, args.epochs + 1):
            resumed = state is not None and epoch == first_epoch
            order = (state.permutation if resumed and state.permutation
                     else epoch_order(len(self.train_examples), args.seed, stage_index, epoch))
            first_step, running = (state.step, state.running_loss) if resumed else (0, None)
            model.train()
            bar = tqdm(range(first_step, self.steps_per_epoch), initial=first_step, total=self.steps_per_epoch,
                       desc=f"stage {stage_index + 1} epoch {epoch}/{args.epochs}",
                       disable=not (args.progress and main), dynamic_ncols=True)
            started, seen = time.perf_counter(), 0
            for step in bar:
                indices = order[step * args.batch_size:(step + 1) * args.batch_size]
                loss = self._step(model, optimizer, scheduler, loss_config, indices)
                seen += len(indices)
                running = loss if running is None else 0.9 * running + 0.1 * loss
                bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{seen / (time.perf_counter() - started):.1f}")
                self.global_step += 1
                if args.save_every_steps and self.global_step % args.save_every_steps == 0:
                    self._save_state(optimizer, scheduler, (stage_index, epoch, step + 1), order, running)
                if self.global_step == self.stop_after_steps:
                    os.kill(os.getpid(), signal.SIGKILL)
            unwrapped = self.accelerator.unwrap_model(model)
            outputs = collect_layer_outputs(unwrapped, self.dev, args.eval_batch_size, args.progress and main)
            score, rows = self._score(outputs, stage.select_by)
            record = {"stage": stage_index + 1, "epoch": epoch, "train_loss": running, "score": score,
                      "seconds": time.perf_counter() - started, "layer_metrics": rows}
            self.history.append(record)
            self.accelerator.print(
                f"stage {stage_index + 1} epoch {epoch}: loss {running:.4f}, dev {self.task.main_metric} by layer "
                + " ".join(f"{main_metric(self.task, r):.3f}" for r in rows) + f" (selection score {score:.4f})")
            if score > self.best_score:
                self.best_score = score
                self.best_state = copy.deepcopy(unwrapped.state_dict())
                self._save(calibrate_policies=False)
            self._save_state(optimizer, scheduler, (stage_index, epoch + 1, 0), [], None)
        self.model.load_state_dict(self.best_state)

    def _step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_config: LossConfig,
              indices: list[int]) -> float:
        """One optimizer step on a global batch, of which this process computes its share; the batch's mean loss."""
        own, weight = process_share(indices, self.accelerator.process_index, self.accelerator.num_processes)
        batch = Collator(self.model.tokenizer)([self.train_examples[i] for i in own])
        labels = batch.pop("labels").to(self.accelerator.device)
        # a process's stand-in row (weight 0) must not move the running-mean prototypes: label −1 is not counted
        prototype_labels = labels if weight else torch.full_like(labels, -1)
        output = model(**{k: v.to(self.accelerator.device) for k, v in batch.items()},
                       with_prototypes=self.recipe.prototypes, labels=prototype_labels)
        loss = weight * early_exit_loss(output.layers, labels, loss_config)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return self.accelerator.reduce(loss.detach(), "mean").item()

    def _save_state(self, optimizer: torch.optim.Optimizer, scheduler, position: tuple[int, int, int],
                    permutation: list[int], running_loss: float | None) -> None:
        """Write the training state; position: (stage, epoch, step) of the next batch to train."""
        rng = gather_object([capture_rng()])  # a collective: every process takes part, the main one writes
        if not self.accelerator.is_main_process:
            return
        stage, epoch, step = position
        state = TrainingState(
            run=self.run.to_dict() if self.run else {}, examples=len(self.train_examples), stage=stage, epoch=epoch,
            step=step, global_step=self.global_step, running_loss=running_loss, permutation=permutation,
            model=self.model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            best_score=self.best_score, best_model=self.best_state, history=self.history, rng=rng)
        save_training_state(state, self.args.output_dir)

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
        """Calibrate the recipe's criterion (and the others it supports) on the calibration split."""
        config = self.model.config
        grid = {"patience": self.args.pcee_patience, "lam": self.args.lam}
        calibration = collect_layer_outputs(self.model, self.calibration or self.dev, self.args.eval_batch_size)
        if self.task.is_regression:
            criteria, default = ("regression-patience",), "regression-patience"
        else:
            default = self.recipe.criterion
            criteria = tuple(c for c in CLASSIFICATION_CRITERIA if self.recipe.prototypes or c not in ("edr", "dr"))
        config.calibration = calibrated_table(criteria, calibration, dev, self.task, **grid)
        try:
            config.policy = calibrate(default, calibration, self.task, self.args.target_speedup, **grid).to_dict()
        except PolicyError as exc:
            config.policy = fastest_policy(default, calibration, **grid).to_dict()
            # the range in exc ends at the fastest speed-up (rounded down): no second, differently rounded number
            self.accelerator.print(f"warning: {exc}; the default exit policy is the fastest reachable one")


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


def resume(output_dir: str | Path, data_dir: str | None = None, progress: bool | None = None) -> TrainResult:
    """Continue a stopped run from <output_dir>/training_state, with the arguments it was started with.

    It ends with the weights the uninterrupted run would have reached. data_dir: where a GLUE task's data lies
    now, if it moved. progress: show progress bars (None: as the run did).
    """
    state = load_training_state(output_dir)
    if not state.run:
        raise CheckpointError(f"the training state in {output_dir} was saved by a Trainer driven directly; "
                              "continue it with Trainer(...).train(load_training_state(...))")
    try:
        run = RunSpec.from_dict(state.run)
    except (TypeError, De3bertError) as exc:
        raise CheckpointError(f"{state_path(output_dir)} holds arguments this de3bert cannot use: {exc}") from exc
    args = replace(run.args, output_dir=str(output_dir), progress=run.args.progress if progress is None else progress)
    process_state().print(f"resuming the run in {output_dir} after optimizer step {state.global_step}")
    return _run(replace(run, args=args, data=with_location(run.data, data_dir, None)), state)


def _run(run: RunSpec, state: TrainingState | None = None) -> TrainResult:
    """Read the run's data, build the model, and train it from the start or from `state`."""
    args, processes = run.args, process_state()
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
