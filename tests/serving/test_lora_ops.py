"""The grouped LoRA ops compute what vLLM's own CPU ops compute (they only skip the per-token weight copies), in
float32, in bf16, and in the mixed precision vLLM's CPU wrapper uses for a bf16 model (bf16 activations and
weights, a float32 shrink buffer), on both kinds of CPU (native bf16 or not). Each case is also checked against a
float64 reference, so "matches the stock op" cannot hide a shared error, and the fast path is required to run
(a silent fallback to the stock op would pass an equality test while fixing nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from tuneloop.serving import lora_ops

stock = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, IN, RANK, OUT, TOKENS = 4, 48, 8, 40, 12


@dataclass(frozen=True)
class Precision:
    """dtypes of activations/weights, of the shrink buffer, of the layer output; and the tolerance."""

    name: str
    activations: torch.dtype
    buffer: torch.dtype
    tolerance: float


PRECISIONS = [Precision("fp32", torch.float32, torch.float32, 1e-4),
              Precision("bf16", torch.bfloat16, torch.bfloat16, 0.08),
              Precision("bf16+fp32 buffer (vLLM CPU, bf16 model)", torch.bfloat16, torch.float32, 0.08)]


@pytest.fixture(params=[False, True], ids=["cpu-without-native-bf16", "cpu-with-native-bf16"])
def cpu_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(lora_ops, "_native_low_precision", lambda: request.param)
    return bool(request.param)


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if the grouped op hands the call to vLLM's stock op."""
    def refuse(name: str):  # noqa: ANN202
        raise AssertionError(f"grouped {name} fell back to the stock op")

    monkeypatch.setattr(lora_ops, "_stock", refuse)
    yield


def _tensors(precision: Precision, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=generator).to(precision.activations)
    a = (torch.randn(SLOTS, 1, RANK, IN, generator=generator) / IN ** 0.5).to(precision.activations)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=generator).to(precision.activations)
    return x, a, b


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: list[int], scale: float,
               base: torch.Tensor) -> torch.Tensor:
    out = base.double().clone()
    for row, slot in enumerate(indices):
        if slot >= 0:
            out[row] += scale * (x[row].double() @ a[slot, 0].double().t()) @ b[slot, 0].double().t()
    return out


def _layer(ops, x, a, b, indices, precision: Precision, add_inputs: bool = True) -> torch.Tensor:
    buffer = torch.full((TOKENS, RANK), float("nan"), dtype=precision.buffer)
    ops.bgmv_shrink(x, a, buffer, indices, 0.5)
    out = torch.ones(TOKENS, OUT, dtype=precision.activations)
    ops.bgmv_expand(buffer, b, out, indices, add_inputs)
    return out


INDICES = {"one-adapter": [2] * TOKENS, "two-adapters": [1, 3] * 6, "interleaved": [0, 1, 2, 3] * 3,
           "runs": [3, 3, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3]}
# Not compared with the stock op: vLLM's indexes slot -1, the last slot, for a token without an adapter.
WITH_NO_ADAPTER = {"three-and-no-adapter": [0, -1, 1, 2, -1, 0] * 2}


@pytest.mark.parametrize("precision", PRECISIONS, ids=[p.name for p in PRECISIONS])
@pytest.mark.parametrize("pattern", list(INDICES))
def test_shrink_then_expand_matches_vllm_and_the_exact_result(precision, pattern, cpu_kind, no_fallback):
    x, a, b = _tensors(precision)
    index = torch.tensor(INDICES[pattern])
    exact = _reference(x, a, b, INDICES[pattern], 0.5, torch.ones(TOKENS, OUT))
    ours = _layer(lora_ops, x, a, b, index, precision)
    assert ours.dtype == precision.activations
    theirs = _layer(stock, x, a, b, index, precision)
    scale = exact.abs().max().item()
    ours_error = (ours.double() - exact).abs().max().item() / scale
    stock_error = (theirs.double() - exact).abs().max().item() / scale
    assert ours_error <= max(2 * stock_error, precision.tolerance / 10), (ours_error, stock_error)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=precision.tolerance,
                               atol=precision.tolerance * scale)


@pytest.mark.parametrize("pattern", ["interleaved", "three-and-no-adapter"])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_three_or_more_adapters_in_a_call_take_the_stacked_two_gemm_path(pattern, add_inputs, no_fallback,
                                                                         monkeypatch):
    """Many tasks on one engine mix adapters in a step: such a call must not loop over its adapters (the loop's
    grouping is refused here) and must still give every token its own adapter's delta, and none to a token
    without one."""
    def no_loop(indices):  # noqa: ANN001, ANN202
        raise AssertionError("the per-adapter loop ran for a call with three or more adapters")

    monkeypatch.setattr(lora_ops, "_adapter_groups", no_loop)
    precision = PRECISIONS[0]
    x, a, b = _tensors(precision, seed=3)
    indices = {**INDICES, **WITH_NO_ADAPTER}[pattern]
    index = torch.tensor(indices)
    base = torch.ones(TOKENS, OUT) if add_inputs else torch.zeros(TOKENS, OUT)
    exact = _reference(x, a, b, indices, 0.5, base)
    ours = _layer(lora_ops, x, a, b, index, precision, add_inputs=add_inputs)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    unadapted = [row for row, slot in enumerate(indices) if slot < 0]
    assert all(torch.equal(ours[row], base[row]) for row in unadapted)


@pytest.mark.parametrize("precision", PRECISIONS, ids=[p.name for p in PRECISIONS])
def test_expand_without_add_overwrites(precision, cpu_kind, no_fallback):
    x, a, b = _tensors(precision, seed=1)
    index = torch.tensor(INDICES["runs"])
    exact = _reference(x, a, b, INDICES["runs"], 0.5, torch.zeros(TOKENS, OUT))
    ours = _layer(lora_ops, x, a, b, index, precision, add_inputs=False)
    torch.testing.assert_close(ours.double(), exact, rtol=precision.tolerance,
                               atol=precision.tolerance * exact.abs().max().item())


def test_three_dimensional_weights_match(no_fallback):
    x, a, b = _tensors(PRECISIONS[0])
    a, b = a.squeeze(1), b.squeeze(1)
    index = torch.tensor([1] * TOKENS)
    ours = _layer(lora_ops, x, a, b, index, PRECISIONS[0])
    torch.testing.assert_close(ours, _layer(stock, x, a, b, index, PRECISIONS[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", PRECISIONS, ids=[p.name for p in PRECISIONS])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_matches_vllm(precision, add_inputs, cpu_kind, no_fallback):
    _, _, b = _tensors(precision)
    x = torch.randn(TOKENS, RANK, generator=torch.Generator().manual_seed(2)).to(precision.buffer)
    index = torch.tensor([0, 1] * (TOKENS // 2))
    results = []
    for ops in (stock, lora_ops):
        out = torch.ones(TOKENS, 3 * OUT, dtype=precision.activations)
        ops.bgmv_expand_slice(x, b, out, index, OUT, OUT, add_inputs)
        results.append(out.double())
    torch.testing.assert_close(results[1], results[0], rtol=precision.tolerance,
                               atol=precision.tolerance * results[0].abs().max().item())
    assert torch.equal(results[1][:, :OUT], torch.ones(TOKENS, OUT, dtype=torch.float64)), "other slices untouched"


@pytest.mark.parametrize("precision", PRECISIONS, ids=[p.name for p in PRECISIONS])
def test_prefill_ops_match_vllm(precision, cpu_kind, no_fallback):
    x, a, b = _tensors(precision, seed=3)
    seq_lens, adapters = torch.tensor([5, 7]), torch.tensor([3, 1])
    exact = _reference(x, a, b, [3] * 5 + [1] * 7, 1.0, torch.zeros(TOKENS, 2 * OUT)[:, OUT:])
    results = []
    for ops in (stock, lora_ops):
        shrunk = torch.zeros(TOKENS, RANK, dtype=precision.buffer)
        ops.sgmv_shrink(x, a, shrunk, None, seq_lens, adapters, 2, 7, TOKENS, 1.0)
        out = torch.zeros(TOKENS, 2 * OUT, dtype=precision.activations)
        ops.sgmv_expand_slice(shrunk, b, out, None, seq_lens, adapters, 2, 7, TOKENS, OUT, OUT, True)
        results.append(out[:, OUT:].double())
    scale = exact.abs().max().item()
    torch.testing.assert_close(results[1], results[0], rtol=precision.tolerance, atol=precision.tolerance * scale)
    torch.testing.assert_close(results[1], exact, rtol=precision.tolerance, atol=precision.tolerance * scale)


def test_tokens_without_adapter_get_no_delta_even_when_the_last_slot_is_used(no_fallback):
    x, a, b = _tensors(PRECISIONS[0])
    index = torch.tensor([-1] * 6 + [0] * 6)
    buffer = torch.full((TOKENS, RANK), float("nan"))
    lora_ops.bgmv_shrink(x, a, buffer, index, 0.5)
    out = torch.ones(TOKENS, OUT)
    lora_ops.bgmv_expand(buffer, b, out, index, True)
    assert torch.equal(buffer[:6], torch.zeros(6, RANK))
    assert torch.equal(out[:6], torch.ones(6, OUT))
    torch.testing.assert_close(out[6:], 1 + 0.5 * (x[6:] @ a[0, 0].t()) @ b[0, 0].t())


def test_mixed_precision_multiplies_in_bf16_only_where_the_cpu_has_it(monkeypatch):
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    monkeypatch.setattr(lora_ops, "_native_low_precision", lambda: True)
    assert lora_ops.compute_dtype(bf16, bf16, fp32) == torch.bfloat16
    monkeypatch.setattr(lora_ops, "_native_low_precision", lambda: False)
    assert lora_ops.compute_dtype(bf16, bf16, fp32) == torch.float32
    assert lora_ops.compute_dtype(fp32, fp32, fp32) == torch.float32


def test_unusual_shapes_fall_back_to_vllm():
    _, _, b = _tensors(PRECISIONS[0])
    x = torch.randn(1, RANK, generator=torch.Generator().manual_seed(4))  # one row broadcast: only stock handles it
    out_stock, out_ours = torch.zeros(TOKENS, OUT), torch.zeros(TOKENS, OUT)
    stock.bgmv_expand(x, b, out_stock, torch.tensor([0]), True)
    lora_ops.bgmv_expand(x, b, out_ours, torch.tensor([0]), True)
    torch.testing.assert_close(out_ours, out_stock)
