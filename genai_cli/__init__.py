"""genai: train and sample generative image models from one YAML config each."""

__version__ = "0.1.0"

from .api import create_model, list_models, load_checkpoint  # noqa: E402

__all__ = ["create_model", "list_models", "load_checkpoint", "__version__"]
