"""optimum-mosaic: composite projection pruning (Mosaic) for Hugging Face causal language models."""

__version__ = "0.1.0"

from .quantization import silence_bnb_cpu_notices  # noqa: E402

silence_bnb_cpu_notices()  # before transformers.trainer_utils imports bitsandbytes (see quantization.py)

from .callbacks import GradualPruningCallback, SparsityPreservingCallback  # noqa: E402
from .configuration import PrunedConfig  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .modeling import PrunedModelForCausalLM  # noqa: E402
from .plan import SparsityPlan  # noqa: E402
from .pruner import Pruner  # noqa: E402
from .sparse.kv_cache import SparseKVCache  # noqa: E402

__all__ = [
    "Pruner",
    "PrunedConfig",
    "PrunedModelForCausalLM",
    "SparsityPlan",
    "SparsityPreservingCallback",
    "GradualPruningCallback",
    "SparseKVCache",
    "perplexity",
    "__version__",
]
