import re

import pandas as pd
import pytest

from dpnle import datasets
from dpnle.concepts import TRAITS, VALUES
from dpnle.pairs import (
    DPNLE_TEMPLATE,
    PairsError,
    load_question_pool,
    load_value_personas,
    make_pairs,
    pairs_digest,
    render_prompt,
    to_samples,
)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def test_question_pool_is_large_and_unique():
    pool = load_question_pool()
    assert len(pool) >= 500
    assert len({_normalize(q.text) for q in pool}) == len(pool)
    assert len({q.id for q in pool}) == len(pool)


def test_personalitybench_test_questions_never_enter_a_pair(mirror_available):
    test_questions = {_normalize(q.text) for t in TRAITS for q in datasets.load_pb_test(t)}
    assert len(test_questions) > 400
    pool = {_normalize(q.text) for q in load_question_pool()}
    assert not pool & test_questions
    for trait in TRAITS:
        pairs = make_pairs(trait, num_pairs=1000)
        assert not set(pairs["question"].map(_normalize)) & test_questions


def test_value_personas_cover_all_values():
    personas = load_value_personas()
    assert list(personas) == list(VALUES)
    for value, entry in personas.items():
        assert len(entry["high"]) >= 6 and len(entry["low"]) >= 6, value
        assert not set(entry["high"]) & set(entry["low"])


@pytest.mark.parametrize("concept", ["openness", "power"])
def test_pairs_are_deterministic_question_matched_and_sized(concept, mirror_available):
    a = make_pairs(concept, num_pairs=1000, seed=0)
    b = make_pairs(concept, num_pairs=1000, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert pairs_digest(a) == pairs_digest(b)
    assert len(a) == 1000 and a["pair_id"].tolist() == list(range(1000))
    c = make_pairs(concept, num_pairs=1000, seed=1)
    assert pairs_digest(c) != pairs_digest(a)
    for row in a.head(50).itertuples():
        # Both sides ask the same question, framed by DPN-LE's template, with different personas.
        prefix, suffix = DPNLE_TEMPLATE.split("{description}")
        assert row.high_message.startswith(prefix) and row.low_message.startswith(prefix)
        assert row.high_message.endswith(suffix.format(question=row.question))
        assert row.low_message.endswith(suffix.format(question=row.question))
        assert row.high_message != row.low_message
    # Every question in the pool is used once before any is used twice.
    counts = a["question_id"].value_counts()
    assert counts.max() - counts.min() <= 1


def test_personalitybench_recipe_uses_the_trait_descriptions(mirror_available):
    pairs = make_pairs("extraversion", num_pairs=200)
    descriptions = datasets.load_pb_descriptions("extraversion")
    high = {d.text for d in descriptions if d.pole == "high"}
    low = {d.text for d in descriptions if d.pole == "low"}
    for row in pairs.itertuples():
        assert any(h in row.high_message for h in high)
        assert any(lo in row.low_message for lo in low)


def test_anthropic_recipe_answers_differ_by_pole(mirror_available):
    pairs = make_pairs("agreeableness", recipe="anthropic-persona", num_pairs=100)
    statements = {s.statement: s for s in datasets.load_anthropic_persona("agreeableness")}
    for row in pairs.itertuples():
        s = statements[row.question]
        assert row.high_message == row.low_message
        assert row.high_response_prefix == s.answer_matching_behavior.strip()
        assert row.low_response_prefix == s.answer_not_matching_behavior.strip()
        assert {row.high_response_prefix, row.low_response_prefix} == {"Yes", "No"}


def test_more_pairs_than_statements_is_refused_not_duplicated(mirror_available):
    with pytest.raises(PairsError, match=r"has 1000 statements for 'openness', one pair each; pass --num-pairs 1000"):
        make_pairs("openness", recipe="anthropic-persona", num_pairs=2500)
    pairs = make_pairs("openness", recipe="anthropic-persona", num_pairs=1000)
    assert not pairs.duplicated(["question", "high_response_prefix", "low_response_prefix"]).any()


@pytest.mark.parametrize("concept", ["universalism", "openness"])
def test_no_pair_is_an_exact_duplicate(concept, mirror_available):
    # The values recipe (12 x 12 personas) drew the same question and personas twice 2-8 times in
    # 1,000 pairs; a repeat now takes personas not yet used with its question.
    pairs = make_pairs(concept, num_pairs=2500)
    assert len(pairs) == 2500
    assert not pairs.duplicated(["high_message", "low_message"]).any()


def test_a_pair_count_beyond_the_distinct_pairs_is_refused(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Why?"}\n{"question": "How?"}\n')
    with pytest.raises(PairsError, match=r"at most 288 distinct pairs .*--num-pairs 288"):
        make_pairs("power", num_pairs=289, questions_path=questions)
    pairs = make_pairs("power", num_pairs=288, questions_path=questions)
    assert not pairs.duplicated(["high_message", "low_message"]).any()


def test_wrong_recipe_for_concept_kind():
    with pytest.raises(PairsError, match="values"):
        make_pairs("power", recipe="personalitybench")
    with pytest.raises(PairsError, match="Unknown pair recipe"):
        make_pairs("openness", recipe="nope")


def test_user_question_file(tmp_path, mirror_available):
    path = tmp_path / "search.jsonl"
    path.write_text('{"question": "Do you like parties?"}\n{"question": "What do you read?"}\n')
    pairs = make_pairs("openness", num_pairs=4, questions_path=path)
    assert sorted(set(pairs["question"])) == ["Do you like parties?", "What do you read?"]
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(PairsError, match="bad.jsonl:1"):
        make_pairs("openness", num_pairs=4, questions_path=tmp_path / "bad.jsonl")


def test_samples_interleave_poles():
    pairs = make_pairs("power", num_pairs=3)
    samples = to_samples(pairs)
    assert samples["sample_id"].tolist() == [0, 1, 2, 3, 4, 5]
    assert samples["pole"].tolist() == ["high", "low"] * 3
    assert samples.loc[1, "message"] == pairs.loc[0, "low_message"]


def test_render_prompt_uses_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert render_prompt(Tok(), "hi", "Yes") == "<user>hi</user><assistant>Yes"
