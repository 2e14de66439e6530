"""Generation: the inference cache, sampling, `generate`, streaming text and teacher-forced scoring."""
from mambakit.generation.cache import InferenceCache, InferenceParams
from mambakit.generation.generate import GenerationOutput, Step, decode_step, generate, iterate_tokens, prefill
from mambakit.generation.sampling import SamplingConfig, sample
from mambakit.generation.score import TokenScores, log_likelihood
from mambakit.generation.stream import TextStream, stream

__all__ = [
    "GenerationOutput", "InferenceCache", "InferenceParams", "SamplingConfig", "Step", "TextStream", "TokenScores",
    "decode_step", "generate", "iterate_tokens", "log_likelihood", "prefill", "sample", "stream",
]
