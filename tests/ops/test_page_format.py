"""PageFormat.store is the inverse of PageFormat.read for every page order (token-major, dimension-major, any
permutation a kernel uses) and for fp8 byte caches."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.ops.page_format import PageFormat, dequantize, quantize

PAGE, D = 8, 4


def _formats() -> dict[str, PageFormat]:
    g = torch.Generator().manual_seed(3)
    shuffled = PageFormat(PAGE, D, torch.randperm(PAGE * D, generator=g), torch.randperm(PAGE * D, generator=g))
    return {"token": PageFormat.token_major(PAGE, D), "dim": PageFormat.dim_major(PAGE, D), "shuffled": shuffled}


@pytest.mark.parametrize("name", ["token", "dim", "shuffled"])
def test_store_then_read_gives_the_values_back(name):
    fmt = _formats()[name]
    view = torch.zeros(3, 2 * PAGE, D)
    slots = torch.tensor([PAGE + 5, 2, 2 * PAGE + 7, PAGE])
    key, value = torch.randn(4, D), torch.randn(4, D)
    fmt.store(view, slots, key, value)
    k, v = fmt.read(view, torch.tensor([[0, 1, 2]]))
    assert torch.equal(k[0, slots], key) and torch.equal(v[0, slots], value)
    untouched = torch.ones(3 * PAGE, dtype=torch.bool)
    untouched[slots] = False
    assert not k[0, untouched].any() and not v[0, untouched].any()  # nothing else written


def test_store_in_the_wrong_order_is_read_back_wrong():
    fmt = _formats()
    view = torch.zeros(1, 2 * PAGE, D)
    key = torch.randn(PAGE, D)
    fmt["dim"].store(view, torch.arange(PAGE), key, key)
    assert not torch.equal(fmt["token"].read(view, torch.tensor([[0]]))[0][0], key)


@pytest.mark.parametrize("quant", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_bytes_store_and_dequantize(quant):
    fmt = PageFormat(PAGE, D, _formats()["dim"].key_index, None, quant)
    view = torch.zeros(1, 2 * PAGE, D, dtype=torch.uint8)
    key, value = torch.randn(PAGE, D), torch.randn(PAGE, D)
    fmt.store(view, torch.arange(PAGE), quantize(key, quant, 0.5), quantize(value, quant, 2.0))
    k, v = fmt.read(view, torch.tensor([[0]]), (0.5, 2.0))
    assert torch.equal(k[0], dequantize(quantize(key, quant, 0.5), quant, 0.5, torch.float32))
    assert torch.equal(v[0], dequantize(quantize(value, quant, 2.0), quant, 2.0, torch.float32))


def test_region_cells_address_every_layers_pages_of_one_allocation():
    """Layer-outer (vLLM's LBHNC: [L, blocks, H, page, 2D]) and block-outer ([blocks, L, ...]) allocations: cell c of
    block b in the region is cell c % H of layer c // H's view of block b, whatever order the views come in."""
    import pytest

    from moa_vllm.ops.page_format import cells, region_cells

    layers, blocks, heads, page, d = 3, 5, 2, 4, 8
    for outer in ("layer", "block"):
        shape = (layers, blocks) if outer == "layer" else (blocks, layers)
        backing = torch.arange(layers * blocks * heads * page * 2 * d, dtype=torch.float32)
        backing = backing.view(*shape, heads, page, 2 * d)
        views = list(backing.unbind(0 if outer == "layer" else 1))
        region, cell_map = region_cells(views[::-1])
        assert (cell_map.heads, cell_map.layers) == (heads, layers)
        for b in range(blocks):
            for c in range(layers * heads):
                cell = int(cell_map.cell(torch.tensor(b), torch.tensor(c)))
                assert torch.equal(region[cell], cells(views[c // heads][b : b + 1])[c % heads]), (outer, b, c)
    backing = torch.zeros(4, blocks, heads, page, 2 * d)
    with pytest.raises(RuntimeError, match="evenly spaced"):
        region_cells([backing[0], backing[1], backing[3]])
