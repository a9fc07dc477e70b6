"""OPT: a pre-LN causal decoder with a sequence-classification head (``score``).

- The embedding sum (token, after ``project_in`` where the embeddings are narrower, + learned
  positions) is computed inline, so it is tapped as the input of block 0 — the stream itself.
- The post-attention residual sum is inline too: tapped as the input of the block's
  ``final_layer_norm``, which quantizes what the norm sees while the stream carried to the FFN's
  add stays float. The post-FFN sum is the block's own output, the stream itself.
- The block flattens tokens before its FFN, so the FFN sites arrive as [batch * tokens, ...]
  and are viewed per token (``flat``).
- Logits are pooled at each sequence's last non-pad token, as for GPT-2.

Post-LN OPT (``do_layer_norm_before=False``, e.g. opt-350m) is another layout, not mapped here.
"""
from torch import nn

from .base import Adapter, Layout, Readers, Tap, register


class OPTAdapter(Adapter):
    def problems(self, model: nn.Module) -> list[str]:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) == "opt" and not config.do_layer_norm_before:
            return ["do_layer_norm_before=False (post-LN OPT such as opt-350m)"]
        return super().problems(model)


OPT = register(OPTAdapter(Layout(
    family="opt", blocks="layers", norm="pre", causal=True, segments=False,
    embeddings={"embedding_sum": Tap("layers.0", "input", width_from="layers.0.self_attn_layer_norm")},
    block={"attn_norm": Tap("self_attn_layer_norm"), "query": Tap("self_attn.q_proj"),
           "key": Tap("self_attn.k_proj"), "value": Tap("self_attn.v_proj"),
           "attn_scores": Tap("self_attn", "scores"), "attn_probs": Tap("self_attn", "probs"),
           "context": Tap("self_attn.out_proj", "input"), "attn_output": Tap("self_attn.out_proj"),
           "attn_residual": Tap("final_layer_norm", "input", flat=True), "ffn_norm": Tap("final_layer_norm", flat=True),
           "ffn_intermediate": Tap("fc2", "input", flat=True), "ffn_output": Tap("fc2", flat=True),
           "ffn_residual": Tap("", width_from="final_layer_norm")},
    final={"final_norm": Tap("final_layer_norm")},
    head={"logits": Tap("")},
    readers=(Readers("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             Readers("final_layer_norm", ("fc1",))))))
