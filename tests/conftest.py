from pathlib import Path

import pytest
from tiny_models import FAMILIES, build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Timing ratios on one thread: on a shared, loaded machine, several intra-op threads spin against other
    processes and a single call can take 10x its CPU time, which says nothing about the code being timed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
