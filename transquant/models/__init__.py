"""The models studied: loading them (:mod:`.loading`) and mapping each transformer family's
module tree to quantization sites (:mod:`.adapters`)."""
from .loading import (
                      ModelError,
                      check_local_checkpoint,
                      hidden_size,
                      identity,
                      load_finetuned,
                      load_pretrained,
                      load_tokenizer,
                      model_config,
                      resolve_source,
)

__all__ = ["ModelError", "check_local_checkpoint", "hidden_size", "identity", "load_finetuned", "load_pretrained",
           "load_tokenizer", "model_config", "resolve_source"]
