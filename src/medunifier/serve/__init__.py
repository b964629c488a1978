"""medunifier.serve: the Python API (`Copilot`), the similar-case index and the REST service.

    from medunifier.serve import Copilot
    copilot = Copilot.from_pretrained("runs/demo/run")
"""

from medunifier.serve.api import Copilot, GenerationUnavailable, IndexUnavailable
from medunifier.serve.index import EmbeddingIndex, build_index

__all__ = ["Copilot", "EmbeddingIndex", "GenerationUnavailable", "IndexUnavailable", "build_index"]
