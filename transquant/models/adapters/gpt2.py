"""GPT-2: a pre-LN causal decoder with a sequence-classification head (``score``).

- ``c_attn`` computes query, key and value in one Conv1D; its output is one site of kind
  ``qkv`` (``layer.i.attn.qkv``, three times the hidden width): a deployed fused projection
  has one output tensor, hence one quantizer.
- The embedding sum (token + position) is ``drop``'s output, the stream entering block 0.
- No segment embeddings (``segments=False``): ``forward`` accepts ``token_type_ids`` but looks
  them up in the *word* embeddings, so the model is never given them.
- The post-attention residual sum is computed inline in the block, so it is tapped as the input
  of ``ln_2``: that quantizes what the norm sees, while the stream carried to the FFN's add stays
  float. The post-FFN sum is the block's own output, the stream itself.
- Logits are the classifier's output, pooled at each sequence's last non-pad token (which is
  why the config needs ``pad_token_id``).
"""
from .base import Adapter, Layout, Readers, Tap, register

GPT2 = register(Adapter(Layout(
    family="gpt2", blocks="h", norm="pre", causal=True, segments=False,
    embeddings={"embedding_sum": Tap("drop", width_from="ln_f")},
    block={"attn_norm": Tap("ln_1"), "qkv": Tap("attn.c_attn"), "attn_scores": Tap("attn", "scores"),
           "attn_probs": Tap("attn", "probs"), "context": Tap("attn.c_proj", "input"),
           "attn_output": Tap("attn.c_proj"), "attn_residual": Tap("ln_2", "input"), "ffn_norm": Tap("ln_2"),
           "ffn_intermediate": Tap("mlp.c_proj", "input"), "ffn_output": Tap("mlp.c_proj"),
           "ffn_residual": Tap("", width_from="ln_2")},
    final={"final_norm": Tap("ln_f")},
    head={"logits": Tap("")},
    # Conv1D weights are [in, out]: a transform scales their rows. ln_f feeds the head: left alone.
    readers=(Readers("ln_1", ("attn.c_attn",)), Readers("ln_2", ("mlp.c_fc",))))))
