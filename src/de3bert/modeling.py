"""EarlyExitModel: a backbone with an exit head on every layer, saved and loaded the Hugging Face way."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from de3bert.atomic import replace_directory
from de3bert.backbones import Backbone, backbone_from_config, count_parameters, load_backbone, resolve_backbone
from de3bert.devices import DTYPES, resolve_device, resolve_precision
from de3bert.data.tasks import default_label_names
from de3bert.errors import CheckpointError
from de3bert.heads import DISTANCES, POOLINGS, ExitHead, HeadOutput
from de3bert.model_card import write_model_card
from de3bert.prototypes import PROTOTYPE_KINDS
from de3bert.runners import TorchRunner

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ExitHeadConfig:
    """Shape of the exit heads.

    prototype_dim: dimension d of the metric space; None = the backbone's hidden size, 0 = no
        prototypical network (PABEE/DeeBERT heads, regression).
    distance: "sqeuclidean" (DESIGN default) or "cosine".
    dropout: dropout between pooler and classifier.
    pooling: what each head reads from its layer — "cls" (the paper's [CLS] state) or "mean"
        (mean over tokens); None = the pooling the backbone was pretrained with (resolved when the
        model is built: sentence-embedding backbones such as minilm-l6 and mpnet-base use "mean").
    prototypes: "ema" — running averages of each class's embeddings, updated during training (the
        paper's mechanism) — or "learned" — parameters trained by gradient descent.
    prototype_momentum: γ of the running average P_k ← (1 − γ)·P_k + γ·(batch mean of class k).
    final_prototypes: whether the last layer carries a prototypical network too. No indicator reads it
        (the last layer always exits), so new models have none; checkpoints written before it was
        dropped have one and load as they were.
    """

    prototype_dim: int | None = None
    distance: str = "sqeuclidean"
    dropout: float = 0.1
    pooling: str | None = None
    prototypes: str = "ema"
    prototype_momentum: float = 0.1
    final_prototypes: bool = False

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
    policy_selection: how that policy's criterion was chosen (evaluation.choose_policy): the calibration metric
        of every criterion at the target speed-up, the winner, and whether it was forced.
    calibration: rows of the calibrated trade-off table (policy, target and measured speed-ups).
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
        id2label = data.get("id2label") or {}
        return cls(**body, label_names=[id2label[key] for key in sorted(id2label, key=int)])


@dataclass
class EarlyExitOutput:
    """All exit heads' outputs for a batch, layer 1 first; loss when labels were given."""

    layers: list[HeadOutput | None]
    loss: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """Stacked logits (M, B, C)."""
        return torch.stack([layer.logits for layer in self.layers])


class EarlyExitModel(nn.Module):
    """Backbone + one ExitHead per layer; the last head is the model's final classifier."""

    def __init__(self, config: EarlyExitConfig, backbone: Backbone, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        if config.heads.distance not in DISTANCES:
            raise CheckpointError(f"unknown distance '{config.heads.distance}'; choose one of {DISTANCES}")
        if config.heads.pooling not in (None, *POOLINGS):
            raise CheckpointError(f"unknown pooling '{config.heads.pooling}'; choose one of {POOLINGS}")
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden, heads = backbone.hidden_size, config.heads
        prototype_dim = 0 if config.is_regression or heads.prototype_dim == 0 else heads.prototype_dim or hidden
        last = backbone.num_layers - 1
        self.heads = nn.ModuleList(
            ExitHead(hidden, config.num_labels, prototype_dim if index < last or heads.final_prototypes else 0,
                     heads.distance, heads.dropout, heads.pooling or "cls", heads.prototypes, heads.prototype_momentum)
            for index in range(backbone.num_layers)
        )

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""
        return self.backbone.num_layers

    @property
    def has_prototypes(self) -> bool:
        """Whether the internal exit heads carry prototypical networks (the prototype criteria read them)."""
        return self.heads[0].has_prototypes

    @property
    def runner(self) -> TorchRunner:
        """The engine's runner for this model: PyTorch, in eval mode."""
        return TorchRunner(self)

    @classmethod
    def from_backbone(
        cls,
        backbone_name: str,
        task: str,
        labels: list[str],
        heads: ExitHeadConfig | None = None,
        max_length: int = 128,
        label_names: list[str] | None = None,
    ) -> EarlyExitModel:
        """New model on a pretrained backbone with freshly initialized exit heads (label_names: what predictions
        call each label; None: derived from the task)."""
        backbone, tokenizer = load_backbone(backbone_name)
        pretrained_pooler = _pretrained_pooler_state(backbone_name)
        heads = heads or ExitHeadConfig()
        if heads.pooling is None:
            heads = replace(heads, pooling=pretrained_pooling(backbone_name))
        config = EarlyExitConfig(
            backbone=backbone.config.to_dict(), backbone_name=backbone_name, task=task, labels=list(labels),
            heads=heads, max_length=max_length, label_names=list(label_names or []),
        )
        model = cls(config, backbone, tokenizer)
        model.init_heads(pretrained_pooler)
        return model

    def init_heads(self, pooler_state: dict[str, torch.Tensor] | None = None) -> None:
        """Initialize the exit heads (normal(0, initializer_range)); poolers from a pretrained one if given."""
        std = getattr(self.backbone.config, "initializer_range", 0.02)
        for head in self.heads:
            for module in head.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    nn.init.zeros_(module.bias)
            if isinstance(head.prototypes, nn.Parameter):  # running-mean prototypes start from their first batch
                nn.init.normal_(head.prototypes, std=std)
            if pooler_state is not None:
                head.pooler.load_state_dict(pooler_state)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        with_prototypes: bool = True,
        labels: torch.Tensor | None = None,
        exits: Collection[int] | None = None,
    ) -> EarlyExitOutput:
        """Every exit head's output (the training and offline-evaluation path: no early stop).

        labels: in training mode they update running-mean prototypes (rows labelled −1 do not count).
        exits: 0-based indices of the heads to compute (None: all); the others' outputs are None.
        """
        hidden = self.backbone.embed(input_ids, token_type_ids)
        context = self.backbone.context(hidden, attention_mask)
        layers = []
        for index, head in enumerate(self.heads):
            hidden = self.backbone.run_layer(index, hidden, context)
            computed = exits is None or index in exits
            layers.append(head(hidden, attention_mask, with_prototypes=with_prototypes, labels=labels)
                          if computed else None)
        return EarlyExitOutput(layers)

    def overhead(self) -> dict[str, int | float]:
        """Parameter counts of backbone, classifiers and prototypical networks (DESIGN §1)."""
        backbone = count_parameters(self.backbone)
        classifiers = sum(count_parameters(h.pooler) + count_parameters(h.classifier) for h in self.heads)
        with_prototypes = [h for h in self.heads if h.has_prototypes]
        prototypes = sum(count_parameters(h.projection) + h.prototypes.numel() for h in with_prototypes)
        per_layer = prototypes // max(1, len(with_prototypes))
        return {
            "backbone_parameters": backbone,
            "classifier_parameters": classifiers,
            "prototype_parameters": prototypes,
            "prototype_parameters_per_layer": per_layer,
            # the last layer always exits, so no indicator reads a prototypical network there
            "prototype_parameters_saved_on_last_layer": per_layer if with_prototypes and not self.heads[-1].has_prototypes else 0,
            "overhead_fraction": (classifiers + prototypes) / backbone,
        }

    def save_pretrained(self, directory: str | Path, keep: Sequence[str] = ()) -> Path:
        """Write config.json, model.safetensors, tokenizer files and a model card, atomically.

        keep: sub-directories of an existing checkpoint directory to carry over (a run's training state).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "de3bert_format": str(FORMAT_VERSION)})
        (staging / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, default=str))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(staging)
        write_model_card(self.config, staging)
        replace_directory(staging, directory, keep)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, expected_labels: list[str] | None = None,
                        device: str | torch.device | None = None, precision: str = "fp32") -> EarlyExitModel:
        """Load a checkpoint directory written by save_pretrained, onto `device` (default: the CPU; "auto", "cpu",
        "cuda", "cuda:N") with weights in `precision` ("fp32", "bf16", "fp16", or "auto": fp32 on the CPU, bf16 on
        a GPU)."""
        target = resolve_device(device or "cpu")
        dtype = DTYPES[resolve_precision(precision, target)]
        directory = Path(directory)
        config = read_config(directory)
        if expected_labels is not None and list(expected_labels) != config.labels:
            raise CheckpointError(
                f"checkpoint {directory} was trained for labels {config.labels or '(regression)'} of task "
                f"'{config.task}', but the data has labels {list(expected_labels) or '(regression)'}"
            )
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS_NAME}")
        model = cls(config, backbone_from_config(config.backbone), load_tokenizer(directory))
        try:
            state = load_file(weights)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{weights} cannot be read: {exc}") from exc
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or reshaped:
            raise CheckpointError(
                f"{weights} does not fit the model described by its config.json "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {reshaped[:3]})"
            )
        model.load_state_dict(state)
        return model.to(device=target, dtype=dtype).eval()  # integer and boolean buffers keep their types


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


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint (or export) folder."""
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} has no usable tokenizer files: {exc}") from exc


def pretrained_pooling(backbone_name: str) -> str:
    """The pooling a backbone was pretrained with: "mean" for sentence-transformers models that
    declare mean pooling (1_Pooling/config.json), else "cls"."""
    pooling_config = Path(resolve_backbone(backbone_name)) / "1_Pooling" / "config.json"
    if pooling_config.exists() and json.loads(pooling_config.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def _pretrained_pooler_state(backbone_name: str) -> dict[str, torch.Tensor] | None:
    """The pretrained pooler (dense) weights of a backbone, when its checkpoint has them."""
    weights = Path(resolve_backbone(backbone_name)) / WEIGHTS_NAME
    if not weights.exists():
        return None
    state = load_file(weights)
    prefix = next((p for p in ("pooler.dense.", "bert.pooler.dense.", "mpnet.pooler.dense.") if p + "weight" in state), None)
    if prefix is None:
        return None
    return {"weight": state[prefix + "weight"], "bias": state[prefix + "bias"]}
