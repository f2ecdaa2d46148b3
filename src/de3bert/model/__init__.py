"""The model: backbones driven layer by layer, exit heads with prototypes, the config and the EarlyExitModel."""

from de3bert.model.backbones import Backbone, PretrainedBackbone, load_backbone, resolve_backbone
from de3bert.model.config import EarlyExitConfig, ExitHeadConfig, read_config
from de3bert.model.heads import ExitHead, HeadOutput, HeadReads
from de3bert.model.modeling import EarlyExitModel, EarlyExitOutput

__all__ = ["Backbone", "EarlyExitConfig", "EarlyExitModel", "EarlyExitOutput", "ExitHead", "ExitHeadConfig",
           "HeadOutput", "HeadReads", "PretrainedBackbone", "load_backbone", "read_config", "resolve_backbone"]
