"""optimum-mosaic: composite projection pruning (Mosaic) for Hugging Face causal language models."""

__version__ = "0.1.0"

from .configuration import PrunedConfig  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .modeling import PrunedModelForCausalLM  # noqa: E402
from .plan import SparsityPlan  # noqa: E402
from .pruner import Pruner  # noqa: E402

__all__ = ["Pruner", "PrunedConfig", "PrunedModelForCausalLM", "SparsityPlan", "perplexity", "__version__"]
