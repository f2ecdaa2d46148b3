"""TrainingArguments: every knob of a training run, in one dataclass.

Each field carries its help text (and, where it has them, its choices and its command-line flag) in its
metadata, as Hugging Face's argument dataclasses do: the `de3bert train` flags are generated from these
fields, so names, defaults and help live here only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from de3bert.devices import PRECISIONS
from de3bert.errors import De3bertError
from de3bert.exits.criteria import CRITERIA
from de3bert.knobs import knob
from de3bert.training.recipes import RECIPES


@dataclass
class TrainingArguments:
    """Every knob of a training run."""

    output_dir: str = knob(help="folder of the best checkpoint (written atomically)", flag="--output")
    recipe: str = knob("de3", "training method: de3 (CE + α·prototype CE + β·DAR on every layer, layers weighted "
                              "by depth), pabee (depth-weighted CE) or deebert (two stages)", choices=tuple(RECIPES))
    epochs: int = knob(3, "epochs per stage")
    learning_rate: float = knob(5e-5, "peak AdamW learning rate of the backbone")
    head_learning_rate: float | None = knob(
        1e-3, "peak learning rate of the freshly initialized exit heads and prototypes (unset: the backbone's); "
              "shallow heads get a small share of the depth-weighted loss, and at the backbone's rate they barely learn")
    batch_size: int = knob(32, "training batch size, global: with several processes (torchrun) each computes an "
                               "equal share of every batch, so the optimizer steps and the results do not depend on "
                               "the number of processes")
    eval_batch_size: int = knob(64, "batch size for evaluation (per process; every process evaluates the whole "
                                    "dev set)")
    warmup_ratio: float = knob(0.1, "fraction of steps with linear warm-up, then linear decay to 0")
    weight_decay: float = knob(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    max_grad_norm: float = knob(1.0, "gradient clipping norm")
    seed: int = knob(42, "seed of initialization, data order, dropout and the held-out slices")
    alpha: float | None = knob(None, "prototype CE weight α (unset: the recipe's, 1 for de3; 0 switches it off)")
    beta: float | None = knob(None, "DAR weight β (unset: the recipe's, 1 for de3; 0 switches it off)")
    target_speedup: float = knob(2.0, "layer speed-up the checkpoint's own exit policy is calibrated to")
    lam: float = knob(1.0, "λ of the hybrid indicator EDR")
    pcee_patience: int = knob(2, "patience t of PCEE (entropy + patience) when it is calibrated")
    criterion: str | None = knob(None, "criterion of the default exit policy (unset: entropy at --target-speedup, "
                                       "unless another criterion beats it on the calibration slice by more than "
                                       "the paired bootstrap's noise)",
                                 choices=tuple(CRITERIA))
    max_train_samples: int | None = knob(None, "train on a fixed random subsample of this many examples")
    calibration_fraction: float = knob(0.1, "share of the training data held out to calibrate exit thresholds "
                                            "(0: calibrate on dev)")
    validation_fraction: float = knob(0.1, "share of the training data held out, stratified by class, to pick the "
                                           "best epoch when the data has no dev set of its own (a file without "
                                           "--validation-file, a dataset without a validation split)")
    max_length: int = knob(128, "maximum tokens per input; longer inputs are truncated (and counted)")
    save_every_steps: int = knob(200, "write the training state (for --resume) every this many optimizer steps and "
                                      "at every epoch end (0: at epoch ends only)")
    device: str = knob("auto", "where to train: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
                               "cuda:N; under several processes (torchrun) each trains on its own GPU")
    precision: str = knob("auto", "mixed precision of forward and backward: fp32, bf16, fp16 (CUDA only) or auto "
                                  "(fp32 on the CPU, bf16 on a GPU that has it); weights and optimizer state stay "
                                  "float32", choices=PRECISIONS)
    progress: bool = knob(True, "show progress bars")

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
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise De3bertError(f"unknown criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}")
        if self.criterion is not None and CRITERIA[self.criterion].reads_prototypes and not RECIPES[self.recipe].prototypes:
            raise De3bertError(f"criterion '{self.criterion}' reads prototypes, which recipe '{self.recipe}' does not "
                               "train; use --recipe de3")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)
