"""DPN-LE inputs against the reference (github.com/Z1ivan/DPN-LE @3fb5e72): the prompt template,
the reference's pair sampling and its tokenization.

Each test compares dpnle with a transcription of the reference's algorithm written here from
reading its code (``src/dpn_le/utils.py``, ``personalitybench.py``, ``extract_activations.py``),
never with dpnle's own output.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_llama, tiny_pairs, tiny_tokenizer
from tokenizers import processors

from dpnle import datasets
from dpnle.collect import _encode, capture_dir, collect_concept
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.pairs import (
    LEGACY_TEMPLATE,
    PairsError,
    load_value_personas,
    make_pairs,
    pairs_digest,
    render_prompt,
    write_pairs,
)
from dpnle.runs import ArtifactError, InputError, Run, parquet_metadata, read_json

# Transcribed from the reference's utils.py (PERSONALITY_PROMPT_TEMPLATE): blank lines between sections.
REFERENCE_TEMPLATE = (
    "You will find a personality description followed by a question below. I want you to fully immerse "
    "yourself in the persona described.\n"
    "\n"
    "###Personality description: {description}\n"
    "\n"
    "###Question: {question}\n"
    "\n"
    "###Response:"
)
TRAIT_KEYS = ("Agreeableness", "Conscientiousness", "Extraversion", "Neuroticism", "Openness")


# ---------------------------------------------------------------------------------------------
# the reference's algorithms, transcribed


def reference_descriptions(dataset_dir: Path, trait: str) -> tuple[list[str], list[str]]:
    high, low = [], []
    for line in (dataset_dir / "description.json").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if trait in row:
            high.append(row[trait])
        if f"{trait}_reversed" in row:
            low.append(row[f"{trait}_reversed"])
    return high, low


def reference_samples(dataset_dir: Path, trait: str, num_samples: int, seed: int = 42):
    """build_contrastive_samples: first N search questions; one Random(seed); all high choices
    (one per question), then all low choices."""
    lines = (dataset_dir / "search" / f"{trait}.json").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines if line.strip()][:num_samples]
    high_desc, low_desc = reference_descriptions(dataset_dir, trait)
    rng = random.Random(seed)
    high = [{"description": rng.choice(high_desc), "question": q} for q in questions]
    low = [{"description": rng.choice(low_desc), "question": q} for q in questions]
    return high, low


# ---------------------------------------------------------------------------------------------
# synthetic PersonalityBench files


@pytest.fixture
def pb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PersonalityBench folder: description.json (80 lines, every trait and its reversal) and
    search/<Trait>.json (JSON lines; some questions with surrounding whitespace, a blank line);
    dpnle's description loader reads the same description.json."""
    rng = random.Random(3)
    words = "calm bold shy kind tidy messy curious dull warm cold eager".split()
    lines = []
    for i in range(80):
        row = {}
        for key in TRAIT_KEYS:
            row[key] = f"{key} high {i}: " + " ".join(rng.choices(words, k=rng.randint(2, 9)))
            row[f"{key}_reversed"] = f"{key} low {i}: " + " ".join(rng.choices(words, k=rng.randint(2, 9)))
        lines.append(json.dumps(row))
    (tmp_path / "description.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "search").mkdir()
    for key in TRAIT_KEYS:
        rows = []
        for n in range(60):
            text = f"{key} question {n}: " + " ".join(rng.choices(words, k=rng.randint(1, 6))) + "?"
            rows.append(json.dumps({"BFI": key, "question": f" {text} " if n % 7 == 0 else text}))
            if n == 10:
                rows.append("")
        (tmp_path / "search" / f"{key}.json").write_text("\n".join(rows) + "\n", encoding="utf-8")
    real_path = datasets.path
    monkeypatch.setattr(
        datasets, "path", lambda name: tmp_path / "description.json" if name == "pb-descriptions" else real_path(name)
    )
    return tmp_path


# ---------------------------------------------------------------------------------------------
# template


def test_template_string_and_rendered_message_match_the_reference_layout():
    pairs = make_pairs("power", num_pairs=3, seed=0)  # values recipe: dpnle's own personas, no download
    personas = load_value_personas()["power"]
    row = pairs.iloc[0]
    high = personas["high"][int(row["high_description_id"].rsplit("-", 1)[1])]
    low = personas["low"][int(row["low_description_id"].rsplit("-", 1)[1])]
    assert row["high_message"] == REFERENCE_TEMPLATE.format(description=high, question=row["question"])
    assert row["low_message"] == REFERENCE_TEMPLATE.format(description=low, question=row["question"])
    assert "\n\n###Personality description: " in row["high_message"]
    assert row["high_message"].endswith("\n\n###Response:")
    # The model sees the message inside its chat template, unchanged (the reference's use_chat_template).
    tokenizer = tiny_tokenizer()
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": REFERENCE_TEMPLATE.format(description=high, question=row["question"])}],
        tokenize=False, add_generation_prompt=True,
    )
    assert render_prompt(tokenizer, row["high_message"]) == expected
    assert pairs.attrs["pairs_info"]["template"] == "dpn-le-blank-lines"


def test_a_template_change_changes_the_pairs_digest():
    pairs = make_pairs("power", num_pairs=5, seed=0)
    legacy = pairs.copy()
    for side in ("high", "low"):
        legacy[f"{side}_message"] = legacy[f"{side}_message"].str.replace("\n\n", "\n", regex=False)
    assert legacy["high_message"].iloc[0].startswith(LEGACY_TEMPLATE.split("{description}")[0])
    assert pairs_digest(legacy) != pairs_digest(pairs)


# ---------------------------------------------------------------------------------------------
# reference pair sampling


@pytest.mark.parametrize("trait", ["openness", "neuroticism"])
@pytest.mark.parametrize("num_pairs", [7, 50])
def test_reference_sampling_equals_build_contrastive_samples(pb_dir, trait, num_pairs):
    key = trait.capitalize()
    high, low = reference_samples(pb_dir, key, num_pairs, seed=42)
    pairs = make_pairs(trait, num_pairs=num_pairs, pair_sampling="reference", questions_path=pb_dir / "search")
    assert len(pairs) == num_pairs == len(high)
    ours = list(zip(pairs["high_message"], pairs["low_message"], pairs["question"], strict=True))
    theirs = [
        (REFERENCE_TEMPLATE.format(**h), REFERENCE_TEMPLATE.format(**lo), h["question"])
        for h, lo in zip(high, low, strict=True)
    ]
    assert ours == theirs
    # The recorded description ids name the same lines of description.json.
    ref_high, ref_low = reference_descriptions(pb_dir, key)
    for row, h, lo in zip(pairs.itertuples(), high, low, strict=True):
        assert ref_high[int(row.high_description_id.removeprefix("pb-"))] == h["description"]
        assert ref_low[int(row.low_description_id.removeprefix("pb-"))] == lo["description"]
    assert pairs.attrs["pairs_info"]["pair_sampling"] == "reference"
    assert pairs.attrs["pairs_info"]["pair_seed"] == 42


def test_reference_sampling_seed_file_argument_and_metadata(pb_dir, tmp_path):
    high, low = reference_samples(pb_dir, "Extraversion", 20, seed=7)
    pairs = make_pairs("extraversion", num_pairs=20, pair_sampling="reference", pair_seed=7,
                       questions_path=pb_dir / "search" / "Extraversion.json")
    assert list(pairs["high_message"]) == [REFERENCE_TEMPLATE.format(**h) for h in high]
    assert list(pairs["low_message"]) == [REFERENCE_TEMPLATE.format(**lo) for lo in low]
    default = make_pairs("extraversion", num_pairs=20, pair_sampling="reference", questions_path=pb_dir)
    assert pairs_digest(default) != pairs_digest(pairs)  # seed 42 vs 7, and the folder form works
    path = write_pairs(pairs, tmp_path / "p.parquet", seed=7, questions_path=None)
    meta = parquet_metadata(path)
    assert meta["pair_sampling"] == "reference" and meta["pair_seed"] == 7
    assert meta["template"] == "dpn-le-blank-lines" and meta["questions"].endswith("Extraversion.json")
    with pytest.raises(PairsError, match="holds 60 search questions .* --num-pairs 60 or fewer"):
        make_pairs("extraversion", num_pairs=61, pair_sampling="reference", questions_path=pb_dir)
    with pytest.raises(PairsError, match="--pair-seed is the seed of --pair-sampling reference"):
        make_pairs("extraversion", num_pairs=5, pair_seed=3)
    with pytest.raises(PairsError, match="no reference sampling"):
        make_pairs("openness", recipe="anthropic-persona", num_pairs=5, pair_sampling="reference")


def test_description_loader_keeps_the_reference_order(pb_dir):
    for trait in ("agreeableness", "openness"):
        ref_high, ref_low = reference_descriptions(pb_dir, trait.capitalize())
        ours = datasets.load_pb_descriptions(trait, strip=False)
        assert [d.text for d in ours if d.pole == "high"] == ref_high
        assert [d.text for d in ours if d.pole == "low"] == ref_low


def test_missing_search_files_offline_fail_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "cache"))

    def offline(request, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(PairsError) as info:
        make_pairs("openness", num_pairs=10, pair_sampling="reference")
    message = str(info.value)
    assert "\n" not in message
    for name in TRAIT_KEYS:
        assert f"{name}.json" in message
    assert "NPTI/dataset/search" in message and "RUCAIBox/NPTI@630d2a2" in message
    assert "`dpnle data fetch pb-search`" in message and "--questions" in message

    from dpnle.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "pairs", "--trait", "openness", "--pair-sampling", "reference", "--num-pairs", "5",
              "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    text = out.out + out.err
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in text
    assert "dpnle data fetch pb-search" in errors[0] and "Openness.json" in errors[0]


def test_cli_and_config_take_the_new_options(tmp_path, pb_dir, capsys):
    from dpnle.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"pair_sampling: reference\npair_seed: 7\nquestions: {pb_dir / 'search'}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "pairs", "--trait", "openness", "--num-pairs", "9", "--out", str(tmp_path / "out"),
              "--config", str(config)])
    assert exit_info.value.code in (0, None), capsys.readouterr()
    written = tmp_path / "out" / "openness-personalitybench-reference-n9-seed7.parquet"
    frame = pd.read_parquet(written)
    high, _ = reference_samples(pb_dir, "Openness", 9, seed=7)
    assert list(frame["high_message"]) == [REFERENCE_TEMPLATE.format(**h) for h in high]
    with pytest.raises(SystemExit) as exit_info:
        main(["collect-activations", "--trait", "openness", "--tokenization", "exact", "--run", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "Unknown tokenization 'exact'" in capsys.readouterr().err.replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# tokenization


def _bos_tokenizer():
    """The tiny tokenizer with Llama-3's behaviour: its chat template writes BOS, and tokenizing
    with the defaults adds another."""
    tokenizer = tiny_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return tokenizer


def test_reference_tokenization_doubles_bos_like_the_reference():
    tokenizer = _bos_tokenizer()
    bos = tokenizer.bos_token_id
    message = REFERENCE_TEMPLATE.format(description="A calm person.", question="What do you do on Sundays?")
    text = render_prompt(tokenizer, message)
    assert text.startswith("<bos>")
    # The reference: tokenizer(batch, padding=True, truncation=True, max_length=2048) with defaults.
    reference_ids = tokenizer([text], truncation=True, max_length=2048)["input_ids"][0]
    assert reference_ids[:2] == [bos, bos] and reference_ids[2] != bos
    assert _encode(tokenizer, [text], tokenization="reference")[0].ids == reference_ids
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain[0] == bos and plain[1] != bos
    assert _encode(tokenizer, [text])[0].ids == plain == _encode(tokenizer, [text], tokenization="dpnle")[0].ids
    with pytest.raises(InputError, match="longer than the reference's max_length of 2048"):
        _encode(tokenizer, [text + "x" * 2100], tokenization="reference")


def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))


def test_a_capture_resumes_only_in_its_own_tokenization(tmp_path):
    model, _ = tiny_llama()
    loaded = _loaded(model, _bos_tokenizer())
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    pairs = tiny_pairs(3)
    collect_concept(run, loaded, "openness", pairs=pairs, batch_size=4, shard_size=4, progress=False,
                    tokenization="reference")
    manifest = read_json(capture_dir(run, "openness") / "manifest.json")
    assert manifest["tokenization"] == "reference" and manifest["key"]["tokenization"] == "reference"
    assert manifest["pairs"]["template"] == "dpn-le-blank-lines"
    with pytest.raises(ArtifactError, match=r"different tokenization \(tokenization: 'reference' there, "
                                            r"'dpnle' \(the default\) now"):
        collect_concept(run, loaded, "openness", pairs=pairs, batch_size=4, shard_size=4, progress=False)
    # The other way round: a dpnle-mode capture is not resumed in reference mode.
    other = Run.create_or_open("s", "tiny-llama", root=tmp_path)
    collect_concept(other, loaded, "openness", pairs=pairs, batch_size=4, shard_size=4, progress=False)
    assert read_json(capture_dir(other, "openness") / "manifest.json")["tokenization"] == "dpnle"
    with pytest.raises(ArtifactError, match="different tokenization"):
        collect_concept(other, loaded, "openness", pairs=pairs, batch_size=4, shard_size=4, progress=False,
                        tokenization="reference")
    # The two modes captured different token sequences (one BOS more per prompt).
    tokens = [read_json(capture_dir(r, "openness") / "manifest.json")["num_tokens"] for r in (run, other)]
    assert tokens[0] - tokens[1] == 2 * len(pairs)


def test_a_capture_of_single_newline_pairs_is_refused_as_stale(tmp_path):
    model, tokenizer = tiny_llama()
    loaded = _loaded(model, tokenizer)
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    pairs = tiny_pairs(3)
    legacy = pairs.copy()  # what dpnle's pairs looked like before the template change
    for side in ("high", "low"):
        legacy[f"{side}_message"] = legacy[f"{side}_message"].str.replace("\n\n", "\n", regex=False)
    collect_concept(run, loaded, "openness", pairs=legacy, batch_size=4, shard_size=4, progress=False)
    manifest_path = capture_dir(run, "openness") / "manifest.json"
    old = read_json(manifest_path)
    old["pairs"].pop("template")  # captures made before the template was recorded
    manifest_path.write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match=r"different pair set .*prompt template 'single-newline' \(dpnle's "
                                            r"earlier default, stale\) there, 'dpn-le-blank-lines' now"):
        collect_concept(run, loaded, "openness", pairs=pairs, batch_size=4, shard_size=4, progress=False)
