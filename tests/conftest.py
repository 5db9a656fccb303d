"""Test-wide set-up.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on
before anything imports triton. On a machine with an NVIDIA device the real compiler is used.
"""
import os


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


if "TRITON_INTERPRET" not in os.environ and not _has_nvidia_device():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny: one intra-op thread is faster than two (thread hand-offs cost more
# than the work), and it keeps timings sane when several test processes share the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Model and embedding caches of the test run stay inside the checkout (ignored by git).
os.environ.setdefault("AP_ERASE_CACHE", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "pytest-ap_erase"))

# DeepSpeed's JIT-built CPU communication op is cached inside the checkout as well.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))

import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_vocab(tmp_path_factory):
    """A 300-word a-z vocabulary file: R selection stays fast and deterministic."""
    rng = random.Random(1234)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < 300:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("\n".join(sorted(words)) + "\n")
    return str(path)


@pytest.fixture
def tiny_cfg(small_vocab):
    """Settings for a quick AP run on the built-in tiny model."""
    from ap_erase_fast import EraseConfig

    def make(**overrides):
        base = dict(model="tiny", erase=["garbage truck"], steps=2, seed=0, vocab=small_vocab,
                    k_closest=60, num_centers=12, ddim_steps=10, quiet=True, device="cpu")
        base.update(overrides)
        return EraseConfig(**base)

    return make
