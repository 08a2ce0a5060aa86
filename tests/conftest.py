"""Shared fixtures. The real photos and clips live in ../shared/data (read-only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: the repository expects shared/data beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """An empty project folder (a runner.toml marks the project root)."""
    root = tmp_path / "proj"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("# character-runner project\n")
    return root


@pytest.fixture(autouse=True)
def _isolated_model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny built-in models are cached per test session, never in the user's home."""
    cache = tmp_path_factory.getbasetemp() / "model-cache"
    monkeypatch.setenv("CHARACTER_RUNNER_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test (use with ``pytestmark = pytest.mark.usefixtures(...)``): the
    tiny models are overhead-bound, and on a shared 2-core machine two OpenMP threads spin against
    each other and run 10-50x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_photos(src: Path, dest: Path, names: list[str] | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if names is None or p.name in names:
            shutil.copy2(p, dest / p.name)
    return dest
