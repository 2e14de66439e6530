"""A real server on 127.0.0.1 (uvicorn in a thread, a random port) over a tiny random Mamba-2, and
`expected`: what `generate` gives for the same request, to compare the server's answers with."""
import pytest
import torch

pytest.importorskip("fastapi")

from mambakit import MambaConfig, MambaLMHeadModel  # noqa: E402
from mambakit.generation import generate  # noqa: E402
from mambakit.serving.server import ServerOptions, serve_in_background  # noqa: E402
from mambakit.tokenizer import ByteTokenizer  # noqa: E402

MODEL_NAME = "tiny"
MAX_PROMPT_TOKENS = 64
MAX_TOKENS = 10**6  # a "long" request never ends during a test: it is cancelled


def tiny_model() -> MambaLMHeadModel:
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=257, tie_embeddings=False,
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    model = MambaLMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: greedy and sampled tokens vary with the context
    return model.eval()


def running_server(model, chat_template=None, **options):
    """serve_in_background with the test limits: yields (base URL, scheduler)."""
    options = ServerOptions(name=MODEL_NAME, port=0, max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens=MAX_TOKENS,
                            drain_timeout=1, log_level="warning", **options)
    return serve_in_background(model, ByteTokenizer(), options, chat_template)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    """The base URL of a server with the default options, shared by a module's tests."""
    with running_server(model, max_batch=16) as (url, _):
        yield url


def expected(model, prompts, max_tokens, seed=0, ignore_eos=False, **sampling):
    """generate()'s answers for `prompts` (token-id lists) in one call, with the server's defaults mapped as
    it maps them (OpenAI's: sampling with temperature 1, top_p 1, no top-k). max_tokens: an int or one per
    prompt (a row's first k tokens do not depend on its budget); seed: an int (row b: seed + b) or one per
    prompt. Returns (texts, new-token counts, finish reasons: "stop" when the answer ends on the end-of-text
    token, even as its last allowed token, else "length")."""
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **sampling}
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else max_tokens
    out = generate(model, prompts, max_new_tokens=max(budgets), seed=seed, return_dict_in_generate=True,
                   eos_token_id=[] if ignore_eos else None, tokenizer=ByteTokenizer(), **sampling)
    tokenizer = ByteTokenizer()
    news = [seq[len(p):len(p) + k] for seq, p, k in zip(out.sequences, prompts, budgets)]
    ended = [len(new) < k or (not ignore_eos and int(new[-1]) == tokenizer.eos_token_id)
             for new, k in zip(news, budgets)]
    return ([tokenizer.decode(new) for new in news], [len(new) for new in news],
            ["stop" if end else "length" for end in ended])
