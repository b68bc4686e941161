from __future__ import annotations

import csv
import hashlib
import io
import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from dpnle import datasets
from dpnle.concepts import TRAITS, VALUES

MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

pytestmark = pytest.mark.skipif(
    not (MIRROR / "MANIFEST.tsv").is_file(),
    reason=f"offline dataset mirror not found at {MIRROR} (CI provides it; see DESIGN.md, Data)",
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty dpnle cache, with the shared mirror as the dataset source."""
    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(datasets.MIRROR_ENV, str(MIRROR))
    return tmp_path / "cache" / "datasets"


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache shared by the loader tests, so each file is copied from the mirror once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPNLE_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv(datasets.MIRROR_ENV, str(MIRROR))
        yield


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _mirror_bytes(name: str) -> bytes:
    return datasets.mirror_path(name, MIRROR).read_bytes()


class _FakeResponse(io.BytesIO):
    """Stands in for the object urllib.request.urlopen returns."""


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_matches_mirror_manifest() -> None:
    with (MIRROR / "MANIFEST.tsv").open(encoding="utf-8", newline="") as handle:
        manifest = {
            (row["owner"], row["repo"], row["commit"], row["path"]): (row["sha256"], int(row["bytes"]))
            for row in csv.DictReader(handle, delimiter="\t")
        }
    for entry in datasets.REGISTRY.values():
        key = (entry.owner, entry.repo, entry.commit, entry.path)
        if not entry.verifiable:
            assert entry.sha256 is None and key not in manifest
            continue
        assert key in manifest, f"{entry.name} is not in the mirror manifest"
        assert manifest[key] == (entry.sha256, entry.bytes), f"{entry.name}: hash or size differs"


def test_registry_covers_the_pipeline() -> None:
    names = set(datasets.REGISTRY)
    assert len(datasets.MMLU_SUBJECTS) == 57
    for subject in datasets.MMLU_SUBJECTS:
        assert {f"mmlu-test-{subject}", f"mmlu-dev-{subject}"} <= names
    for trait in TRAITS:
        assert {f"pb-test-{trait}", f"pb-search-{trait}", f"anthropic-persona-{trait}"} <= names
    unverifiable = {name for name, entry in datasets.REGISTRY.items() if not entry.verifiable}
    assert unverifiable == {f"pb-search-{trait}" for trait in TRAITS}
    assert all(entry.licence and entry.citation for entry in datasets.REGISTRY.values())


def test_url_names_the_pinned_commit() -> None:
    assert datasets.url("gsm8k") == (
        "https://raw.githubusercontent.com/openai/grade-school-math/"
        "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl"
    )


def test_resolve_names_expands_groups_and_all() -> None:
    assert len(datasets.resolve_names(["mmlu"])) == 114
    assert datasets.resolve_names(["gsm8k", "arc-challenge", "gsm8k"]) == [
        "gsm8k",
        "arc-challenge-test",
        "arc-challenge-dev",
    ]
    everything = datasets.resolve_names(all_entries=True)
    assert set(everything) == set(datasets.REGISTRY) - set(datasets.GROUPS["pb-search"])


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(datasets.UnknownDatasetError, match="gsm8k"):
        datasets.get_entry("gsm8")


# --------------------------------------------------------------------------------------------
# Fetch


def test_fetch_copies_from_mirror_then_reuses_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = datasets.fetch("ipip120")
    assert local == datasets.cache_path("ipip120")
    assert local.is_relative_to(cache)
    assert hashlib.sha256(local.read_bytes()).hexdigest() == datasets.REGISTRY["ipip120"].sha256
    mtime = local.stat().st_mtime_ns

    def no_copy(*_: object) -> None:
        raise AssertionError("a cached, verified file was copied again")

    monkeypatch.setattr(datasets, "_mirror_chunks", no_copy)
    assert datasets.fetch("ipip120") == local
    assert local.stat().st_mtime_ns == mtime
    assert _files_under(cache) == [local]


def test_relative_mirror_path_is_resolved_against_cwd(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(MIRROR.parent)
    monkeypatch.setenv(datasets.MIRROR_ENV, MIRROR.name)
    assert datasets.fetch("mpi120").is_file()


def test_tampered_mirror_raises_and_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    tampered = datasets.mirror_path("ipip300-split", mirror)
    tampered.parent.mkdir(parents=True)
    content = bytearray(_mirror_bytes("ipip300-split"))
    content[10] ^= 0x01
    tampered.write_bytes(bytes(content))
    monkeypatch.setenv(datasets.MIRROR_ENV, str(mirror))

    with pytest.raises(datasets.DatasetHashError) as raised:
        datasets.fetch("ipip300-split")
    message = str(raised.value)
    assert "ipip300-split" in message
    assert datasets.REGISTRY["ipip300-split"].sha256 in message
    assert hashlib.sha256(bytes(content)).hexdigest() in message
    assert _files_under(cache) == []


def test_file_missing_from_mirror_names_the_mirror_path(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(datasets.MIRROR_ENV, str(tmp_path / "empty-mirror"))
    with pytest.raises(datasets.DatasetUnavailableError) as raised:
        datasets.fetch("gsm8k")
    assert str(datasets.mirror_path("gsm8k", tmp_path / "empty-mirror")) in str(raised.value)
    assert _files_under(cache) == []


def test_offline_without_mirror_says_what_to_do(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.MIRROR_ENV)

    def unreachable(*_: object, **__: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(datasets.DatasetUnavailableError) as raised:
        datasets.fetch("gsm8k")
    message = str(raised.value)
    assert datasets.url("gsm8k") in message
    assert "DPNLE_DATA_MIRROR" in message
    assert "dpnle data fetch gsm8k" in message
    assert _files_under(cache) == []


def test_download_is_verified(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.MIRROR_ENV)
    requested: list[str] = []

    def serve(request: urllib.request.Request, timeout: float) -> _FakeResponse:
        requested.append(request.full_url)
        return _FakeResponse(_mirror_bytes("mpi120"))

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    assert datasets.fetch("mpi120").read_bytes() == _mirror_bytes("mpi120")
    assert requested == [datasets.url("mpi120")]

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: _FakeResponse(b"not the file"))
    with pytest.raises(datasets.DatasetHashError):
        datasets.fetch("ipip120")
    assert _files_under(cache) == [datasets.cache_path("mpi120")]


def test_http_error_is_not_reported_as_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.MIRROR_ENV)

    def not_found(request: urllib.request.Request, timeout: float) -> None:
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)  # type: ignore[arg-type]

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(datasets.DatasetUnavailableError, match="HTTP 404"):
        datasets.fetch("gsm8k")


def test_damaged_cache_file_is_fetched_again(cache: Path) -> None:
    local = datasets.fetch("mpi120")
    local.write_bytes(b"damaged")
    assert datasets.verify("mpi120").hash_ok is False
    assert datasets.fetch("mpi120").read_bytes() == _mirror_bytes("mpi120")
    assert datasets.verify("mpi120").ok


def test_verify_and_list_do_not_fetch(cache: Path) -> None:
    result = datasets.verify("gsm8k")
    assert not result.present and not result.ok
    assert not any(row.cached for row in datasets.list_entries())
    datasets.fetch("gsm8k")
    assert datasets.verify("gsm8k").ok
    rows = {row.name: row for row in datasets.list_entries()}
    assert rows["gsm8k"].cached and rows["gsm8k"].source == "openai/grade-school-math@3101c7d"
    assert not rows["hellaswag"].cached


def _unpin_search_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The search files are pinned by git blob id now; an entry without any digest is simulated.
    import dataclasses

    entry = datasets.REGISTRY["pb-search-openness"]
    monkeypatch.setitem(datasets.REGISTRY, entry.name, dataclasses.replace(entry, git_blob=None))


def test_search_files_are_pinned_to_npti_commit_by_git_blob(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    entry = datasets.get_entry("pb-search-openness")
    assert entry.commit == "630d2a236e5c8d2484fbd5b71249aedd1fc44195" and datasets.is_pinned(entry.name)
    assert entry.git_blob == "a53f3b04ef4337243cea226d9820ad20bfa8961b" and not entry.verifiable
    assert datasets.url(entry).startswith("https://raw.githubusercontent.com/RUCAIBox/NPTI/630d2a236e5c")
    lines = b'{"question": "What would you invent?"}\n'
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: _FakeResponse(lines))
    with pytest.raises(datasets.DatasetHashError, match="git blob id"):
        datasets.fetch(entry.name)  # other bytes than the pinned blob: discarded
    assert not datasets.cache_path(entry).exists()
    blob = hashlib.sha1(b"blob %d\0" % len(lines) + lines).hexdigest()
    monkeypatch.setitem(datasets.REGISTRY, entry.name, dataclasses.replace(entry, git_blob=blob))
    assert datasets.load_pb_search("openness")[0].text == "What would you invent?"
    assert datasets.verify(entry.name).verified
    assert datasets.fetch_summary([entry.name]) == (
        "0 file(s) verified against a pinned SHA-256. 1 verified against the pinned commit's git blob id: "
        "pb-search-openness."
    )


def test_unpinned_entry_downloads_with_a_warning(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unpin_search_entry(monkeypatch)
    lines = b'{"BFI": "Openness", "tag": "Imagination", "sign": "+", "question": "What would you invent?"}\n'
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: _FakeResponse(lines))
    with pytest.warns(datasets.UnpinnedDatasetWarning, match="not pinned"):
        questions = datasets.load_pb_search("openness")
    assert questions[0].text == "What would you invent?"
    assert questions[0].facet == "Imagination" and questions[0].key == 1
    assert datasets.verify("pb-search-openness").hash_ok is None


def test_an_unpinned_file_is_never_called_verified(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unpin_search_entry(monkeypatch)
    lines = b'{"BFI": "Openness", "tag": "Imagination", "sign": "+", "question": "What would you invent?"}\n'
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: _FakeResponse(lines))
    with pytest.warns(datasets.UnpinnedDatasetWarning):
        datasets.fetch("pb-search-openness")
    datasets.fetch("mpi120")
    assert not datasets.is_pinned("pb-search-openness") and datasets.is_pinned("mpi120")
    result = datasets.verify("pb-search-openness")
    assert result.present and result.ok and not result.verified  # present and unchecked: not "verified"
    assert datasets.verify("mpi120").verified
    line = datasets.fetch_summary(["mpi120", "pb-search-openness"])
    assert line.startswith("1 file(s) verified against a pinned SHA-256.")
    assert "1 not verified (no pinned digest): pb-search-openness" in line
    assert datasets.fetch_summary(["mpi120"]) == "1 file(s) verified against a pinned SHA-256."


def test_pb_search_reads_a_user_file(tmp_path: Path) -> None:
    user_file = tmp_path / "Openness.json"
    user_file.write_text('{"question": "First?"}\n\n{"question": "Second?"}\n', encoding="utf-8")
    questions = datasets.load_pb_search("openness", path=user_file)
    assert [q.text for q in questions] == ["First?", "Second?"]
    assert questions[1].id == "pb-search-openness-1" and questions[1].key is None


# --------------------------------------------------------------------------------------------
# Loaders


@pytest.mark.usefixtures("filled_cache")
class TestLoaders:
    def test_ipip120(self) -> None:
        items = datasets.load_ipip120()
        assert len(items) == 120
        assert Counter(item.domain for item in items) == dict.fromkeys(TRAITS, 24)
        for trait in TRAITS:
            assert {item.key for item in items if item.domain == trait} == {1, -1}
        assert items[0].text == "Worry about things" and items[0].domain == "neuroticism"

    def test_mpi120_is_the_ipip120_in_the_same_order(self) -> None:
        scoring = [(i.domain, i.facet, i.key) for i in datasets.load_ipip120()]
        assert [(i.domain, i.facet, i.key) for i in datasets.load_mpi120()] == scoring

    def test_ipip300_split(self) -> None:
        every, train, test = (datasets.load_ipip300(split) for split in ("all", "train", "test"))
        assert (len(every), len(train), len(test)) == (300, 120, 180)
        assert {i.id for i in train}.isdisjoint({i.id for i in test})
        assert sorted(i.number for i in every) == list(range(1, 301))
        assert Counter(i.domain for i in test) == dict.fromkeys(TRAITS, 36)
        # The train half is the IPIP-NEO-120, item for item.
        scoring = [(i.domain, i.facet, i.key) for i in datasets.load_ipip120()]
        assert [(i.domain, i.facet, i.key) for i in train] == scoring

    def test_ipip300_rejects_unknown_split(self) -> None:
        with pytest.raises(ValueError, match="split"):
            datasets.load_ipip300("validation")  # type: ignore[arg-type]

    @pytest.mark.parametrize("trait", TRAITS)
    def test_personalitybench(self, trait: str) -> None:
        descriptions = datasets.load_pb_descriptions(trait)
        assert Counter(d.pole for d in descriptions) == {"high": 80, "low": 80}
        assert len({d.id for d in descriptions}) == 160
        assert 89 <= len(datasets.load_pb_test(trait)) <= 100

    @pytest.mark.parametrize("trait", TRAITS)
    def test_anthropic_persona(self, trait: str) -> None:
        statements = datasets.load_anthropic_persona(trait)
        assert len(statements) == 1000
        assert Counter(s.expresses_trait for s in statements) == {True: 500, False: 500}
        assert {(s.answer_matching_behavior, s.answer_not_matching_behavior) for s in statements} == {
            (" Yes", " No"),
            (" No", " Yes"),
        }

    def test_loaders_reject_values_where_traits_are_expected(self) -> None:
        with pytest.raises(ValueError, match="Big Five"):
            datasets.load_pb_test("power")

    def test_pvq40(self) -> None:
        items = datasets.load_pvq40()
        assert len(items) == 40 and [i.number for i in items] == list(range(1, 41))
        assert Counter(i.value for i in items) == {
            "self_direction": 4,
            "stimulation": 3,
            "hedonism": 3,
            "achievement": 4,
            "power": 3,
            "security": 5,
            "conformity": 4,
            "tradition": 4,
            "benevolence": 4,
            "universalism": 6,
        }
        assert items[37].value == "tradition" and "humble" in items[37].text

    def test_touche(self) -> None:
        counts = {split: len(datasets.load_touche(split)) for split in datasets.TOUCHE_SPLITS}
        assert counts == {"training": 5393, "validation": 1896, "test": 1576}
        first = datasets.load_touche("training")[0]
        assert first.id == "A01002" and first.stance == "in favor of"
        assert len(first.labels) == 20 and first.labels["Security: societal"] == 1
        assert first.schwartz_values == {value: int(value == "security") for value in VALUES}

    def test_touche_mapping_covers_the_value_taxonomy(self) -> None:
        categories = json.loads(datasets.path("touche-value-categories").read_text(encoding="utf-8"))
        assert set(categories) == set(datasets.TOUCHE_TO_SCHWARTZ)
        assert set(datasets.TOUCHE_TO_SCHWARTZ.values()) == set(VALUES)

    def test_gsm8k(self) -> None:
        items = datasets.load_gsm8k()
        assert len(items) == 1319
        assert items[0].answer == "18"
        assert all(item.answer.lstrip("-").replace(".", "").isdigit() for item in items)

    def test_mmlu(self) -> None:
        test = datasets.load_mmlu()
        assert len(test) == 14079
        assert len({item.id for item in test}) == len(test)
        assert all(len(item.choices) == 4 and 0 <= item.answer_index < 4 for item in test)
        dev = datasets.load_mmlu(["anatomy", "astronomy"], split="dev")
        assert len(dev) == 10 and {item.subject for item in dev} == {"anatomy", "astronomy"}
        with pytest.raises(datasets.UnknownDatasetError, match="anatomyy"):
            datasets.load_mmlu(["anatomyy"])

    def test_arc_challenge(self) -> None:
        test, dev = datasets.load_arc_challenge("test"), datasets.load_arc_challenge("dev")
        assert (len(test), len(dev)) == (1150, 294)
        assert Counter(len(item.choices) for item in test) == {4: 1144, 3: 3, 5: 3}
        assert all(0 <= item.answer_index < len(item.choices) for item in test + dev)

    def test_hellaswag(self) -> None:
        items = datasets.load_hellaswag()
        assert len(items) == 10042
        assert items[0].subject == "Roof shingle removal" and items[0].answer_index == 3
        assert all(len(item.choices) == 4 for item in items)

    def test_truthfulqa_mc1(self) -> None:
        items = datasets.load_truthfulqa_mc1()
        assert len(items) == 817
        # In the file the one true answer always comes first: shuffling must move it, reproducibly.
        assert {item.answer_index for item in items} == {0}
        shuffled = datasets.load_truthfulqa_mc1(shuffle_seed=0)
        assert shuffled == datasets.load_truthfulqa_mc1(shuffle_seed=0)
        assert len({item.answer_index for item in shuffled}) > 1
        for plain, mixed in zip(items, shuffled, strict=True):
            assert mixed.choices[mixed.answer_index] == plain.choices[0]
            assert sorted(mixed.choices) == sorted(plain.choices)

    def test_hotpotqa(self) -> None:
        items = datasets.load_hotpotqa()
        assert len(items) == 7405
        assert Counter(item.kind for item in items) == {"bridge": 5918, "comparison": 1487}
        assert all(item.answer and item.context is None for item in items)


def test_loaders_fetch_lazily(cache: Path) -> None:
    assert _files_under(cache) == []
    datasets.load_pb_test("neuroticism")
    assert _files_under(cache) == [datasets.cache_path("pb-test-neuroticism")]


def test_fetching_all_verifiable_entries_from_the_mirror(cache: Path) -> None:
    for name in datasets.resolve_names(all_entries=True):
        datasets.fetch(name)
    assert all(datasets.verify(name).ok for name in datasets.resolve_names(all_entries=True))
    assert not any(file.name.endswith(".part") for file in _files_under(cache))
