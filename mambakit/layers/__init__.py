"""nn.Modules with the official `mamba_ssm` names, arguments, parameter names and initialisation."""
from .attention import MHA, apply_rotary, rotary_cos_sin
from .block import Block
from .mamba import Mamba
from .mamba2 import Mamba2
from .mlp import GatedMLP

__all__ = ["Block", "GatedMLP", "MHA", "Mamba", "Mamba2", "apply_rotary", "rotary_cos_sin"]
