"""Post-LN BERT-family encoders: BERT, RoBERTa, ELECTRA, MiniLM, XLM-R … — every model whose
layers are ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
``intermediate``, ``output.{dense,LayerNorm}``.

Each residual sum is the *input* of the LayerNorm that follows it: a post-LN encoder adds and
normalises in one module, so quantizing that input quantizes the sum the stream carries on.
ELECTRA's embeddings may be narrower than its layers (``embedding_size``); each site's width
comes from its own module. MPNet is post-LN too but has its own names (``attention.attn.{q,k,v,o}``)
and computes its attention scores itself: it has its own adapter (:mod:`.mpnet`).
"""
from .base import Adapter, Layout, Readers, Restore, Tap, register

QKV = ("attention.self.query", "attention.self.key", "attention.self.value")

BERT = register(Adapter(Layout(
    family="bert", blocks="encoder.layer", norm="post", causal=False, segments=True,
    embeddings={"embedding_sum": Tap("embeddings.LayerNorm", "input"),
                "embedding_norm": Tap("embeddings.LayerNorm")},
    block={"query": Tap("attention.self.query"), "key": Tap("attention.self.key"),
           "value": Tap("attention.self.value"), "attn_scores": Tap("attention.self", "scores"),
           "attn_probs": Tap("attention.self", "probs"), "context": Tap("attention.output.dense", "input"),
           "attn_output": Tap("attention.output.dense"), "attn_residual": Tap("attention.output.LayerNorm", "input"),
           "attn_norm": Tap("attention.output.LayerNorm"), "ffn_intermediate": Tap("intermediate"),
           "ffn_output": Tap("output.dense"), "ffn_residual": Tap("output.LayerNorm", "input"),
           "ffn_norm": Tap("output.LayerNorm")},
    final={"pooler": Tap("pooler")},  # RoBERTa and ELECTRA classify without one
    head={"logits": Tap("classifier")},
    optional=("pooler",),
    # Each norm's output is the stream: read by the next linears and carried as the residual of the
    # next sum, which BertSelfOutput / BertOutput take as their second argument. ELECTRA with a
    # narrower embedding: embeddings_project is the embedding norm's only reader.
    readers=(Readers("embeddings.LayerNorm", ("embeddings_project",), at="base"),
             Readers("embeddings.LayerNorm", QKV, at="base", linears_at="first",
                     restore=Restore("attention.output")),
             Readers("attention.output.LayerNorm", ("intermediate.dense",), restore=Restore("output")),
             Readers("output.LayerNorm", QKV, linears_at="next", restore=Restore("attention.output"))))))
