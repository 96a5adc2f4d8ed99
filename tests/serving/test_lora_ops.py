"""The grouped LoRA ops compute what vLLM's own CPU ops compute (they only skip the per-token weight copies)."""

from __future__ import annotations

import pytest
import torch

from serving import lora_ops

stock = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, IN, RANK, OUT, TOKENS = 4, 48, 8, 40, 12


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(SLOTS, 1, RANK, IN, generator=generator),
            torch.randn(SLOTS, 1, OUT, RANK, generator=generator))


def _run(ops, x, a, b, indices, add_inputs=True):
    shrunk = torch.full((TOKENS, RANK), float("nan"))
    ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
    out = torch.ones(TOKENS, OUT)
    ops.bgmv_expand(shrunk, b, out, indices, add_inputs)
    return shrunk, out


@pytest.mark.parametrize("indices", [[2] * TOKENS, [0, 1, 2, 3] * 3, [3, 3, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3]],
                         ids=["one-adapter", "interleaved", "runs"])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_shrink_expand_match_vllm(weights, indices, add_inputs):
    a, b = weights
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(1))
    index = torch.tensor(indices)
    expected = _run(stock, x, a, b, index, add_inputs)
    got = _run(lora_ops, x, a, b, index, add_inputs)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_three_dimensional_weights_match(weights):
    a, b = (w.squeeze(1) for w in weights)
    x = torch.randn(TOKENS, IN)
    index = torch.tensor([1] * TOKENS)
    torch.testing.assert_close(_run(lora_ops, x, a, b, index)[1], _run(stock, x, a, b, index)[1])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_matches_vllm(weights, add_inputs):
    _, b = weights
    x = torch.randn(TOKENS, RANK)
    index = torch.tensor([0, 1] * (TOKENS // 2))
    expected, got = torch.ones(TOKENS, 3 * OUT), torch.ones(TOKENS, 3 * OUT)
    stock.bgmv_expand_slice(x, b, expected, index, OUT, OUT, add_inputs)
    lora_ops.bgmv_expand_slice(x, b, got, index, OUT, OUT, add_inputs)
    torch.testing.assert_close(got, expected)


def test_prefill_ops_match_vllm(weights):
    a, b = weights
    x = torch.randn(TOKENS, IN)
    seq_lens, adapters = torch.tensor([5, 7]), torch.tensor([3, 1])
    results = []
    for ops in (stock, lora_ops):
        shrunk = torch.zeros(TOKENS, RANK)
        ops.sgmv_shrink(x, a, shrunk, None, seq_lens, adapters, 2, 7, TOKENS, 1.0)
        out = torch.zeros(TOKENS, 2 * OUT)
        ops.sgmv_expand_slice(shrunk, b, out, None, seq_lens, adapters, 2, 7, TOKENS, OUT, OUT, True)
        results.append(out)
    torch.testing.assert_close(results[1], results[0])


def test_tokens_without_adapter_get_no_delta_even_when_the_last_slot_is_used(weights):
    a, b = weights
    x = torch.randn(TOKENS, IN)
    index = torch.tensor([-1] * 6 + [0] * 6)
    shrunk, out = _run(lora_ops, x, a, b, index)
    assert torch.equal(shrunk[:6], torch.zeros(6, RANK))
    assert torch.equal(out[:6], torch.ones(6, OUT))
    torch.testing.assert_close(out[6:], 1 + 0.5 * (x[6:] @ a[0, 0].t()) @ b[0, 0].t())


def test_unusual_shapes_fall_back_to_vllm(weights):
    a, b = weights
    x = torch.randn(1, RANK)  # one row broadcast into many: a case only the stock op handles
    out_stock, out_ours = torch.zeros(TOKENS, OUT), torch.zeros(TOKENS, OUT)
    stock.bgmv_expand(x, b, out_stock, torch.tensor([0]), True)
    lora_ops.bgmv_expand(x, b, out_ours, torch.tensor([0]), True)
    torch.testing.assert_close(out_ours, out_stock)
