"""MegaretConfig: the configuration of an exported megaret model (Hugging Face remote code).

Standalone: imports transformers only, never megaret (this file is copied beside the weights).
Field names follow transformers' conventions where one exists (num_hidden_layers, ...); the
rest are megaret's model.* fields of the same name.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

ARCHS = ("retnet", "transformer", "sliding", "brt")


class MegaretConfig(PreTrainedConfig):
    model_type = "megaret"

    def __init__(
        self,
        arch: str = "retnet",
        vocab_size: int = 512,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        ffn_type: str = "gelu",  # gelu | swiglu
        norm_type: str = "layernorm",  # layernorm | rmsnorm
        norm_eps: float = 1e-6,
        rotary_base: float = 10000.0,
        value_factor: int = 2,  # retnet: value / gate width = value_factor * hidden_size
        decay_schedule: str = "retnet",  # retnet | loglinear
        chunk_size: int = 256,  # retnet: prompt tokens per parallel-form call (memory O(chunk^2))
        block_size: int = 512,  # sliding / brt: attention window block W
        num_states: int = 512,  # brt: state vectors S
        recurrent_layers: list[int] | None = None,  # brt: indices (non-negative) of the recurrent layers
        gate_type: str = "fixed",  # brt: fixed | lstm
        state_skip: bool = True,  # brt: no MLP on the state path
        max_position_embeddings: int = 2048,  # the trained context (lm-eval's default window)
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        if arch not in ARCHS:
            raise ValueError(f"arch: unknown {arch!r}; use one of {', '.join(ARCHS)}")
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.ffn_type = ffn_type
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.rotary_base = rotary_base
        self.value_factor = value_factor
        self.decay_schedule = decay_schedule
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.num_states = num_states
        self.recurrent_layers = sorted(recurrent_layers or [])
        self.gate_type = gate_type
        self.state_skip = state_skip
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
