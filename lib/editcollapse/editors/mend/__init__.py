"""MEND (Mitchell et al. 2022, "Fast model editing at scale"): a trained editor of gradients.

The fine-tuning loss of an edit, L = Σ_requests −1/T Σ_t log p(target_t | prompt, target_<t),
has at a linear weight W (input u, output z = W u) the gradient ∇_W L = Σ_i δ_i u_iᵀ over the
token positions i, with δ_i = ∂L/∂z_i: a sum of rank-1 outer products. MEND edits the MLP
weights of the last layers by mapping each factor pair through a small trained network g and
adds ΔW = −η_W Σ_i δ̃_i ũ_iᵀ (Sec. 3).

- `network`: g (one per weight shape, a mode per weight), η, and the gradient factors;
- `editor`: `MEND`, its settings and presets, the checkpoint and the data splits;
- `training`: training g and η (Sec. 3.2), and evaluating a trained MEND on held-out cases.

    python -m editcollapse.cli.mend train --model smollm2-135m --steps 300
    python -m editcollapse.cli.mend evaluate --model smollm2-135m --cases 20
"""
from .editor import MEND, PRESETS, MENDCheckpoint, MENDHyperParams, checkpoint_dir, has_checkpoint, held_out_cases
from .network import MENDNet, gradient_factors, in_out, mlp_weights
from .training import evaluate, train, train_and_save, validate

__all__ = ["MEND", "PRESETS", "MENDCheckpoint", "MENDHyperParams", "MENDNet", "checkpoint_dir", "evaluate", "has_checkpoint",
           "gradient_factors", "held_out_cases", "in_out", "mlp_weights", "train", "train_and_save", "validate"]
