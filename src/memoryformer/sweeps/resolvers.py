"""Config resolvers of the τ/K sweep (Table 3): d = K·τ, and a head count that suits the new width."""

from __future__ import annotations

from omegaconf import OmegaConf


def fitted_width(model_name: str, tau: int) -> int:
    """The width d = K·τ with K = ⌊d_model/τ⌋: the model's own width when τ divides it, else rounded down.

    The paper's τ=10 row of Table 3 is mf-tiny at d = 510 = 51·10 (spec §6).
    """
    from memoryformer.models import model_config

    if not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be a positive integer, got {tau!r}")
    d = model_config(model_name).hidden_size
    if tau > d:
        raise ValueError(f"tau={tau} exceeds the width d={d} of {model_name}: K = ⌊d/τ⌋ would be 0")
    return tau * (d // tau)


def fitted_heads(model_name: str, hidden_size: int) -> int:
    """The model's number of heads if it suits ``hidden_size``, else the nearest that does (ties: fewer heads).

    A head count suits a width when it divides it and leaves an even number of rotary dims per head
    (int(head_dim · rotary_pct) rotates pairs); e.g. mf-tiny at d = 510 gets 10 heads, mf-nano at d = 120 gets 3.
    """
    from memoryformer.models import model_config

    config = model_config(model_name)
    suitable = [
        h
        for h in range(1, hidden_size + 1)
        if hidden_size % h == 0 and int(hidden_size // h * config.rotary_pct) % 2 == 0
    ]
    if not suitable:
        raise ValueError(f"no number of heads gives an even rotary width at hidden_size={hidden_size}")
    return min(suitable, key=lambda h: (abs(h - config.num_attention_heads), h))


def register_sweep_resolvers() -> None:
    """``${sweep_width:MODEL,TAU}`` → :func:`fitted_width`; ``${sweep_heads:MODEL,WIDTH}`` → :func:`fitted_heads`."""
    if not OmegaConf.has_resolver("sweep_width"):
        OmegaConf.register_new_resolver("sweep_width", fitted_width)
    if not OmegaConf.has_resolver("sweep_heads"):
        OmegaConf.register_new_resolver("sweep_heads", fitted_heads)
