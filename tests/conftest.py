"Shared fixtures: the real Kvasir-SEG folder (skipped cleanly when absent) and small generated datasets."
import os
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KVASIR = Path(os.environ.get("DIFFUSEGEN_KVASIR", ROOT.parent/"shared"/"data"/"kvasir-seg"))

@pytest.fixture(scope="session")
def kvasir_root() -> Path:
    "The real Kvasir-SEG folder (images/, masks/); the test is skipped with a message when it is absent."
    if not (KVASIR/"images").is_dir() or not (KVASIR/"masks").is_dir():
        pytest.skip(f"Kvasir-SEG not found at {KVASIR}: set DIFFUSEGEN_KVASIR to a folder with images/ and masks/")
    return KVASIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test file (`pytestmark = pytest.mark.usefixtures("one_thread")`): its tensors are small,
    and on a busy 2-core machine two OpenMP threads mostly wait for each other (results are the same)."""
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
