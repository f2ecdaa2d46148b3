"""A checkpoint's configuration: exit heads, task, labels and calibrated policy, as config.json holds it.

A checkpoint is a folder: config.json (the Hugging Face backbone config, label names as `id2label` /
`label2id`, and a "de3bert" section with everything else), model.safetensors, tokenizer files and a
model card README.md. An exported folder (`de3bert export`) holds the same config.json with an added
"onnx" section.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from de3bert.atomic import write_file
from de3bert.data.tasks import default_label_names
from de3bert.digests import files_digest
from de3bert.errors import CheckpointError
from de3bert.knobs import knob
from de3bert.model.heads import DISTANCES, POOLINGS
from de3bert.model.prototypes import PROTOTYPE_KINDS

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ExitHeadConfig:
    """Shape of the exit heads (the help of each field says what it is)."""

    prototype_dim: int | None = knob(None, "dimension d of the prototypes' metric space (unset: the backbone's hidden "
                                           "size; 0: no prototypical network, as PABEE and DeeBERT heads and "
                                           "regression)")
    distance: str = knob("sqeuclidean", "prototype distance: squared Euclidean (the paper's) or 1 − cosine",
                         choices=DISTANCES)
    dropout: float = knob(0.1, "dropout in the exit heads, between pooler and classifier", flag="--head-dropout")
    pooling: str | None = knob(None, "what each exit head reads from its layer: the [CLS] state (the paper) or the "
                                     "mean over tokens (unset: the backbone's own pretrained pooling, mean for "
                                     "minilm-l6 and mpnet-base)", choices=POOLINGS)
    prototypes: str = knob("ema", "class prototypes: running means of each class's embeddings, updated in training "
                                  "(ema, the paper's) or parameters trained by gradient descent (learned)",
                           choices=PROTOTYPE_KINDS)
    prototype_momentum: float = knob(0.1, "γ of the running means: P ← (1 − γ)·P + γ·(batch mean of the class)")
    final_prototypes: bool = knob(False, "whether the last layer carries a prototypical network too; no indicator "
                                         "reads it (the last layer always exits), so new models have none, and "
                                         "checkpoints written before it was dropped load as they were", cli=False)

    def __post_init__(self) -> None:
        if self.prototypes not in PROTOTYPE_KINDS:
            raise CheckpointError(f"unknown prototype kind '{self.prototypes}'; choose one of "
                                  f"{', '.join(PROTOTYPE_KINDS)}")
        if not 0.0 < self.prototype_momentum <= 1.0:
            raise CheckpointError(f"prototype momentum γ must lie in (0, 1], got {self.prototype_momentum}")


# What the head settings of a checkpoint written before a setting existed mean: learned prototypes on every layer.
LEGACY_HEADS = {"prototypes": "learned", "final_prototypes": True}


@dataclass
class EarlyExitConfig:
    """Everything needed to rebuild a checkpoint: backbone, heads, task and the calibrated policy.

    backbone: the backbone's Hugging Face config as a dict. backbone_name: where it came from.
    labels: the task's label values as the data writes them, in index order (empty for regression).
    label_names: the readable name of each label, what predictions say (config.json holds them as the
        Hugging Face `id2label` / `label2id`); empty: derived from the task (GLUE names, else the labels).
    policy: the default exit policy (ExitPolicy as a dict), calibrated after training.
    policy_selection: how that policy's criterion was chosen (exits.calibration.choose_policy): the calibration
        metric of every criterion at the target speed-up, the winner, whether it was forced, and a sentence saying so.
    calibration: rows of the calibrated trade-off table (criterion, target and measured speed-ups).
    calibrated_speedup: what the default policy was calibrated to deliver: the target layer speed-up, the speed-up
        on the calibration inputs with its bootstrap interval, their number and where they came from.
    calibration_history: what `de3bert calibrate` replaced, oldest first: each entry the earlier policy, calibrated
        speed-up and table, and when and on what they were replaced.
    training: the training arguments and results, for the model card.
    """

    backbone: dict
    backbone_name: str
    task: str
    labels: list[str]
    heads: ExitHeadConfig = field(default_factory=ExitHeadConfig)
    max_length: int = 128
    policy: dict | None = None
    policy_selection: dict = field(default_factory=dict)
    calibration: list[dict] = field(default_factory=list)
    calibrated_speedup: dict = field(default_factory=dict)
    calibration_history: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label_names = list(self.label_names or default_label_names(self.task, tuple(self.labels)))
        if len(self.label_names) != len(self.labels) or len(set(self.label_names)) != len(self.label_names):
            raise CheckpointError(f"label names {self.label_names} do not name the labels {self.labels} one each")

    @property
    def num_labels(self) -> int:
        """Output width of each classifier (1 for regression)."""
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts a score rather than a class."""
        return not self.labels

    def to_dict(self) -> dict:
        """JSON-ready form (what config.json holds): label names as the Hugging Face id2label / label2id."""
        body = asdict(self)
        names = body.pop("label_names")
        return {"id2label": {str(i): name for i, name in enumerate(names)},
                "label2id": {name: i for i, name in enumerate(names)}, "de3bert": body}

    @classmethod
    def from_dict(cls, data: dict) -> EarlyExitConfig:
        """Inverse of to_dict; a config without id2label (older checkpoints) gets names derived from its task."""
        body = dict(data["de3bert"])
        body["heads"] = ExitHeadConfig(**(LEGACY_HEADS | body.get("heads", {})))
        # calibrated rows written before every JSON named the criterion "criterion" named it "policy"
        body["calibration"] = [{("criterion" if key == "policy" else key): value for key, value in row.items()}
                               for row in body.get("calibration", [])]
        id2label = data.get("id2label") or {}
        return cls(**body, label_names=[id2label[key] for key in sorted(id2label, key=int)])


def read_config(directory: Path) -> EarlyExitConfig:
    """The EarlyExitConfig of a checkpoint directory, with errors that say what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist or is not a directory")
    path = directory / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory} is not a de3bert checkpoint: it has no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "de3bert" not in data:
        raise CheckpointError(
            f"{directory} is not a de3bert checkpoint: its {CONFIG_NAME} has no 'de3bert' section "
            "(a plain Hugging Face model? pass it as --model to `de3bert train` instead)"
        )
    version = data["de3bert"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has format version {version}; this de3bert reads version {FORMAT_VERSION}"
        )
    try:
        return EarlyExitConfig.from_dict(data)
    except (TypeError, ValueError) as exc:  # a field this de3bert does not know, or id2label keys that are not ids
        raise CheckpointError(f"{path} has an unexpected de3bert section or id2label: {exc}") from exc


def write_config(config: EarlyExitConfig, directory: Path, extra: dict | None = None) -> None:
    """Write a folder's config.json (with `extra` top-level sections, e.g. an export's), atomically: a reader, or a
    process killed mid-write, sees the old file or the new one."""
    text = json.dumps(config.to_dict() | (extra or {}), indent=2, default=str)
    write_file(Path(directory) / CONFIG_NAME, lambda handle: handle.write(text.encode()))


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint (or export) folder."""
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} has no usable tokenizer files: {exc}") from exc


def checkpoint_digest(directory: Path) -> str:
    """SHA-256 of a checkpoint's weights (its model.safetensors)."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS_NAME}")
    return files_digest([weights])
