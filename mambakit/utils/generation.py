"""`mamba_ssm.utils.generation`'s public names, as mambakit provides them."""
from mambakit.generation import InferenceParams, generate


def decode(input_ids, model, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, **kwargs):
    """The official `decode(input_ids, model, max_length, ...)`: `generate(model, input_ids, max_length, ...)`,
    returning its `GenerationOutput` (sequences, scores) as the official one does."""
    kwargs.setdefault("return_dict_in_generate", True)
    return generate(model, input_ids, max_length, top_k, top_p, min_p, temperature, **kwargs)


__all__ = ["InferenceParams", "decode"]
