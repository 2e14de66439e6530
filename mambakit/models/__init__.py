"""Language models: `MambaConfig`, `MambaLMHeadModel`, checkpoints in the official and `transformers` layouts."""
from mambakit.models.checkpoint import CheckpointError
from mambakit.models.config import MambaConfig
from mambakit.models.lm import CausalLMOutput, MambaLMHeadModel, MixerModel

__all__ = ["CausalLMOutput", "CheckpointError", "MambaConfig", "MambaLMHeadModel", "MixerModel"]
