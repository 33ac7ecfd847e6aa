"""Decoding steps replayed from a CUDA graph (megaret/infer/cuda_graph.py).

On the CPU: the graph's step reads its position from a 0-d tensor on the device, and that step
equals the eager one; the decoder keeps the eager step, saying why, where no graph can be captured.
On a GPU: greedy generation with the graph equals generation without it, token for token.
"""

from __future__ import annotations

import pytest
import torch

from megaret.config import ModelConfig, ParallelConfig
from megaret.infer.cuda_graph import graph_refusal
from megaret.infer.decoding import generate, make_decoder
from megaret.models.retnet import RetNetState
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config


def _model(ctx, arch: str, dtype: torch.dtype, device: str = "cpu"):  # noqa: ANN001, ANN202
    extra = {"block_size": 4} if arch != "retnet" else {}
    cfg = ModelConfig(arch=arch, vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                      dropout=0.0, **extra)
    torch.manual_seed(0)
    return build_model(cfg, megatron_config(cfg, ParallelConfig()), ctx.tp).to(device, dtype).eval()


def test_a_step_from_a_tensor_position_equals_the_int_one(ctx1):
    model = _model(ctx1, "retnet", torch.float64)
    ids = torch.randint(64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids[:, :10], retention_mode="chunk")
        eager = model(ids[:, 10:], state=out.state, retention_mode="recurrent")
        as_graph = model(ids[:, 10:], state=RetNetState(list(out.state.layers), torch.tensor(10)),
                         retention_mode="recurrent")
        shifted = model(ids[:, 10:], state=RetNetState(list(out.state.layers), torch.tensor(11)),
                        retention_mode="recurrent")
    assert torch.equal(as_graph.logits, eager.logits)
    assert int(as_graph.state.position) == eager.state.position == 11
    assert not torch.equal(shifted.logits, eager.logits)  # the tensor position is really read


def test_the_decoder_keeps_the_eager_step_and_says_why(ctx1):
    model = _model(ctx1, "retnet", torch.float32)
    prompt = torch.randint(64, (2, 5), generator=torch.Generator().manual_seed(2))
    decoder = make_decoder(model, cuda_graph=True)
    with torch.no_grad():
        decoder.prefill(prompt)
        decoder.step(prompt[:, -1])
    assert decoder.graph_note.startswith("off (CUDA graphs need a CUDA device")
    want = generate(model, prompt, 4, greedy=True)
    assert torch.equal(generate(model, prompt, 4, greedy=True, cuda_graph=True), want)
    transformer = _model(ctx1, "transformer", torch.float32)
    state = transformer(prompt).state
    assert "changes shape" in graph_refusal(transformer, state, torch.device("cuda"))
    assert "after the prefill" in graph_refusal(model, None, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replayed_greedy_decoding_equals_eager_on_cuda(ctx1):
    model = _model(ctx1, "retnet", torch.float32, "cuda")
    prompt = torch.randint(64, (3, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    want = generate(model, prompt, 12, greedy=True)
    decoder = make_decoder(model, cuda_graph=True)
    with torch.no_grad():
        logits = decoder.prefill(prompt)
        eager_state = model(prompt, retention_mode="chunk").state
        for _ in range(12):
            token = logits.argmax(-1)
            ref = model(token[:, None], state=eager_state, retention_mode="recurrent")
            eager_state = ref.state
            logits = decoder.step(token)
            torch.testing.assert_close(logits, ref.logits[:, 0], rtol=1e-5, atol=1e-5)
    assert decoder.graph_note == "on"
    assert decoder.carried_state().position == eager_state.position
    assert torch.equal(generate(model, prompt, 12, greedy=True, cuda_graph=True), want)
