"""lm_core: the shared, sharded decoder-only transformer every experiment builds on.

Importing the package is light: the model, config and sharding helpers. The training stack (data, TFDS,
tokenizers, checkpoints) lives in submodules imported on demand.
"""

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.kv_cache import KVCache, init_cache
from lm_core.model import ModelOutput, Transformer
from lm_core.sharding import MeshConfig, make_mesh

__all__ = ["KVCache", "MeshConfig", "ModelConfig", "ModelOutput", "Transformer", "UserError", "init_cache",
           "make_mesh"]
