"""Test setup: Triton runs in its CPU interpreter when there is no GPU; every test gets a fresh
random seed, printed when it fails so that the failure can be replayed (MAMBAKIT_TEST_SEED=...)."""
import os
import random

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("MAMBAKIT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with MAMBAKIT_TEST_SEED={seeds[0]}"))
