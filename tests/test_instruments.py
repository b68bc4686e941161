"""Questionnaire scorers and the validity check, on fake models whose answer probabilities are
set by hand, on two tokenizers (one with "(A" as a single token, one without), and on a tiny
random Llama."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from dpnle import instruments as ins
from dpnle.instruments import IPIP_SCALE, Instrument, InstrumentItem
from dpnle.pairs import render_prompt

# ---------------------------------------------------------------------------------------------
# Two small byte-level BPE tokenizers

_COMMON_MERGES = [
    ("Ġ", "A"),
    ("Ġ", "B"),
    ("Ġ", "C"),
    ("Ġ", "D"),
    ("Ġ", "E"),
    ("A", "B"),  # "AB": starts with A but is not the answer A
    ("Y", "e"),
    ("Ye", "s"),
    ("Ġ", "Yes"),
    ("y", "e"),
    ("ye", "s"),
    ("N", "o"),
    ("Ġ", "No"),
    ("Ġ", "("),
]
_PAREN_MERGES = [("(", "A"), ("(", "B"), ("(", "C"), ("(", "D"), ("(", "E"), ("Ġ", "(A")]


def _bpe_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # No regex split, so merges may cross punctuation ("(A") the way Qwen's pre-tokenizer allows.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok_merged() -> PreTrainedTokenizerFast:
    return _bpe_tokenizer(_COMMON_MERGES + _PAREN_MERGES)


@pytest.fixture(scope="module")
def tok_split() -> PreTrainedTokenizerFast:
    return _bpe_tokenizer(_COMMON_MERGES)


def _id(tok: PreTrainedTokenizerFast, piece: str) -> int:
    token_id = tok.convert_tokens_to_ids(piece)
    assert token_id is not None and token_id != tok.unk_token_id, piece
    return int(token_id)


# ---------------------------------------------------------------------------------------------
# Fake models


def _logits_from(probs: dict[int, float], vocab: int, filler: int) -> torch.Tensor:
    """Log-probabilities with ``probs`` on chosen ids, the rest on ``filler`` (a token that is
    no answer), zero elsewhere."""
    p = torch.zeros(vocab, dtype=torch.float64)
    for i, v in probs.items():
        p[i] = v
    p[filler] += 1.0 - p.sum()
    return p.log().float()


class FakeLM(nn.Module):
    """The last position's next-token distribution is ``last(text of the row)``; every earlier
    position's is ``earlier`` (the position that predicts the first answer token is the one
    before the appended "(" in the likert scorer)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        last: Callable[[str], dict[int, float]],
        earlier: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.last = last
        self.filler = _id(tokenizer, "z")
        self.earlier = _logits_from(earlier or {}, self.vocab, self.filler)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        batch, width = input_ids.shape
        logits = self.earlier.expand(batch, width, self.vocab).clone()
        for b in range(batch):
            ids = input_ids[b][attention_mask[b].bool()] if attention_mask is not None else input_ids[b]
            text = self.tokenizer.decode(ids.tolist())
            logits[b, -1] = _logits_from(self.last(text), self.vocab, self.filler)
        return SimpleNamespace(logits=logits)


def _items() -> Instrument:
    rows = [
        ("t1", "extraversion", 1, "Love large parties"),
        ("t2", "extraversion", -1, "Avoid crowds"),
        ("t3", "extraversion", 1, "Talk to a lot of different people at parties"),
        ("t4", "extraversion", -1, "Keep in the background"),
        ("t5", "extraversion", 1, "Make friends easily"),
        ("t6", "extraversion", -1, "Prefer to be alone"),
        ("t7", "openness", 1, "Have a vivid imagination"),
        ("t8", "openness", -1, "Avoid philosophical discussions"),
    ]
    items = tuple(InstrumentItem(i, d, k, t, ins.ipip_statement(t)) for i, d, k, t in rows)
    return Instrument("toy", items, IPIP_SCALE)


# ---------------------------------------------------------------------------------------------
# Token sets and statements


def test_tokenizers_differ_on_paren_letter(tok_merged, tok_split):
    assert len(tok_merged("(A", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok_split("(A", add_special_tokens=False)["input_ids"]) == 2


def test_option_token_sets(tok_merged, tok_split):
    letters = ("A", "B", "C", "D", "E")
    merged = ins.option_token_ids(tok_merged, letters)
    split = ins.option_token_ids(tok_split, letters)
    assert set(merged[0]) == {_id(tok_merged, p) for p in ("A", "ĠA", "(A", "Ġ(A")}
    assert set(merged[1]) == {_id(tok_merged, p) for p in ("B", "ĠB", "(B")}
    assert set(split[0]) == {_id(tok_split, p) for p in ("A", "ĠA")}
    assert _id(tok_merged, "AB") not in merged[0] and _id(tok_merged, "a") not in merged[0]
    yes, no = ins.option_token_ids(tok_merged, ("Yes", "No"), case_sensitive=False)
    assert set(yes) == {_id(tok_merged, p) for p in ("Yes", "ĠYes", "yes")}
    assert set(no) == {_id(tok_merged, p) for p in ("No", "ĠNo")}
    assert set(ins.open_paren_token_ids(tok_split)) == {_id(tok_split, "("), _id(tok_split, "Ġ(")}


@pytest.mark.parametrize(
    "text, statement",
    [
        ("Have a vivid imagination", "I have a vivid imagination."),
        ("Like order.", "I like order."),
        ("Am easily intimidated.", "I am easily intimidated."),
        ("Interested in many things.", "I am interested in many things."),
        ("Don't like art", "I don't like art."),
    ],
)
def test_ipip_statement(text, statement):
    assert ins.ipip_statement(text) == statement


def test_persona_prefix_and_messages():
    item = _items().items[0]
    msg = ins.build_message(item, "likert", IPIP_SCALE, persona="A party animal.")
    assert msg.startswith(ins.PERSONA_PREFIX.format(persona="A party animal."))
    assert '"I love large parties."' in msg and "(E) Very Inaccurate" in msg
    assert ins.build_message(item, "statement", IPIP_SCALE) == ins.STATEMENT_REQUEST
    assert "something you would say" in ins.build_message(item, "yesno", IPIP_SCALE)


# ---------------------------------------------------------------------------------------------
# Hand-computed scores


def test_likert_hand_computed_merged_tokenizer(tok_merged):
    t = tok_merged
    # Answer tokens at the first answer position; "(" is the appended token, so the row's last
    # position predicts what follows "(".
    first = {
        _id(t, "A"): 0.10,
        _id(t, "ĠA"): 0.05,
        _id(t, "(A"): 0.10,
        _id(t, "Ġ(A"): 0.05,
        _id(t, "B"): 0.20,
        _id(t, "C"): 0.05,
        _id(t, "ĠD"): 0.05,
        _id(t, "E"): 0.05,
        _id(t, "AB"): 0.20,
        _id(t, "a"): 0.10,  # not answers
    }
    after_paren = {_id(t, "A"): 0.5}  # ignored: no mass on a bare "(" at the first position
    model = FakeLM(t, lambda _text: after_paren, earlier=first)
    frame = ins.score_items(model, t, _items(), "likert", dimensions=["openness"])
    # A .30, B .20, C .05, D .05, E .05 -> renormalized over .65
    p = np.array([0.30, 0.20, 0.05, 0.05, 0.05]) / 0.65
    expected = float(p @ [5, 4, 3, 2, 1])
    plus, minus = frame.iloc[0], frame.iloc[1]
    assert plus["key"] == 1 and minus["key"] == -1
    assert plus["raw"] == pytest.approx(expected, abs=1e-5)
    assert plus["score"] == pytest.approx(expected, abs=1e-5)
    assert minus["score"] == pytest.approx(6 - expected, abs=1e-5)
    assert plus["option_probs"] == pytest.approx(list(p), abs=1e-6)
    assert plus["option_mass"] == pytest.approx(0.65, abs=1e-6)


def test_likert_hand_computed_split_tokenizer(tok_split):
    t = tok_split
    # SmolLM2-style: the answer opens with a separate "(" half of the time.
    first = {_id(t, "("): 0.3, _id(t, "Ġ("): 0.1, _id(t, "A"): 0.2, _id(t, "ĠE"): 0.1}
    after_paren = {_id(t, "B"): 0.5, _id(t, "C"): 0.25, _id(t, "A"): 0.25}
    model = FakeLM(t, lambda _text: after_paren, earlier=first)
    frame = ins.score_items(model, t, _items(), "likert", dimensions=["openness"])
    per_option = np.array([0.2 + 0.4 * 0.25, 0.4 * 0.5, 0.4 * 0.25, 0.0, 0.1])
    p = per_option / per_option.sum()
    expected = float(p @ [5, 4, 3, 2, 1])
    assert frame["raw"].tolist() == pytest.approx([expected, expected], abs=1e-5)
    assert frame["score"].tolist() == pytest.approx([expected, 6 - expected], abs=1e-5)
    assert frame["option_mass"].iloc[0] == pytest.approx(per_option.sum(), abs=1e-6)


def test_yesno_hand_computed(tok_merged):
    t = tok_merged
    probs = {_id(t, "Yes"): 0.2, _id(t, "ĠYes"): 0.1, _id(t, "yes"): 0.1, _id(t, "ĠNo"): 0.3}
    model = FakeLM(t, lambda _text: probs)
    frame = ins.score_items(model, t, _items(), "yesno", dimensions=["openness"])
    assert frame["raw"].tolist() == pytest.approx([4 / 7, 4 / 7], abs=1e-5)
    assert frame["score"].tolist() == pytest.approx([4 / 7, 3 / 7], abs=1e-5)
    assert frame["option_mass"].iloc[0] == pytest.approx(0.7, abs=1e-6)


def test_statement_equals_hand_loop():
    model, tok = tiny_llama()
    inst = _items()
    frame = ins.score_items(model, tok, inst, "statement", batch_size=3, persona="Someone.")
    prompt = render_prompt(tok, ins.build_message(inst.items[0], "statement", inst.scale, "Someone."))
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for item, row in zip(inst.items, frame.itertuples(), strict=True):
        stmt_ids = tok(item.statement, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + stmt_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        total = sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(stmt_ids))
        mean = total / len(stmt_ids)
        assert row.n_tokens == len(stmt_ids)
        assert row.raw == pytest.approx(mean, abs=1e-4)
        assert row.score == pytest.approx(item.key * mean, abs=1e-4)


def _tiny_llama_on(tok: PreTrainedTokenizerFast) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("scorer", ins.SCORERS)
def test_batched_equals_unbatched(scorer, tok_split):
    # A tokenizer with whole "Yes" / "No" tokens (the byte-level helper tokenizer has none).
    tok = tok_split
    model = _tiny_llama_on(tok)
    inst = _items()
    one = ins.score_items(model, tok, inst, scorer, batch_size=1, persona="A quiet reader.")
    many = ins.score_items(model, tok, inst, scorer, batch_size=5, persona="A quiet reader.")
    again = ins.score_items(model, tok, inst, scorer, batch_size=5, persona="A quiet reader.")
    assert np.isfinite(many["raw"]).all()
    np.testing.assert_allclose(many["raw"], one["raw"], atol=1e-5)
    pd.testing.assert_frame_equal(many, again)  # deterministic


def test_limit_and_dimensions(tok_merged):
    model = FakeLM(tok_merged, lambda _text: {})
    frame = ins.score_items(model, tok_merged, _items(), "yesno", limit=1)
    assert frame["item_id"].tolist() == ["t1", "t7"]  # first item of each dimension
    with pytest.raises(ValueError, match="no items"):
        ins.score_items(model, tok_merged, _items(), "yesno", dimensions=["neuroticism"])


def test_edit_wraps_the_forward_passes(tok_merged):
    entered: list[bool] = []

    class RecordingEdit:
        def apply(self, model):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                entered.append(True)
                yield

            return ctx()

    model = FakeLM(tok_merged, lambda _text: {})
    ins.score_items(model, tok_merged, _items(), "likert", edit=RecordingEdit())
    assert entered == [True]


def test_dimension_scores_and_scale_range():
    assert ins.scale_range("ipip120", "likert") == (1.0, 5.0)
    assert ins.scale_range("pvq40", "likert") == (1.0, 6.0)
    assert ins.scale_range("ipip300-test", "yesno") == (0.0, 1.0)
    assert all(math.isnan(x) for x in ins.scale_range("ipip120", "statement"))
    frame = pd.DataFrame(
        {
            "instrument": "ipip120",
            "scorer": "likert",
            "item_id": ["a", "b", "c"],
            "dimension": ["openness", "openness", "extraversion"],
            "key": [1, -1, 1],
            "raw": [4.0, 2.0, 3.0],
            "score": [4.0, 4.0, 3.0],
            "scale_min": 1.0,
            "scale_max": 5.0,
        }
    )
    out = ins.dimension_scores(frame).set_index("dimension")
    assert out.loc["openness", "mean"] == 4.0 and out.loc["openness", "n"] == 2
    assert out.loc["openness", "normalized"] == pytest.approx(0.75)
    assert out.loc["openness", "se"] == 0.0 and math.isnan(out.loc["extraversion", "se"])


# ---------------------------------------------------------------------------------------------
# Validity check

_PERSONAS = {
    "extraversion": (
        ["HIGHPOLE one.", "HIGHPOLE two.", "HIGHPOLE three."],
        ["LOWPOLE one.", "LOWPOLE two.", "LOWPOLE three."],
    )
}


def _letter_probs(tok: PreTrainedTokenizerFast, letter: str, strength: float) -> dict[int, float]:
    # Most mass on one letter, the rest on the middle option.
    return {_id(tok, letter): strength, _id(tok, "C"): 0.9 - strength}


def test_validity_flags_a_blind_model(tok_split):
    fixed = _letter_probs(tok_split, "B", 0.6)
    model = FakeLM(tok_split, lambda _text: fixed, earlier={_id(tok_split, "("): 0.9})
    out = ins.validity_check(model, tok_split, _items(), "likert", ["extraversion"], _PERSONAS, n_personas=2)
    row = out.iloc[0]
    assert row["n_items"] == 6 and row["n_personas"] == 2
    assert row["separation"] == pytest.approx(0.0, abs=1e-6)
    assert row["sign_p"] == 1.0
    assert bool(row["collapse"]) and not bool(row["passed"])


def test_validity_flags_level_only_model(tok_split):
    # The persona moves every answer up or down, whatever the item says: acquiescence.
    def last(text: str) -> dict[int, float]:
        strength = 0.5 + 0.05 * (len(text) % 7)
        return _letter_probs(tok_split, "A" if "HIGHPOLE" in text else "E", min(strength, 0.85))

    model = FakeLM(tok_split, last, earlier={_id(tok_split, "("): 0.9})
    row = ins.validity_check(model, tok_split, _items(), "likert", ["extraversion"], _PERSONAS).iloc[0]
    assert row["shift_plus"] > 1 and row["shift_minus"] > 1
    assert bool(row["collapse_testable"]) and bool(row["collapse"]) and not bool(row["passed"])


def test_validity_passes_a_persona_following_model(tok_split):
    plus_statements = [it.statement for it in _items().items if it.key > 0]

    def last(text: str) -> dict[int, float]:
        agrees = any(s in text for s in plus_statements) == ("HIGHPOLE" in text)
        strength = 0.5 + 0.05 * (len(text) % 7)  # item-to-item variation, so sd(diff) > 0
        return _letter_probs(tok_split, "A" if agrees else "E", min(strength, 0.85))

    model = FakeLM(tok_split, last, earlier={_id(tok_split, "("): 0.9})
    out = ins.validity_check(model, tok_split, _items(), "likert", ["extraversion"], _PERSONAS)
    row = out.iloc[0]
    assert row["n_up"] == 6 and row["cohens_d"] > ins.MIN_COHENS_D
    assert row["sign_p"] == pytest.approx(2 * 0.5**6)
    assert row["shift_plus"] > 0 > row["shift_minus"]
    assert row["raw_plus_high"] > row["raw_minus_high"] and row["raw_plus_low"] < row["raw_minus_low"]
    assert not bool(row["collapse"]) and bool(row["passed"])
    assert list(out.columns) == ins.VALIDITY_COLUMNS


# ---------------------------------------------------------------------------------------------
# The real embedded model


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["likert", "statement"])
def test_smollm2_ipip120_scores_are_finite(scorer, mirror_available):
    from dpnle.models import load_model

    loaded = load_model("smollm2-135m-instruct", fingerprint=False)
    frame = ins.score_items(loaded.model, loaded.tokenizer, "ipip120", scorer, limit=2)
    assert len(frame) == 10 and set(frame["dimension"]) == set(ins.load_instrument("ipip120").dimensions)
    assert np.isfinite(frame["score"]).all()
    if scorer == "likert":
        assert frame["score"].between(1, 5).all() and (frame["option_mass"] > 0.1).all()


def test_pvq_scale_six_options(tok_split):
    t = tok_split
    items = (
        InstrumentItem(
            "v1", "power", 1, "It is important to me to be rich.", "It is important to me to be rich."
        ),
    )
    inst = Instrument("toy-pvq", items, ins.PVQ_SCALE)
    msg = ins.build_message(items[0], "likert", inst.scale)
    assert "(F) Not like me at all" in msg and "A, B, C, D, E or F" in msg
    model = FakeLM(t, lambda _text: {}, earlier={_id(t, "A"): 0.25, _id(t, "F"): 0.75})
    row = ins.score_items(model, t, inst, "likert").iloc[0]
    assert row["raw"] == pytest.approx(0.25 * 6 + 0.75 * 1, abs=1e-5)
    assert (row["scale_min"], row["scale_max"]) == (1.0, 6.0)


def test_real_instruments_load(mirror_available):
    test_items = ins.load_instrument("ipip300-test")
    assert len(test_items.items) == 180 and len(test_items.dimensions) == 5
    assert len(ins.load_instrument("ipip120").items) == 120
    pvq = ins.load_instrument("pvq40")
    assert len(pvq.items) == 40 and len(pvq.dimensions) == 10
    assert all(item.key == 1 and item.statement.endswith((".", "!", "?")) for item in pvq.items)


# ---------------------------------------------------------------------------------------------
# shared prompt prefixes


def _rows_with_common_prefix(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 60, (14,), generator=g).tolist()
    return [head + torch.randint(3, 60, (n,), generator=g).tolist() for n in (2, 7, 4, 9)]


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_qwen2", "tiny_gpt2", "tiny_gemma3"])
@pytest.mark.parametrize("keep", [1, 3])
def test_shared_prefix_logits_equal_one_pass(builder, keep):
    import helpers

    model, tokenizer = getattr(helpers, builder)()
    rows = _rows_with_common_prefix()
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        one_pass = ins._last_logits(model, rows, pad, keep=keep)
        calls = []
        handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            shared = ins._last_logits(model, rows, pad, keep=keep, share_prefix=True)
        finally:
            handle.remove()
    torch.testing.assert_close(shared, one_pass, rtol=0, atol=2e-5)
    if builder == "tiny_gemma3":  # sliding-window cache layers: the one-pass forward, after one probe
        assert ins._shared_prefix_logits(model, rows, pad, keep) is None
    else:
        assert len(calls) == 2  # the prefix once, then the remainders


def test_shared_prefix_needs_a_long_enough_common_start():
    model, tokenizer = tiny_llama()
    rows = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 10, 11]]  # 4 tokens in common: below the minimum
    assert ins._common_prefix_length(rows) == 4
    assert ins._shared_prefix_logits(model, rows, tokenizer.pad_token_id, keep=1) is None
    assert ins._common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 3


def test_scores_with_an_edit_are_the_same_with_and_without_prefix_sharing(monkeypatch, tok_split):
    from test_edits import random_edit

    tokenizer = tok_split
    model = _tiny_llama_on(tokenizer)
    inst = _items()
    edit = random_edit(positions="all", scale=3.0, layers=(0, 1), width=64)
    results = {}
    for share in (False, True):
        real = ins._last_logits

        def forced(m, rows, pad, keep, share_prefix=False, _share=share, _real=real):
            return _real(m, rows, pad, keep, share_prefix=_share)

        monkeypatch.setattr(ins, "_last_logits", forced)
        results[share] = {
            scorer: ins.score_items(model, tokenizer, inst, scorer, edit=edit, persona="A calm, kind person.",
                                    batch_size=3)["raw"].to_numpy()
            for scorer in ("likert", "statement", "yesno")
        }
        monkeypatch.setattr(ins, "_last_logits", real)
    for scorer in results[False]:
        np.testing.assert_allclose(results[True][scorer], results[False][scorer], rtol=0, atol=2e-5, err_msg=scorer)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 6, 9])
def test_min_sign_test_p_is_the_all_one_side_binomial_p(n):
    from scipy import stats as sps

    expected = 1.0 if n == 0 else sps.binomtest(n, n, 0.5).pvalue
    assert ins.min_sign_test_p(n) == pytest.approx(expected)
    assert (ins.min_sign_test_p(n) < ins.SIGN_TEST_ALPHA) == (n >= 6)


def test_batches_never_cross_a_group_and_cover_every_row():
    lengths = [5, 9, 2, 7, 7, 3, 8, 1, 6]
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    batches = [list(b) for b in ins._batches(lengths, 2, groups)]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    for g in set(groups):  # longest first within a group
        rows = [i for b in batches for i in b if groups[i] == g]
        assert [lengths[i] for i in rows] == sorted((lengths[i] for i in rows), reverse=True)
    assert [list(b) for b in ins._batches(lengths, 4)] == [[1, 6, 3, 4], [8, 0, 5, 2], [7]]


def test_validity_verdict_works_on_scores_alone():
    # 4 items (2 plus-, 2 minus-keyed) x 2 high + 2 low personas on the IPIP 1..5 scale.
    keys = np.array([1, 1, -1, -1], dtype=np.float64)
    follows = np.array(
        [
            [5.0, 4.5, 1.5, 1.0],  # high personas: agree with plus-keyed items, disagree with minus-keyed
            [4.5, 4.0, 2.0, 1.0],
            [1.0, 2.0, 4.0, 5.0],  # low personas: the reverse
            [2.0, 1.5, 4.5, 4.5],
        ]
    )
    row = ins.validity_verdict(follows, keys, 2, "likert", 1.0, 5.0)
    # By hand: keyed = raw for plus-keyed items, 6 - raw for minus-keyed ones; mean per pole.
    keyed = np.where(keys > 0, follows, 6.0 - follows)
    diff = keyed[:2].mean(axis=0) - keyed[2:].mean(axis=0)
    assert row["separation"] == pytest.approx(diff.mean())
    assert row["separation_normalized"] == pytest.approx(diff.mean() / 4.0)
    assert row["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert (row["n_up"], row["n_down"], row["n_items"], row["n_plus"], row["n_minus"]) == (4, 0, 4, 2, 2)
    assert row["sign_p"] == pytest.approx(2 * 0.5**4)
    shift = follows[:2].mean(axis=0) - follows[2:].mean(axis=0)
    assert row["key_interaction"] == pytest.approx(shift[:2].mean() - shift[2:].mean())
    assert row["collapse_testable"] and not row["collapse"]
    assert not row["passed"]  # 4 items: the sign test cannot reach p < 0.05
    assert list(row) == ins.VALIDITY_COLUMNS[3:]

    level_only = np.array([[5.0, 4.5, 5.0, 4.0], [4.5, 5.0, 4.5, 4.5], [1.0, 2.0, 1.5, 1.0], [2.0, 1.0, 1.0, 1.5]])
    row = ins.validity_verdict(level_only, keys, 2, "likert", 1.0, 5.0)
    assert row["shift_plus"] > 1 and row["shift_minus"] > 1 and row["collapse"] and not row["passed"]
    with pytest.raises(ValueError, match="persona"):
        ins.validity_verdict(follows, keys, 4, "likert", 1.0, 5.0)
