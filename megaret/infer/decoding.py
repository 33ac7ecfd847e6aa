"""Autoregressive generation that carries each model's state instead of recomputing the past.

    ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.9, seed=0)

One decoder for every arch, exact (the tests compare it with a full forward pass), driven by
the arch spec (megaret/models/spec.py):

- the prompt is one call (RetNet: the spec's prefill form, chunkwise), then every new token is
  one call on the carried state (RetNet: the spec's step form, recurrent: O(1) time and memory
  per token whatever the context length; the causal Transformer appends to a KV cache, which
  `generate` reserves for prompt + max_new_tokens after the prefill, so decoding never
  reallocates; the sliding one keeps the window);
- an arch whose calls must hold whole blocks (the spec's `call_multiple`: BRT's recurrent layer
  needs the state of block i for every token of block i + 1) keeps the state at the last
  completed block boundary and re-runs the current partial block (padded to W tokens; the
  padding sits after the read position, so causality keeps it invisible) from that state at
  each token: O(W) per token, exact; when the block fills up its output state becomes the new
  boundary state.

Logits are vocab-parallel; `model.gather_logits` assembles the full vocabulary on every TP
rank, and every rank samples with the same seeded generator, so ranks agree on the tokens.

Arguments out of range (`check_sampling`) and a KV cache that cannot fit in the device's free
memory (`Decoder.check_room`) raise InferenceError before anything is computed or allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch import nn

from megaret.infer.cuda_graph import GraphedStep, graph_refusal
from megaret.infer.loading import InferenceError
from megaret.models.attention_layer import SelfAttention
from megaret.models.spec import arch_spec


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   max_new_tokens: int = 0) -> None:
    """Raises InferenceError (naming the generate flag, the value and the allowed range) unless
    temperature is finite and >= 0 (0: argmax), top_k >= 0 (0 or None: no top-k filter), top_p
    in (0, 1] (None: no nucleus filter) and max_new_tokens >= 0."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InferenceError(f"--temperature {temperature} is outside [0, inf): a finite number, "
                             "0 for argmax decoding")
    if top_k is not None and top_k < 0:
        raise InferenceError(f"--top-k {top_k} is outside [0, inf): 0 or leaving it out keeps every id")
    if top_p is not None and not 0 < top_p <= 1:
        raise InferenceError(f"--top-p {top_p} is outside (0, 1]: 1 or leaving it out keeps every id")
    if max_new_tokens < 0:
        raise InferenceError(f"--max-new-tokens {max_new_tokens} is outside [0, inf)")


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory plus what PyTorch's
    allocator holds unused, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next ids (B,). Greedy (or temperature 0) takes the argmax; otherwise
    softmax(logits / temperature) restricted to the top_k ids and to the smallest set whose
    probability reaches top_p (nucleus), sampled with `generator`. Raises InferenceError for
    arguments out of range (`check_sampling`)."""
    check_sampling(temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, greedy, generator)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
            generator: torch.Generator | None) -> torch.Tensor:
    """sample_next without the argument check (generate checks once, not at every token)."""
    logits = logits.float()
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this id already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Decoder:
    """Feeds tokens to a model with its carried state; returns the next-token logits (B, V).

    State: the state at the last call boundary (for block-aligned archs: the last completed
    block) and the tokens after it that do not fill a block yet (re-run, padded, at each step).
    """

    def __init__(self, model: nn.Module, cuda_graph: bool = False) -> None:
        spec = arch_spec(model.cfg.arch)
        self.model = model
        self.state: Any = None
        self.cuda_graph = cuda_graph  # replay one-token steps from a CUDA graph where the arch allows
        self.graph_note = "off"  # on, or off (why) once a capture was tried
        self._graphed: GraphedStep | None = None
        self._graph_tried = False
        self.block = spec.call_multiple(model.cfg)
        self.forms = (spec.prefill_form, spec.step_form)
        self.unbounded = spec.carried_span(model.cfg) is None  # a cache growing with the context
        self.pending: torch.Tensor | None = None  # (B, r) tokens after the boundary, r < block

    def _last_logits(self, logits: torch.Tensor, index: int = -1) -> torch.Tensor:
        """(B, T, V / tp) -> the full-vocabulary logits (B, V) at position `index`."""
        return self.model.gather_logits(logits[:, index:][:, :1].contiguous())[:, 0]

    def _feed(self, tokens: torch.Tensor, form: str | None) -> torch.Tensor:
        w = self.block
        buf = tokens if self.pending is None else torch.cat([self.pending, tokens], dim=1)
        full = buf.shape[1] // w * w
        logits = None
        if full:  # whole blocks advance the boundary state
            out = self.model(buf[:, :full], state=self.state, retention_mode=form)
            self.state = out.state
            logits = out.logits
        rest = buf[:, full:]
        self.pending = rest if rest.shape[1] else None
        if self.pending is None:
            return self._last_logits(logits)
        r = rest.shape[1]
        pad = rest.new_zeros(rest.shape[0], w - r)  # after position r - 1: never attended by it
        out = self.model(torch.cat([rest, pad], dim=1), state=self.state, retention_mode=form)  # state kept
        return self._last_logits(out.logits, r - 1)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt (B, T0) -> the logits after its last token."""
        return self._feed(prompt, self.forms[0])

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> the logits after it."""
        if self.cuda_graph and not self._graph_tried:
            self._graph_tried = True
            self._capture()
        if self._graphed is not None:
            return self._last_logits(self._graphed(token))
        return self._feed(token[:, None], self.forms[1])

    def _capture(self) -> None:
        """Capture the one-token step as a CUDA graph, or note why not (the eager step goes on)."""
        device = next(self.model.parameters()).device
        why = graph_refusal(self.model, self.state, device)
        if why is None and self.pending is not None:
            why = "tokens pending a block"
        if why is None:
            try:
                self._graphed = GraphedStep(self.model, self.state, self.forms[1])
            except RuntimeError as exc:  # something in the step reads the host: keep the eager step
                why = f"capture failed: {str(exc).splitlines()[0][:200]}"
        self.graph_note = "on" if why is None else f"off ({why})"

    def carried_state(self) -> Any:
        """The state after the last call (from the graph's buffers when steps replay a graph)."""
        return self._graphed.state if self._graphed is not None else self.state

    def cache_bytes(self, batch: int, tokens: int) -> int:
        """Bytes of the keys and values a cache that keeps every key holds for `tokens` tokens of
        `batch` samples (0 for a state bounded in the context): 2 (k, v) x attention layers x
        batch x local heads x head_dim x tokens x element size."""
        if not self.unbounded:
            return 0
        size = next(self.model.parameters()).element_size()
        per_token = sum(2 * m.local_heads * m.head_dim  # k and v: (B, H_local, T, D) each
                        for m in self.model.modules() if isinstance(m, SelfAttention))
        return per_token * batch * tokens * size

    def check_room(self, batch: int, prompt: int, max_new_tokens: int) -> None:
        """Raises InferenceError when the cache for prompt + max_new_tokens tokens would not fit
        in the memory free on the model's device (called before the prefill allocates any)."""
        need = self.cache_bytes(batch, prompt + max_new_tokens)
        if not need:
            return
        device = next(self.model.parameters()).device
        free = free_memory(device)
        if need > free:
            fits = max(free // self.cache_bytes(batch, 1) - prompt, 0)
            raise InferenceError(
                f"--max-new-tokens {max_new_tokens}: the KV cache of model.arch={self.model.cfg.arch} for "
                f"{prompt} + {max_new_tokens} tokens (batch {batch}) needs ~{_gib(need)}, more than the "
                f"{_gib(free)} available on {device}: lower --max-new-tokens (at most {fits} fit)")

    def reserve(self, total: int) -> None:
        """A cache that keeps every key (the causal Transformer's) is preallocated for `total`
        tokens: one copy now instead of a few geometric reallocations while decoding."""
        if self.unbounded and self.state is not None:
            self.state = self.state.reserve(total)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def make_decoder(model: nn.Module, cuda_graph: bool = False) -> Decoder:
    """The exact, state-carrying decoder for model.cfg.arch (one-token steps replayed from a CUDA
    graph with `cuda_graph`, where the device and the arch allow; `decoder.graph_note` says)."""
    return Decoder(model, cuda_graph)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """prompt_ids: (B, T0) with T0 >= 1 -> (B, T0 + n) ids, n <= max_new_tokens.

    stream(ids (B,)) is called with each new token as soon as it is chosen. With eos_id set,
    a sample that produced it keeps producing it, and generation stops once all samples have.
    vocab_size: sample only ids below it (a tokenizer smaller than the model's vocabulary).
    cuda_graph: replay the one-token steps from a CUDA graph (RetNet on CUDA; elsewhere ignored).
    The model is put in eval mode (no dropout) for the call and restored afterwards.
    Raises InferenceError for sampling arguments out of range or a KV cache (causal Transformer)
    that prompt + max_new_tokens would grow beyond the device's free memory, before decoding.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (B, T0) with T0 >= 1, got {tuple(prompt_ids.shape)}")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        decoder = make_decoder(model, cuda_graph)
        decoder.check_room(prompt_ids.shape[0], prompt_ids.shape[1], max_new_tokens)
        ids = prompt_ids.to(device)
        logits = decoder.prefill(ids)
        decoder.reserve(ids.shape[1] + max_new_tokens)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        new = []
        for i in range(max_new_tokens):
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            token = _sample(logits, temperature, top_k, top_p, greedy, generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            new.append(token)
            if stream is not None:
                stream(token)
            if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits = decoder.step(token)
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids
    finally:
        model.train(was_training)
