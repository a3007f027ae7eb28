"""gptdeploy: trained GPT -> verified ONNX / TensorRT deploy bundle -> audited generation."""

from gptdeploy.errors import GptDeployError

__version__ = "0.1.0"

__all__ = ["Generator", "GptDeployError", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import gptdeploy` stays cheap for the CLI and export-only users.
    if name == "Generator":
        from gptdeploy.generate import Generator

        return Generator
    raise AttributeError(f"module 'gptdeploy' has no attribute {name!r}")
