"""generate(compile=True): the eager decode step through torch.compile (inductor's C++ kernels on the CPU)
gives the tokens of the plain eager step, greedy and seeded sampling, and one compilation serves later calls."""
import shutil

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                                reason="inductor's CPU kernels need a C++ compiler")


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_compiled_decode_equals_eager(layer):
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": layer, **(
        {"headdim": 8, "chunk_size": 8} if layer == "Mamba2" else {})}, rms_norm=True, fused_add_norm=True,
        residual_in_fp32=True)
    model = MambaLMHeadModel(config).eval()
    ids = torch.randint(0, 61, (2, 6))
    for sampling in ({}, {"top_k": 0, "temperature": 0.8, "seed": 3}):
        want = model.generate(ids, 14, **sampling)
        got = model.generate(ids, 14, compile=True, **sampling)
        assert torch.equal(got, want)
    with torch.compiler.set_stance("fail_on_recompile"):  # the kept decoder, compiled, is reused
        again = model.generate(ids, 14, compile=True)
    assert torch.equal(again, model.generate(ids, 14))


def test_one_compilation_serves_every_position_and_prompt_length():
    """The compiled step does not specialize on the cache's offset: a fresh process compiles one graph, and
    later calls with other prompt lengths reuse it. Its graph is one AOTAutograd's cache can keep (a later
    process then skips tracing it again)."""
    from torch._dynamo.utils import counters

    config = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": "Mamba2", "headdim": 8,
                                                                        "chunk_size": 8})
    model = MambaLMHeadModel(config).eval()
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 61, (1, 6))
    assert torch.equal(model.generate(ids, max_new_tokens=10, compile=True), model.generate(ids, max_new_tokens=10))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["aot_autograd"]["autograd_cache_bypass"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for length in (1, 3, 5):
            ids = torch.randint(0, 61, (1, length))
            want = model.generate(ids, max_new_tokens=10)
            assert torch.equal(model.generate(ids, max_new_tokens=10, compile=True), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_compiled_decode_of_a_prepacked_model_equals_eager(layer, dtype):
    """oneDNN's products on prepacked weights run inside the compiled step (one custom op each, no graph break)."""
    from torch._dynamo.utils import counters

    from mambakit import prepack
    from mambakit.prepacking import prepack_available

    if not prepack_available():
        pytest.skip("this torch build has no oneDNN linear ops")
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": layer, **(
        {"headdim": 8, "chunk_size": 8} if layer == "Mamba2" else {})}, rms_norm=True, fused_add_norm=True,
        residual_in_fp32=True)
    model = prepack(MambaLMHeadModel(config, dtype=dtype).eval())
    ids = torch.randint(0, 61, (3, 5))
    scored = dict(return_dict_in_generate=True, output_scores=True)
    want = model.generate(ids, 13, **scored)
    torch._dynamo.reset()
    counters.clear()  # this call's graph breaks alone
    got = model.generate(ids, 13, compile=True, **scored)
    if dtype == torch.float32:
        assert torch.equal(got.sequences, want.sequences)
    else:  # inductor rounds bf16 intermediates its own way (~0.005 here on logits of spread ~0.4)
        assert_greedy_agrees(got, want, atol=2e-2)
    assert not counters["graph_break"]  # the packed products run inside the compiled graph


@pytest.mark.parametrize("variant", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_compiled_batch_one_decode_streams_its_products_and_agrees_with_eager(layer, variant):
    """At batch 1 the compiled step's products run as rowwise_linear reductions (summed in another order than
    the eager products, so scores agree within rounding, not bit for bit)."""
    from mambakit import quantize

    config = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": layer, **(
        {"headdim": 8, "chunk_size": 8} if layer == "Mamba2" else {})}, rms_norm=True, fused_add_norm=True,
        residual_in_fp32=True)
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    model = MambaLMHeadModel(config, dtype=dtype).eval()
    if variant == "int8":
        quantize(model, "int8")
    ids = torch.randint(0, 61, (1, 5))
    scored = dict(return_dict_in_generate=True, output_scores=True)
    want = model.generate(ids, 13, **scored)
    got = model.generate(ids, 13, compile=True, **scored)
    assert_greedy_agrees(got, want, atol=1e-4 if variant == "float32" else 2e-2)


def assert_greedy_agrees(got, want, atol: float) -> None:
    """Two greedy decodes of one model agree up to rounding: each row's scores match within atol until its
    tokens part, and they part only at a step where the first decode's scores of the two tokens are within
    atol of each other (a near tie that rounding may break either way)."""
    prompt = want.sequences.shape[1] - len(want.scores)
    for row in range(want.sequences.shape[0]):
        for step, (mine, theirs) in enumerate(zip(got.scores, want.scores)):
            torch.testing.assert_close(mine[row], theirs[row], atol=atol, rtol=0)
            a, b = got.sequences[row, prompt + step], want.sequences[row, prompt + step]
            if a != b:
                assert (theirs[row, a] - theirs[row, b]).abs() <= atol, (row, step)
                break


def test_compile_must_be_a_bool():
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=11)).eval()
    with pytest.raises(ValueError, match="compile: expected True or False, got 'yes'"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 4, compile="yes")


def test_no_compiler_is_a_clear_error(monkeypatch):
    from mambakit.generation import decoder

    monkeypatch.setattr(decoder.shutil, "which", lambda name: None)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=11)).eval()
    with pytest.raises(FileNotFoundError, match=r"compile: .* need a C\+\+ compiler"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 6, compile=True)
