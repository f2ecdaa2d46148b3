"""EarlyExitModel: a backbone with an exit head on every layer, saved and loaded the Hugging Face way."""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from de3bert.atomic import replace_directory
from de3bert.devices import DTYPES, resolve_device, resolve_precision
from de3bert.errors import CheckpointError
from de3bert.model.backbones import Backbone, LayerContext, PretrainedBackbone, backbone_from_config, count_parameters
from de3bert.model.card import write_model_card
from de3bert.model.config import (FORMAT_VERSION, WEIGHTS_NAME, EarlyExitConfig, ExitHeadConfig, load_tokenizer,
                                  read_config, write_config)
from de3bert.model.heads import DISTANCES, POOLINGS, ExitHead, HeadOutput, HeadReads


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
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.heads[0].classifier.weight.device

    # The layer-by-layer interface the early-exit engine steps through (exits.runners.ExitRunner).

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids (moved to the model's device; the hidden states stay there)."""
        device = self.device
        return self.backbone.embed(input_ids.to(device), None if token_type_ids is None else token_type_ids.to(device))

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> LayerContext:
        """What every layer of a compute chunk reads besides its hidden states (attention mask, position bias)."""
        return self.backbone.context(hidden, attention_mask)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: LayerContext,
                  reads: HeadReads | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Hidden states after layer ``index`` (0-based) and, unless reads is None, its exit head's output (with the
        prototypical network only where reads asks for it)."""
        hidden = self.backbone.run_layer(index, hidden, context)
        if reads is None:
            return hidden, None
        return hidden, self.heads[index](hidden, attention_mask, with_prototypes=reads.prototypes)

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, reads: HeadReads = HeadReads(True)) -> list[HeadOutput]:
        """Every exit head's output for a batch (no early stop), the prototypical networks where reads asks."""
        device = self.device
        return self(input_ids.to(device), attention_mask.to(device),
                    None if token_type_ids is None else token_type_ids.to(device), with_prototypes=reads.prototypes).layers

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
        pretrained = PretrainedBackbone.find(backbone_name)
        backbone, tokenizer = pretrained.load()
        heads = heads or ExitHeadConfig()
        if heads.pooling is None:
            heads = replace(heads, pooling=pretrained.pooling)
        config = EarlyExitConfig(
            backbone=backbone.config.to_dict(), backbone_name=backbone_name, task=task, labels=list(labels),
            heads=heads, max_length=max_length, label_names=list(label_names or []),
        )
        model = cls(config, backbone, tokenizer)
        model.init_heads(pretrained.pooler_state())
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
        write_config(self.config, staging)
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


def plain_classifier(model: EarlyExitModel) -> nn.Module:
    """The stock Hugging Face sequence-classification model of the same backbone, with its weights (its classifier
    is freshly initialized): what a user would deploy without early exiting, the reference of every speed-up."""
    backbone = dict(model.config.backbone)
    config = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
    config.num_labels = model.config.num_labels
    plain = AutoModelForSequenceClassification.from_config(config)
    plain.base_model.load_state_dict(model.backbone.encoder.state_dict(), strict=False)
    return plain.eval()
