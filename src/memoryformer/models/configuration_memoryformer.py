"""MemoryFormer configuration, following the transformers configuration / modeling split (spec §3–4).

This file is also shipped inside every saved checkpoint (see ``export.py``), so it imports only from the
``memoryformer`` modules that are bundled with it, torch and transformers.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from memoryformer.kernels import BACKENDS
from memoryformer.layers.hashing import SCORES

MEMORY_BLOCK_ACTIVATIONS: tuple[str | None, ...] = (None, "gelu")


class MemoryFormerConfig(PretrainedConfig):
    r"""Configuration of a [`MemoryFormerForCausalLM`]; the defaults are mf-tiny (spec §4).

    Args:
        vocab_size: V, rows of the dense embedding and outputs of the untied head (GPT-NeoX-20B tokenizer, padded).
        hidden_size: d, the model width; must equal ``num_chunks * tau``.
        num_hidden_layers: number of MemoryFormer blocks.
        num_attention_heads: attention heads; must divide d.
        tau: τ, bits per chunk of every hash (tables have 2^τ rows per chunk).
        num_chunks: K, chunks (= tables) per hash. ``None`` derives K = d/τ; a given K must satisfy d = K·τ.
        expand_bits: e, extra bits per chunk inside the Memory Block (its hidden width is K·(τ+e), spec §2).
        score: chunk weight, ``"l1"`` (the authors' code) or ``"paper"`` (Eq. 5–7, uses ``temperature``).
        temperature: t of the paper's score.
        memory_block_activation: ``None`` (the paper) or ``"gelu"`` between ML1 and its LayerNorm (Table 6).
        lookup_backend: implementation of the table lookup, one of ``memoryformer.kernels.BACKENDS``.
        rotary_pct: fraction of each head's dims that get rotary position embedding (GPT-NeoX: 0.25).
        rotary_emb_base: rotary base (10000).
        max_position_embeddings: longest sequence the model is meant for (rotary has no hard limit).
        rms_norm_eps: ε of the blocks' RMSNorm, added *outside* the square root.
        layer_norm_eps: ε of the LayerNorm inside each Memory Block.
        initializer_range: std of the Memory-Block tables (0.02); QKV tables, embedding and head use GPT-NeoX's
            small_init std √(2/(5d)) instead (spec §3).
        use_cache: whether ``forward`` returns a KV cache by default.
    """

    model_type = "memoryformer"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (a transformers class attribute)

    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    tau: int = 8
    num_chunks: int | None = None
    expand_bits: int = 2
    score: str = "l1"
    temperature: float | int = 1.0
    memory_block_activation: str | None = None
    lookup_backend: str = "auto"
    rotary_pct: float | int = 0.25
    rotary_emb_base: float | int = 10000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-8
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs) -> None:
        if self.num_chunks is None and isinstance(self.tau, int) and self.tau > 0:
            self.num_chunks = self.hidden_size // self.tau  # check() reports a d that τ does not divide
        self.check()
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Rotary dims per head, as GPT-NeoX computes them: int(head_dim · rotary_pct)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def memory_block_width(self) -> int:
        """Width K·(τ+e) between the two Memory Layers of a Memory Block (spec §2)."""
        return self.num_chunks * (self.tau + self.expand_bits)

    def check(self) -> None:
        """Fail early, naming the fix, on a configuration the model cannot have."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "tau", "num_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        d, tau, k = self.hidden_size, self.tau, self.num_chunks
        if d % tau:
            raise ValueError(
                f"hidden_size={d} is not divisible by tau={tau}: the hash cuts d into K chunks of tau bits "
                f"(d = K·τ, spec §1); use hidden_size={d - d % tau} or {d - d % tau + tau}, or a tau dividing {d}"
            )
        if d != k * tau:
            raise ValueError(
                f"hidden_size must equal num_chunks·tau (d = K·τ, spec §1), got d={d}, K={k}, tau={tau}; "
                f"set num_chunks={d // tau}, or leave it unset to derive it"
            )
        if d % self.num_attention_heads:
            divisors = [h for h in range(1, min(d, 64) + 1) if d % h == 0]
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={d}; "
                f"choose one of {divisors}"
            )
        if not 0 <= self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            even = [h for h in range(1, min(d, 64) + 1) if d % h == 0 and int(d // h * self.rotary_pct) % 2 == 0]
            raise ValueError(
                f"rotary dims per head int(head_dim·rotary_pct) = int({self.head_dim}·{self.rotary_pct}) = "
                f"{self.rotary_ndims} is odd, but rotary rotates pairs of dims; choose num_attention_heads from "
                f"{even} or another rotary_pct"
            )
        if self.expand_bits < 0:
            raise ValueError(f"expand_bits must be >= 0, got {self.expand_bits}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.memory_block_activation not in MEMORY_BLOCK_ACTIVATIONS:
            raise ValueError(
                f"memory_block_activation must be one of {MEMORY_BLOCK_ACTIVATIONS}, "
                f"got {self.memory_block_activation!r}"
            )
        if self.lookup_backend not in BACKENDS:
            raise ValueError(f"lookup_backend must be one of {BACKENDS}, got {self.lookup_backend!r}")


__all__ = ["MemoryFormerConfig"]
