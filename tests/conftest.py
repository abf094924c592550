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
