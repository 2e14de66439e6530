"""The chunked linear + cross-entropy equals F.cross_entropy(hidden @ weight.T) in value and gradients,
with ignored tokens, any chunking, fp32, bf16 and autocast, and never builds a (tokens, vocab) tensor."""
import pytest
import torch
import torch.nn.functional as F

from mambakit.bench.common import LargestTensor, rel_err
from mambakit.ops import linear_cross_entropy


def make(tokens, d_model, vocab, dtype=torch.float32, device="cpu", ignored=0.2):
    hidden = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, d_model, device=device) / d_model**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < ignored] = -100
    return hidden, weight, labels


def value_and_grads(loss_fn, hidden, weight, labels, scale, **kwargs):
    """loss and the gradients of scale * loss (the trainer scales by 1 / accumulation steps)."""
    loss = loss_fn(hidden, weight, labels, **kwargs)
    grads = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss.detach(), grads


def plain(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_plain_cross_entropy_fp32(chunk_size, reduction):
    hidden, weight, labels = make(53, 24, 97)
    scale = torch.rand(()).item() + 0.5
    loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, scale, chunk_size=chunk_size,
                                  reduction=reduction)
    ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, scale, reduction=reduction)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_chunk_loss_matches_plain_cross_entropy(dtype, tol):
    """The Triton chunk loss (the CPU interpreter here) over a vocabulary wider than its block, ragged chunks."""
    from mambakit.ops.linear_cross_entropy import triton_softmax_ce

    vocab = triton_softmax_ce.BLOCK_V + 1 + int(torch.randint(0, 300, ()))
    hidden, weight, labels = make(21, 16, vocab, dtype=dtype)
    loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, 1.0, chunk_size=8, backend="triton")
    ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, 1.0)
    assert rel_err(loss, ref_loss) < tol
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < tol


def test_triton_chunk_loss_equals_the_torch_ops_on_masked_logits():
    """Both chunk losses on logits with -inf entries (masked vocabulary) and large magnitudes: same loss and
    gradient, finite, the gradient rows summing to zero."""
    from mambakit.ops.linear_cross_entropy import chunked, triton_softmax_ce

    rows, vocab = 6, 3000
    logits = torch.randn(rows, vocab) * 30
    logits[torch.rand(rows, vocab) < 0.3] = float("-inf")
    targets = torch.randint(0, vocab, (rows,))
    logits[torch.arange(rows), targets] = torch.randn(rows) * 30  # the target itself is never masked
    weights = torch.rand(rows)
    ref_loss, ref_grad = chunked.softmax_cross_entropy(logits.clone(), targets, weights, True)
    loss, grad = triton_softmax_ce.softmax_cross_entropy(logits.clone(), targets, weights, True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5
    assert grad.sum(dim=1).abs().max() < 1e-4


def test_other_ignore_index():
    hidden, weight, labels = make(40, 16, 31, ignored=0.0)
    labels[::3] = 5  # a real class used as the ignore index
    loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, 1.0, ignore_index=5, chunk_size=9)
    ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, 1.0, ignore_index=5)
    assert rel_err(loss, ref_loss) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    assert grads[0][::3].abs().max() == 0  # ignored tokens get no gradient


def test_matches_plain_cross_entropy_bf16():
    hidden, weight, labels = make(64, 32, 200, dtype=torch.bfloat16)
    loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, 1.0, chunk_size=16)
    ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, 1.0)
    assert rel_err(loss, ref_loss) < 1e-2
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 2e-2


def test_matches_plain_cross_entropy_under_autocast():
    """As in the trainer: bf16 autocast, fp32 weight (an fp32 parameter) and fp32 hidden states."""
    hidden, weight, labels = make(64, 32, 200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, 1.0, chunk_size=16)
        ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, 1.0)
    assert rel_err(loss, ref_loss) < 1e-2
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 2e-2


def test_never_builds_the_full_logits():
    tokens, vocab, chunk = 256, 300, 32
    hidden, weight, labels = make(tokens, 16, vocab)
    with LargestTensor() as spy:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        loss.backward()
    assert spy.largest_numel <= chunk * vocab
    with LargestTensor() as spy:
        plain(hidden, weight, labels).backward()
    assert spy.largest_numel >= tokens * vocab  # the property is one the plain path lacks


def test_no_gradients_without_grad_mode():
    hidden, weight, labels = make(20, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert not loss.requires_grad
    assert rel_err(loss, plain(hidden, weight, labels).detach()) < 1e-5


@pytest.mark.parametrize("change, error, message", [
    (lambda h, w, y: (h[0], w, y), ValueError, "hidden"),
    (lambda h, w, y: (h, w[:, :-1], y), ValueError, "weight"),
    (lambda h, w, y: (h, w, y[:-1]), ValueError, "labels"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "labels"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "hidden, weight"),
])
def test_bad_arguments(change, error, message):
    hidden, weight, labels = make(10, 8, 12)
    with pytest.raises(error, match=message):
        linear_cross_entropy(*change(hidden, weight, labels))


@pytest.mark.parametrize("options, message", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size"), (dict(reduction="none"), "reduction"),
])
def test_bad_options(options, message):
    hidden, weight, labels = make(10, 8, 12)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, labels, **options)


@pytest.mark.gpu
def test_matches_plain_cross_entropy_cuda_bf16_autocast():
    """A 130M-like head (vocab 50280) on 8K tokens: same loss and gradients within bf16 noise."""
    hidden, weight, labels = make(8192, 768, 50280, device="cuda", ignored=0.05)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = value_and_grads(linear_cross_entropy, hidden, weight, labels, 1.0, chunk_size=2048)
        ref_loss, ref_grads = value_and_grads(plain, hidden, weight, labels, 1.0)
    assert rel_err(loss, ref_loss) < 1e-2
    assert all(rel_err(g, r) < 2e-2 for g, r in zip(grads, ref_grads))


@pytest.mark.gpu
def test_peak_memory_is_a_fraction_of_the_plain_path_cuda():
    """8 x 2048 tokens, vocab 50280: the plain path's fp32 logits and their gradient are 3.3 GB each."""
    hidden, weight, labels = make(16384, 768, 50280, device="cuda", ignored=0.0)
    peaks = {}
    for name, fn in (("plain", plain), ("chunked", lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=2048))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["chunked"] < 0.25 * peaks["plain"], peaks
