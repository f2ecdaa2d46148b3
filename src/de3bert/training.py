"""Training: the arguments dataclass, the recipes (de3, pabee, deebert) and the Trainer loop."""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from de3bert.data import (Collator, EncodedExample, TaskSpec, encode_examples, load_split, main_metric, split_off,
                          subsample)
from de3bert.errors import De3bertError, PolicyError
from de3bert.evaluation import (CLASSIFICATION_CRITERIA, LayerOutputs, calibrate, calibrated_table, fastest_policy,
                                collect_layer_outputs, layer_metrics)
from de3bert.losses import LossConfig, early_exit_loss
from de3bert.modeling import EarlyExitModel, ExitHeadConfig


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
    """Training batch size."""
    eval_batch_size: int = 64
    """Batch size for evaluation."""
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
    max_length: int = 128
    """Maximum tokens per input; longer inputs are truncated (and counted)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise De3bertError(f"unknown recipe '{self.recipe}'; choose one of {', '.join(RECIPES)}")
        if self.epochs < 1:
            raise De3bertError(f"epochs must be at least 1, got {self.epochs}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise De3bertError(f"calibration_fraction must lie in [0, 1), got {self.calibration_fraction}")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


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


def stage_loss(recipe: Recipe, stage: Stage, args: TrainingArguments) -> LossConfig:
    """The stage's loss with the run's α/β overrides applied (prototype recipes only)."""
    if not recipe.prototypes:
        return stage.loss
    return LossConfig(stage.loss.alpha if args.alpha is None else args.alpha,
                      stage.loss.beta if args.beta is None else args.beta, stage.loss.layer_weighting)


class Trainer:
    """Trains an EarlyExitModel with a recipe, evaluates every epoch, keeps the best, calibrates."""

    def __init__(self, model: EarlyExitModel, args: TrainingArguments, task: TaskSpec,
                 train: list[EncodedExample], dev: list[EncodedExample], calibration: list[EncodedExample]):
        self.model, self.args, self.task = model, args, task
        self.train_examples, self.dev, self.calibration = train, dev, calibration
        self.recipe = RECIPES[args.recipe]
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.history: list[dict] = []

    def _set_trainable(self, stage: Stage) -> list[torch.nn.Parameter]:
        last = len(self.model.heads) - 1
        for p in self.model.backbone.parameters():
            p.requires_grad_(stage.train_backbone)
        for index, head in enumerate(self.model.heads):
            on = stage.train_heads == "all" or (stage.train_heads == "final") == (index == last)
            for p in head.parameters():
                p.requires_grad_(on)
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

    def train(self) -> TrainResult:
        """Run every stage of the recipe; the best epoch's weights end up in the model and on disk."""
        args = self.args
        seed_everything(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        loader = DataLoader(self.train_examples, batch_size=args.batch_size, shuffle=True, generator=generator,
                            collate_fn=Collator(self.model.tokenizer))
        best_score = float("nan")
        for stage_index, stage in enumerate(self.recipe.stages):
            self._set_trainable(stage)
            loss_config = stage_loss(self.recipe, stage, args)
            optimizer = self._optimizer()
            steps = args.epochs * math.ceil(len(self.train_examples) / args.batch_size)
            scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
            model, optimizer, stage_loader, scheduler = self.accelerator.prepare(self.model, optimizer, loader, scheduler)
            best_score, best_state = -math.inf, None
            for epoch in range(1, args.epochs + 1):
                model.train()
                bar = tqdm(stage_loader, desc=f"stage {stage_index + 1} epoch {epoch}/{args.epochs}",
                           disable=not args.progress, dynamic_ncols=True)
                started, seen, running = time.perf_counter(), 0, None
                for batch in bar:
                    labels = batch.pop("labels")
                    output = model(**batch, with_prototypes=self.recipe.prototypes)
                    loss = early_exit_loss(output.layers, labels, loss_config)
                    self.accelerator.backward(loss)
                    self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    seen += labels.shape[0]
                    running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                    bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{seen / (time.perf_counter() - started):.1f}")
                unwrapped = self.accelerator.unwrap_model(model)
                outputs = collect_layer_outputs(unwrapped, self.dev, args.eval_batch_size, args.progress)
                score, rows = self._score(outputs, stage.select_by)
                record = {"stage": stage_index + 1, "epoch": epoch, "train_loss": running, "score": score,
                          "seconds": time.perf_counter() - started, "layer_metrics": rows}
                self.history.append(record)
                self.accelerator.print(
                    f"stage {stage_index + 1} epoch {epoch}: loss {running:.4f}, dev {self.task.main_metric} by layer "
                    + " ".join(f"{main_metric(self.task, r):.3f}" for r in rows) + f" (selection score {score:.4f})")
                if score > best_score:
                    best_score = score
                    best_state = copy.deepcopy(unwrapped.state_dict())
                    self._save(calibrate_policies=False)
            self.model.load_state_dict(best_state)
        self._save(calibrate_policies=True)
        return TrainResult(Path(args.output_dir), self.history, best_score)

    def _save(self, calibrate_policies: bool) -> None:
        """Write the checkpoint; at the end of training, with per-layer metrics and calibrated policies."""
        if not self.accelerator.is_main_process:
            return
        config = self.model.config
        config.training = {**self.args.to_dict(), "train_examples": len(self.train_examples),
                           "calibration_examples": len(self.calibration), "dev_examples": len(self.dev),
                           "history": [{k: v for k, v in h.items() if k != "layer_metrics"} for h in self.history]}
        if calibrate_policies:
            dev = collect_layer_outputs(self.model, self.dev, self.args.eval_batch_size, self.args.progress)
            config.training["layer_metrics"] = layer_metrics(dev, self.task)
            self._calibrate(dev)
        self.model.save_pretrained(self.args.output_dir)
        (Path(self.args.output_dir) / "training_history.json").write_text(json.dumps(self.history, indent=2))

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
            policy, speedup = fastest_policy(default, calibration, **grid)
            config.policy = policy.to_dict()
            self.accelerator.print(f"warning: {exc}; the default exit policy is the fastest reachable one "
                                   f"({speedup:.2f}x)")


def train(task_name: str, backbone: str, args: TrainingArguments, data_dir: str | None = None,
          hub_dataset: str | None = None, heads: ExitHeadConfig | None = None) -> TrainResult:
    """The whole job: read the task's data, build the model on a backbone, train, calibrate, save."""
    task, train_examples = load_split(task_name, "train", data_dir, hub_dataset)
    _, dev_examples = load_split(task_name, "dev", data_dir, hub_dataset)
    if args.max_train_samples:
        train_examples = subsample(train_examples, args.max_train_samples, args.seed)
    calibration_examples, train_examples = split_off(train_examples, args.calibration_fraction, args.seed)
    recipe = RECIPES[args.recipe]
    heads = heads or ExitHeadConfig()
    if not recipe.prototypes:
        heads = replace(heads, prototype_dim=0)
    seed_everything(args.seed)
    model = EarlyExitModel.from_backbone(backbone, task.name, list(task.labels), heads, args.max_length)
    encoded = {}
    for split, examples in (("train", train_examples), ("calibration", calibration_examples), ("dev", dev_examples)):
        encoded[split] = encode_examples(model.tokenizer, examples, args.max_length)
        truncated = sum(e.truncated for e in encoded[split])
        if truncated:
            print(f"note: {truncated} of {len(examples)} {split} inputs were longer than {args.max_length} tokens "
                  "and were truncated")
    print(f"task {task.name}: {len(train_examples)} training, {len(calibration_examples)} calibration, "
          f"{len(dev_examples)} dev examples; backbone {backbone} ({model.num_layers} layers); recipe {args.recipe}")
    trainer = Trainer(model, args, task, encoded["train"], encoded["dev"], encoded["calibration"])
    return trainer.train()
