"""Generation: the inference cache, sampling, `generate`, streaming text and teacher-forced scoring."""
from mambakit.generation.cache import InferenceCache, InferenceParams
from mambakit.generation.decoder import decode_step, release_decoders
from mambakit.generation.generate import GenerationOutput, Step, generate, iterate_tokens, prefill
from mambakit.generation.options import GenerationOptions
from mambakit.generation.sampling import SamplingConfig, sample
from mambakit.generation.score import TokenScores, log_likelihood
from mambakit.generation.stream import StopStringWatch, TextStream, stream

__all__ = [
    "GenerationOptions", "GenerationOutput", "InferenceCache", "InferenceParams", "SamplingConfig", "Step",
    "StopStringWatch", "TextStream", "TokenScores", "decode_step", "generate", "iterate_tokens", "log_likelihood",
    "prefill", "release_decoders", "sample", "stream",
]
