"Shared fixtures: the real Kvasir-SEG folder (skipped cleanly when absent) and small generated datasets."

import os
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# pytest-xdist (pyproject's addopts): each worker gets its share of the cores' threads. Workers with a full thread pool
# each wait on one another's cores (on 2 cores that is many times slower); the notebook kernels and CLI subprocesses a
# test starts inherit the variables.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = str(_THREADS)
    torch.set_num_threads(_THREADS)
# the tests never touch the network: no profile run by a test downloads a dataset (a test that means to sets its own)
os.environ.setdefault("DIFFUSEGEN_DATA_DOWNLOAD", "none")
# real data for the tests that need it: $DIFFUSEGEN_KVASIR, else the project's own data/kvasir-seg (never committed)
KVASIR = Path(os.environ.get("DIFFUSEGEN_KVASIR", ROOT / "data" / "kvasir-seg"))


@pytest.fixture(scope="session")
def kvasir_root() -> Path:
    "The real Kvasir-SEG folder (images/, masks/); the test is skipped with a message when it is absent."
    if not (KVASIR / "images").is_dir() or not (KVASIR / "masks").is_dir():
        pytest.skip(f"Kvasir-SEG not found at {KVASIR}: set DIFFUSEGEN_KVASIR to a folder with images/ and masks/")
    return KVASIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test file (`pytestmark = pytest.mark.usefixtures("one_thread")`): its tensors are small,
    and on a busy 2-core machine two OpenMP threads mostly wait for each other (results are the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def numeric_dataset(dest: Path, n: int = 24, size: int = 96) -> Path:
    """The procedural demo set with files named by number, as CVC-ClinicDB names them: `1.png`, `2.png`, … and, for
    every third image, a zero-padded name (`003.png`) whose leading zeros an id read back as a number would lose."""
    from diffusegen.datasets import demo_pair

    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(exist_ok=True)
    for k in range(1, n + 1):
        name = f"{k:03d}" if k % 3 == 0 else str(k)
        im, m = demo_pair(0, k, size)
        im.save(dest / "images" / f"{name}.png")
        m.save(dest / "masks" / f"{name}.png")
    return dest


@pytest.fixture(scope="session")
def numeric_data(tmp_path_factory) -> Path:
    "A small dataset with numeric file names (see `numeric_dataset`)."
    return numeric_dataset(tmp_path_factory.mktemp("numeric") / "data")
