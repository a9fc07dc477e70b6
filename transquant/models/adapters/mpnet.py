"""MPNet (transformers' ``MPNet*``): a post-LN encoder like BERT under its own names.

- Each layer is ``attention.attn.{q,k,v,o}`` + ``attention.LayerNorm``, ``intermediate``,
  ``output.{dense,LayerNorm}``. The attention output site is ``o``'s output and the context its
  input; each residual sum is the *input* of the LayerNorm after it, as in BERT.
- The embedding sum is word + absolute position (no segment table, ``segments=False``).
- Attention scores and probabilities are **not sites**: ``MPNetSelfAttention`` computes them
  itself (adding the relative position bias the encoder precomputes) instead of calling a
  kernel from transformers' attention-function registry, so the tappable kernel
  (``transquant_eager``) never runs for it. They are never quantized: QKᵀ reads the quantized
  query and key but its scores stay float (bias, mask and softmax too), and probs·V reads float
  probabilities, so MPNet's W8A8 keeps that matmul in float (the ONNX engine runs QKᵀ as an
  integer MatMul with a float output, probs·V as a float one).
- Logits are the classifier's output; its head (``dense``, tanh, ``out_proj``) is RoBERTa's, so
  like RoBERTa it has no pooler site.
"""
from .base import Adapter, Layout, Readers, Restore, Tap, register

QKV = ("attention.attn.q", "attention.attn.k", "attention.attn.v")

MPNET = register(Adapter(Layout(
    family="mpnet", blocks="encoder.layer", norm="post", causal=False, segments=False,
    embeddings={"embedding_sum": Tap("embeddings.LayerNorm", "input"),
                "embedding_norm": Tap("embeddings.LayerNorm")},
    block={"query": Tap("attention.attn.q"), "key": Tap("attention.attn.k"), "value": Tap("attention.attn.v"),
           "context": Tap("attention.attn.o", "input"), "attn_output": Tap("attention.attn.o"),
           "attn_residual": Tap("attention.LayerNorm", "input"), "attn_norm": Tap("attention.LayerNorm"),
           "ffn_intermediate": Tap("intermediate"), "ffn_output": Tap("output.dense"),
           "ffn_residual": Tap("output.LayerNorm", "input"), "ffn_norm": Tap("output.LayerNorm")},
    head={"logits": Tap("classifier")},
    # The attention's residual add is inline (MPNetAttention: LayerNorm(o + hidden_states), the
    # residual being its input); MPNetOutput takes the FFN's residual as its second argument.
    readers=(Readers("embeddings.LayerNorm", QKV, at="base", linears_at="first",
                     restore=Restore("attention.LayerNorm", operand="attention")),
             Readers("attention.LayerNorm", ("intermediate.dense",), restore=Restore("output")),
             Readers("output.LayerNorm", QKV, linears_at="next",
                     restore=Restore("attention.LayerNorm", operand="attention"))))))
