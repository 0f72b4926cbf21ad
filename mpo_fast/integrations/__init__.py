"""Drop-in integrations of mpo-fast's fused head and loss into the trainers people use.

    mpo_fast.integrations.trl   FusedDPOTrainer: trl.DPOTrainer with mpo-fast's kernels inside
                                the model's forward (needs trl>=1.15,<2)
    mpo_fast.integrations.hf    patch_model / unpatch_model: a Hugging Face model's training
                                forward returns per-token log-probs (or hidden states), never
                                logits; MPOTrainer + PreferenceCollator for transformers.Trainer

Import the submodule you use; this package imports neither (``import mpo_fast`` needs no trl).
"""

__all__ = ["hf", "trl"]
