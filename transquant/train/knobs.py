"""The fine-tuning knobs beyond the recipe (conf/train/default.yaml), torch-free so that the report
can name a run's fine-tune variant without importing the trainer."""

# Each knob with the value that means "as before" (a default recipe hashes and trains as before).
KNOB_DEFAULTS = {"regularizer": "none", "reg_weight": None, "kurtosis_target": 3.0, "margin": None,
                 "attention": "softmax", "clip_gamma": -0.03, "clip_zeta": 1.0, "gate_bias_init": 0.0,
                 "autocast": "none"}
# Settings that are knobs themselves: in effect whenever they leave their "as before" value.
SETTINGS = ("regularizer", "attention", "autocast")
# The knobs that matter only with a setting.
KNOBS_OF = {"kurtosis": ("reg_weight", "kurtosis_target"), "quanttune": ("reg_weight", "margin"),
            "clipped_softmax": ("clip_gamma", "clip_zeta"), "gated": ("gate_bias_init",)}
