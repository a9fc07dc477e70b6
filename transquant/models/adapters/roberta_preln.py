"""RoBERTa-PreLayerNorm (transformers' ``RobertaPreLayerNorm*``): a pre-LN encoder.

Each sublayer normalises its input first (``attention.LayerNorm``, ``intermediate.LayerNorm``)
and its output module adds the residual with no LayerNorm after it, so the residual sums are the
*outputs* of ``attention.output`` and ``output``: quantizing them quantizes the stream itself.
The embeddings are still normalised after their sum, and the encoder ends in ``LayerNorm``.
"""
from .base import Adapter, Layout, Readers, Tap, register

ROBERTA_PRELN = register(Adapter(Layout(
    family="roberta-prelayernorm", blocks="encoder.layer", norm="pre", causal=False, segments=True,
    embeddings={"embedding_sum": Tap("embeddings.LayerNorm", "input"),
                "embedding_norm": Tap("embeddings.LayerNorm")},
    block={"attn_norm": Tap("attention.LayerNorm"), "query": Tap("attention.self.query"),
           "key": Tap("attention.self.key"), "value": Tap("attention.self.value"),
           "attn_scores": Tap("attention.self", "scores"), "attn_probs": Tap("attention.self", "probs"),
           "context": Tap("attention.output.dense", "input"), "attn_output": Tap("attention.output.dense"),
           "attn_residual": Tap("attention.output"), "ffn_norm": Tap("intermediate.LayerNorm"),
           "ffn_intermediate": Tap("intermediate"), "ffn_output": Tap("output.dense"),
           "ffn_residual": Tap("output")},
    final={"final_norm": Tap("LayerNorm"), "pooler": Tap("pooler")},
    head={"logits": Tap("classifier")},
    optional=("pooler",),
    # The embedding norm's output is the stream (layer 0 normalises it again): no linear reads it.
    readers=(Readers("attention.LayerNorm", ("attention.self.query", "attention.self.key", "attention.self.value")),
             Readers("intermediate.LayerNorm", ("intermediate.dense",))))))
