import pytest
import torch

from mambakit.cli import main


def test_bench_rejects_unknown_ops_by_name():
    with pytest.raises(SystemExit, match=r"--ops: expected names from .*got \['scan'\]"):
        main(["bench", "--ops", "scan"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so():
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        main(["bench", "--ops", "ssd"])
