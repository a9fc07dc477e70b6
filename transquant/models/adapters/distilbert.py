"""DistilBERT: a post-LN encoder like BERT under its own names.

Residual sums are the inputs of ``sa_layer_norm`` and ``output_layer_norm``. The pooler site is
``pre_classifier``'s output, before the ReLU the head applies to it (BERT's pooler output is
after its tanh: both are the tensor that leaves the Linear layer of the head's first step).
"""
from .base import Adapter, Layout, Readers, Restore, Tap, register

QKV = ("attention.q_lin", "attention.k_lin", "attention.v_lin")

DISTILBERT = register(Adapter(Layout(
    family="distilbert", blocks="transformer.layer", norm="post", causal=False, segments=False,
    embeddings={"embedding_sum": Tap("embeddings.LayerNorm", "input"),
                "embedding_norm": Tap("embeddings.LayerNorm")},
    block={"query": Tap("attention.q_lin"), "key": Tap("attention.k_lin"), "value": Tap("attention.v_lin"),
           "attn_scores": Tap("attention", "scores"), "attn_probs": Tap("attention", "probs"),
           "context": Tap("attention.out_lin", "input"), "attn_output": Tap("attention.out_lin"),
           "attn_residual": Tap("sa_layer_norm", "input"), "attn_norm": Tap("sa_layer_norm"),
           "ffn_intermediate": Tap("ffn.lin2", "input"), "ffn_output": Tap("ffn.lin2"),
           "ffn_residual": Tap("output_layer_norm", "input"), "ffn_norm": Tap("output_layer_norm")},
    head={"pooler": Tap("pre_classifier"), "logits": Tap("classifier")},
    # Both residual adds are inline in the block: the restore adds into the sum norm's input,
    # the residual being the block's input (attention) or the FFN's input (FFN).
    readers=(Readers("embeddings.LayerNorm", QKV, at="base", linears_at="first",
                     restore=Restore("sa_layer_norm", operand="")),
             Readers("sa_layer_norm", ("ffn.lin1",), restore=Restore("output_layer_norm", operand="ffn")),
             Readers("output_layer_norm", QKV, linears_at="next", restore=Restore("sa_layer_norm", operand=""))))))
