"""The shared pieces of a batched forward pass (dpnle.batching, dpnle.arch.register_site_hook),
each checked against a construction written out by hand."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from dpnle.arch import architecture, register_site_hook
from dpnle.batching import (
    add_special_tokens_for,
    edit_context,
    left_pad,
    length_sorted_batches,
    positions_from_mask,
    right_pad,
)

ROWS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [], [14, 15]]


def _numpy_padded(rows, pad, left):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        for j, token in enumerate(r):
            column = width - len(r) + j if left else j
            ids[i, column] = token
            mask[i, column] = 1
    return ids, mask


@pytest.mark.parametrize("pad_fn, left", [(left_pad, True), (right_pad, False)])
def test_padding_matches_a_numpy_construction(pad_fn, left):
    ids, mask = pad_fn(ROWS, pad_id=0)
    want_ids, want_mask = _numpy_padded(ROWS, 0, left)
    assert ids.dtype == mask.dtype == torch.int64
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(mask.numpy(), want_mask)
    # Tuples are rows too, and the pad id is whatever is asked for.
    ids, _ = pad_fn([tuple(r) for r in ROWS], pad_id=99)
    np.testing.assert_array_equal(ids.numpy(), _numpy_padded(ROWS, 99, left)[0])


def test_left_padding_ends_every_row_at_the_last_column_on_the_device():
    ids, mask = left_pad([[1, 2], [3]], pad_id=7, device="cpu")
    assert ids.device.type == "cpu"
    assert ids.tolist() == [[1, 2], [7, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[1, 2], [3]], pad_id=7)
    assert ids.tolist() == [[1, 2], [3, 7]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = right_pad([(), ()], pad_id=7)  # no continuation at all: zero columns
    assert ids.shape == mask.shape == (2, 0)


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    for start in (0, 4):
        want = []
        for row in mask.tolist():
            # A real token: how many real tokens precede it. Padding: the last real position
            # before it (start when there is none).
            before = [sum(row[:j]) for j in range(len(row))]
            want.append([start + (n if m else max(n - 1, 0)) for n, m in zip(before, row, strict=True)])
        assert positions_from_mask(mask, start=start).tolist() == want
    # The position a left-padded row's last token gets is its length - 1, as unpadded.
    _, mask = left_pad(ROWS[:3], pad_id=0)
    assert positions_from_mask(mask)[:, -1].tolist() == [len(r) - 1 for r in ROWS[:3]]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 100])
def test_length_sorted_batches_match_sorted(batch_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, size=23).tolist()  # many ties
    for descending in (True, False):
        sign = -1 if descending else 1
        want = sorted(range(len(lengths)), key=lambda i: (sign * lengths[i], i))
        batches = length_sorted_batches(lengths, batch_size, descending=descending)
        assert [int(i) for b in batches for i in b] == want
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        assert 1 <= len(batches[-1]) <= batch_size
    assert [b.tolist() for b in length_sorted_batches(lengths, batch_size)] == [
        b.tolist() for b in length_sorted_batches(np.asarray(lengths), batch_size)
    ]


def test_length_sorted_batches_compare_tuples_in_order():
    keys = [(3, 1), (1, 4), (3, 0), (1, 4), (2, 9), (1, 2)]
    want = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    assert [int(i) for b in length_sorted_batches(keys, 4, descending=False) for i in b] == want
    want = sorted(range(len(keys)), key=lambda i: (-keys[i][0], -keys[i][1], i))
    assert [int(i) for b in length_sorted_batches(keys, 4) for i in b] == want


def test_length_sorted_batches_edge_cases():
    assert length_sorted_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1, 2], 0)


def test_special_tokens_are_added_only_without_a_chat_template():
    assert add_special_tokens_for(SimpleNamespace(chat_template="{{ bos_token }}{{ messages }}")) is False
    assert add_special_tokens_for(SimpleNamespace(chat_template=None)) is True
    assert add_special_tokens_for(SimpleNamespace(chat_template="")) is True
    assert add_special_tokens_for(SimpleNamespace()) is True


def test_edit_context_passes_the_prompt_length():
    calls = []

    class Edit:
        def apply(self, model, prompt_length=None):
            calls.append((model, prompt_length))
            return nullcontext("handle")

    with edit_context(Edit(), "model", 12) as handle:
        assert handle == "handle"
    assert calls == [("model", 12)]
    with edit_context(None, "model", 12) as handle:
        assert handle is None


def _reference_module(arch, site, layer):
    sites = arch.layers[layer]
    return {"mlp": sites.output_projection, "gate": sites.activation, "resid": sites.layer}[site]


@pytest.mark.parametrize("builder, site", [(tiny_llama, "mlp"), (tiny_llama, "gate"), (tiny_llama, "resid"),
                                           (tiny_gpt2, "mlp"), (tiny_gpt2, "resid")])
def test_site_hook_reads_and_replaces_what_a_hand_written_hook_does(builder, site):
    model, _ = builder()
    arch = architecture(model)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    module = _reference_module(arch, site, 1)

    def value_of(args, output):
        if site == "mlp":
            return args[0]
        return output if torch.is_tensor(output) else output[0]

    expected = {}
    if site == "mlp":
        grab = module.register_forward_pre_hook(lambda m, a: expected.__setitem__("x", a[0].clone()))
    else:
        grab = module.register_forward_hook(lambda m, a, o: expected.__setitem__("x", value_of(a, o).clone()))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    grab.remove()

    seen = []
    handle = register_site_hook(arch, site, 1, lambda hidden: seen.append(hidden.clone()))
    with torch.no_grad():
        read = model(input_ids=ids).logits
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], expected["x"])
    assert torch.equal(read, plain)  # a function returning None changes nothing

    # A returned tensor replaces the value, as a hand-written hook returning it would.
    if site == "mlp":
        by_hand = module.register_forward_pre_hook(lambda m, a: (a[0] * 2 + 1, *a[1:]))
    else:

        def double(m, a, o):
            return o * 2 + 1 if torch.is_tensor(o) else (o[0] * 2 + 1, *o[1:])

        by_hand = module.register_forward_hook(double)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    by_hand.remove()
    handle = register_site_hook(arch, site, 1, lambda hidden: hidden * 2 + 1)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    handle.remove()
    assert not torch.equal(want, plain)
    assert torch.equal(got, want)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
