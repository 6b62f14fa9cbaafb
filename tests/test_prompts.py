"""Prompt readers, the GenEval training-prompt generator and the group sampler."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rollout.prompts.files import PromptFileError, builtin_prompts, read_geneval_jsonl, read_text_prompts
from rollout.prompts.geneval import (
    COCO_CLASSES,
    COLORS,
    PLURALS,
    canonical_key,
    generate_geneval_prompts,
    refuse_test_overlap,
)
from rollout.prompts.groups import GroupSampler, PromptItem, sample_seed

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"  # the prompt sets of Flow-GRPO (data/README.md)
GENEVAL = DATASETS / "geneval" / "test_metadata.jsonl"
OCR = DATASETS / "ocr" / "test.txt"
PICKSCORE = DATASETS / "pickscore" / "test.txt"

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def geneval_rows() -> list[dict]:
    """The raw GenEval test records, parsed here without the code under test."""
    text = GENEVAL.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def geneval_items() -> list[PromptItem]:
    return read_geneval_jsonl(GENEVAL)


def fact(meta: dict) -> tuple:
    """Order-free meaning of a GenEval record, computed independently of canonical_key."""
    tag, inc = meta["tag"], meta["include"]
    if tag in ("two_object", "color_attr"):
        return (tag, frozenset((e["class"], e.get("color")) for e in inc))
    if tag == "position":
        ref, subj = inc[0]["class"], inc[1]["class"]
        rel = inc[1]["position"][0]
        if rel in ("right of", "below"):  # "A right of B" says the same as "B left of A"
            subj, ref, rel = ref, subj, FLIP[rel]
        return (tag, subj, rel, ref)
    return (tag, inc[0]["class"], inc[0]["count"], inc[0].get("color"))


def swapped_prompt(meta: dict) -> str:
    """Hand-built equivalent rewording of a two-object / colour / position test prompt."""
    a = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
    inc = meta["include"]
    if meta["tag"] == "two_object":
        return f"a photo of {a(inc[1]['class'])} and {a(inc[0]['class'])}"
    if meta["tag"] == "color_attr":
        first, second = (f"{e['color']} {e['class']}" for e in inc)
        return f"a photo of {a(second)} and {a(first)}"
    rel = inc[1]["position"][0]
    return f"a photo of {a(inc[0]['class'])} {FLIP[rel]} {a(inc[1]['class'])}"


# --------------------------------------------------------------------------- readers


def test_read_geneval_keeps_every_record(geneval_rows):
    items = read_geneval_jsonl(GENEVAL)
    assert len(items) == 2212
    assert [i.metadata for i in items] == geneval_rows
    assert [i.prompt for i in items] == [r["prompt"] for r in geneval_rows]
    assert {i.metadata["tag"] for i in items} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }


@pytest.mark.parametrize("path,expected", [(OCR, 1018), (PICKSCORE, None)])
def test_read_text_prompts_real_files(path, expected):
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    items = read_text_prompts(path)
    if expected is not None:
        assert len(items) == expected
    assert [i.prompt for i in items] == lines
    assert all(i.metadata == {} for i in items)


def test_bad_json_names_file_and_line(tmp_path):
    f = tmp_path / "geneval.jsonl"
    f.write_text('{"prompt": "a photo of a cat"}\n\n{"prompt": "a dog" "tag": 1}\n', encoding="utf-8")
    with pytest.raises(PromptFileError) as e:
        read_geneval_jsonl(f)
    assert f"{f}:3:" in str(e.value) and "not valid JSON" in str(e.value)


@pytest.mark.parametrize(
    "line,words",
    [
        ('["a photo of a cat"]', ["JSON object", "list"]),
        ('{"tag": "counting"}', ["'prompt'", "non-empty string"]),
        ('{"prompt": "   "}', ["'prompt'"]),
        ('{"prompt": "x", "include": [{"class": "cat", "count": 0}]}', ["include[0]", "count", ">= 1"]),
        ('{"prompt": "x", "include": [{"count": 1}]}', ["include[0]", "'class'"]),
        ('{"prompt": "x", "include": {"class": "cat", "count": 1}}', ["'include' must be a list"]),
    ],
)
def test_bad_geneval_records_are_explained(tmp_path, line, words):
    f = tmp_path / "g.jsonl"
    f.write_text('{"prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as e:
        read_geneval_jsonl(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2:")
    for w in words:
        assert w in msg


@pytest.mark.parametrize("reader", [read_geneval_jsonl, read_text_prompts])
@pytest.mark.parametrize("content", ["", "\n   \n\t\n"])
def test_empty_files_are_refused(tmp_path, reader, content):
    f = tmp_path / "prompts.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=re.escape(str(f))):
        reader(f)


@pytest.mark.parametrize("reader", [read_geneval_jsonl, read_text_prompts])
def test_missing_file_is_a_prompt_file_error(tmp_path, reader):
    f = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError, match=re.escape(str(f))) as e:
        reader(f)
    assert isinstance(e.value, ValueError)


def test_text_prompts_strip_and_skip_blanks(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  a cat  \n\n\tA sign saying \"hi\"\r\n", encoding="utf-8")
    assert read_text_prompts(f) == [PromptItem("a cat"), PromptItem('A sign saying "hi"')]


def test_builtin_prompts():
    items = builtin_prompts()
    assert items == builtin_prompts()
    assert len(items) == 32 and len({i.prompt for i in items}) == 32
    by_prompt = {i.prompt: i.metadata for i in items}
    assert by_prompt["a photo of two red squares"] == {"tag": "shapes", "count": 2, "color": "red", "shape": "square"}
    for i in items:
        m = i.metadata
        assert m["color"] in i.prompt and m["shape"] in i.prompt
        assert i.prompt.endswith("s") == (m["count"] > 1)


# --------------------------------------------------------------------------- vocabulary


def test_coco_classes_match_geneval(geneval_rows):
    seen = {e["class"] for r in geneval_rows for e in r["include"] + r.get("exclude", [])}
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert seen <= set(COCO_CLASSES)
    assert {e.get("color") for r in geneval_rows for e in r["include"]} - {None} <= set(COLORS)
    assert len(COLORS) == 10


def test_plurals_match_geneval(geneval_rows):
    counting = [r for r in geneval_rows if r["tag"] == "counting"]
    assert counting
    for r in counting:
        m = re.fullmatch(r"a photo of (two|three|four) (.+)", r["prompt"])
        assert m, r["prompt"]
        assert PLURALS[r["include"][0]["class"]] == m.group(2), r["prompt"]
    # GenEval's naive plurals, which an English-aware table would get "right" and so wrong here.
    assert (PLURALS["sheep"], PLURALS["knife"], PLURALS["bus"]) == ("sheeps", "knifes", "buses")


def test_untagged_prompts_render_exactly_as_geneval(geneval_rows):
    """With nothing excluded, the full single/count/colour pools contain every test record verbatim."""
    for tag, n in (("single_object", 80), ("counting", 240), ("colors", 800)):
        made = generate_geneval_prompts(n, seed=0, tags={tag: 1})
        assert len({i.prompt for i in made}) == n
        rendered = {i.prompt: i.metadata for i in made}
        for r in (r for r in geneval_rows if r["tag"] == tag):
            assert rendered.get(r["prompt"]) == r, r["prompt"]


# --------------------------------------------------------------------------- generator

TEMPLATES = {
    "single_object": r"a photo of (a|an) (?P<a>[a-z ]+)",
    "two_object": r"a photo of (a|an) (?P<a>[a-z ]+) and (a|an) (?P<b>[a-z ]+)",
    "counting": r"a photo of (two|three|four) [a-z ]+",
    "colors": r"a photo of (a|an) (?P<c>[a-z]+) (?P<a>[a-z ]+)",
    "position": r"a photo of (a|an) (?P<a>[a-z ]+) (left of|right of|above|below) (a|an) (?P<b>[a-z ]+)",
    "color_attr": r"a photo of (a|an) (?P<c>[a-z]+) (?P<a>[a-z ]+) and (a|an) (?P<d>[a-z]+) (?P<b>[a-z ]+)",
}


def test_generated_phrasing_matches_test_file(geneval_rows):
    made = generate_geneval_prompts(3000, seed=3)
    article = {}  # word -> "a"/"an", as the test file writes it
    for r in geneval_rows:
        for art, word in re.findall(r"\b(a|an) (\w+)", r["prompt"]):
            article[word] = art
    keys = {tag: [set(e) for e in next(r for r in geneval_rows if r["tag"] == tag)["include"]]
            for tag in TEMPLATES}
    for item in made:
        m = item.metadata
        assert re.fullmatch(TEMPLATES[m["tag"]], item.prompt), item.prompt
        assert m["prompt"] == item.prompt
        assert [set(e) for e in m["include"]] == keys[m["tag"]], item
        for art, word in re.findall(r"\b(a|an) (\w+)", item.prompt):
            assert article.get(word, art) == art, item.prompt
            assert art == ("an" if word[0] in "aeiou" else "a"), item.prompt
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if m["tag"] == "position":
            assert m["include"][1]["position"][1] == 0
            assert m["include"][0]["class"] != m["include"][1]["class"]
    assert {i.metadata["include"][1]["position"][0] for i in made if i.metadata["tag"] == "position"} == set(FLIP)


def test_generator_is_deterministic_and_distinct():
    a = generate_geneval_prompts(600, seed=11)
    assert a == generate_geneval_prompts(600, seed=11)
    assert [i.prompt for i in a] != [i.prompt for i in generate_geneval_prompts(600, seed=12)]
    assert len({fact(i.metadata) for i in a}) == 600
    assert set(Counter(i.metadata["tag"] for i in a)) == set(TEMPLATES)


def test_generator_excludes_mirrored_forms_without_data():
    """Excluding 'a dog below a cat' (plain text) removes 'a cat above a dog' too, even from the full pool."""
    full = 80 * 79 * 4 // 2  # ordered pairs x 4 relations, each said two ways
    made = generate_geneval_prompts(full - 1, seed=0, exclude=[PromptItem("a photo of a dog below a cat")],
                                    tags={"position": 1})
    prompts = {i.prompt for i in made}
    assert "a photo of a dog below a cat" not in prompts and "a photo of a cat above a dog" not in prompts
    assert "a photo of a dog above a cat" in prompts or "a photo of a cat below a dog" in prompts
    with pytest.raises(ValueError, match="only 12639"):
        generate_geneval_prompts(full, seed=0, exclude=[PromptItem("a photo of a dog below a cat")],
                                 tags={"position": 1})


@pytest.mark.parametrize("tag,pool", [("two_object", 80 * 79 // 2), ("position", 80 * 79 * 2)])
def test_full_pool_avoids_test_and_swapped_forms(geneval_rows, geneval_items, tag, pool):
    rows = [r for r in geneval_rows if r["tag"] == tag]
    test_facts = {fact(r) for r in rows}
    swapped = {swapped_prompt(r) for r in rows}
    n = pool - len(test_facts)
    made = generate_geneval_prompts(n, seed=5, exclude=geneval_items, tags={tag: 1})
    assert len({fact(i.metadata) for i in made}) == n
    assert not {fact(i.metadata) for i in made} & test_facts
    assert not {i.prompt for i in made} & (swapped | {r["prompt"] for r in geneval_rows})
    with pytest.raises(ValueError):
        generate_geneval_prompts(n + 1, seed=5, exclude=geneval_items, tags={tag: 1})


def test_no_overlap_with_test_file(geneval_rows, geneval_items):
    made = generate_geneval_prompts(6000, seed=7, exclude=geneval_items)
    test_facts = {fact(r) for r in geneval_rows}
    literal = {r["prompt"] for r in geneval_rows} | {
        swapped_prompt(r) for r in geneval_rows if r["tag"] in ("two_object", "color_attr", "position")
    }
    assert not {fact(i.metadata) for i in made} & test_facts
    assert not {i.prompt for i in made} & literal
    assert "single_object" not in {i.metadata["tag"] for i in made}  # the test set holds all 80 of them
    refuse_test_overlap(made, geneval_items, test_name="geneval")


def test_swapped_test_prompts_have_the_test_key(geneval_rows, geneval_items):
    for tag in ("two_object", "color_attr", "position"):
        row = next(r for r in geneval_rows if r["tag"] == tag)
        original = PromptItem(row["prompt"], row)
        swapped = PromptItem(swapped_prompt(row))  # plain text, no metadata
        assert swapped.prompt != original.prompt
        assert canonical_key(swapped) == canonical_key(original)
        with pytest.raises(ValueError, match="1 of the training prompts"):
            refuse_test_overlap([swapped], geneval_items, test_name="geneval")
    assert canonical_key(PromptItem("a photo of a cow left of a laptop")) != canonical_key(
        PromptItem("a photo of a laptop left of a cow"))


def test_refuse_test_overlap_refuses_the_test_file(geneval_items):
    with pytest.raises(ValueError) as e:
        refuse_test_overlap(geneval_items, geneval_items, test_name="geneval test_metadata")
    msg = str(e.value)
    assert "2212 of the training prompts" in msg and "(geneval test_metadata)" in msg
    assert "training on the test set is refused" in msg


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown GenEval tags"):
        generate_geneval_prompts(3, seed=0, tags={"counting": 1, "shapes": 1})
    with pytest.raises(ValueError, match="only 240"):
        generate_geneval_prompts(241, seed=0, tags={"counting": 1})
    with pytest.raises(ValueError):
        generate_geneval_prompts(-1, seed=0)
    assert generate_geneval_prompts(0, seed=0) == []


# --------------------------------------------------------------------------- sampler


def items(n: int) -> list[PromptItem]:
    return [PromptItem(f"prompt {i}", {"i": i}) for i in range(n)]


def test_sample_seed_is_blake2b_of_the_three_ints():
    for args in [(0, 0, 0), (42, 7, 3), (-5, 10**6, 15)]:
        digest = hashlib.blake2b(":".join(map(str, args)).encode(), digest_size=8).digest()
        assert sample_seed(*args) == int.from_bytes(digest, "big") >> 1
        assert 0 <= sample_seed(*args) < 2**63


def test_sampler_groups_and_seeds():
    s = GroupSampler(items(5), group_size=3, seed=9)
    groups = s.take(12)
    assert [g.group_id for g in groups] == list(range(12))
    for g in groups:
        assert len(g.seeds) == 3
        for i, seed in enumerate(g.seeds):
            raw = hashlib.blake2b(f"9:{g.group_id}:{i}".encode(), digest_size=8).digest()
            assert seed == int.from_bytes(raw, "big") >> 1
    assert len({x for g in groups for x in g.seeds}) == 36
    assert next(iter(s)).group_id == 12


def test_sampler_epochs_are_permutations():
    n = 7
    groups = GroupSampler(items(n), group_size=1, seed=1).take(5 * n)
    epochs = [[g.prompt for g in groups[k * n:(k + 1) * n]] for k in range(5)]
    for e in epochs:
        assert sorted(e) == sorted(f"prompt {i}" for i in range(n))
    assert len({tuple(e) for e in epochs}) > 1
    ordered = GroupSampler(items(n), group_size=1, seed=1, shuffle=False).take(2 * n)
    assert [g.prompt for g in ordered] == [f"prompt {i % n}" for i in range(2 * n)]


def test_sampler_is_deterministic():
    a = GroupSampler(items(20), group_size=2, seed=3).take(50)
    assert a == GroupSampler(items(20), group_size=2, seed=3).take(50)
    b = GroupSampler(items(20), group_size=2, seed=4).take(50)
    assert [g.prompt for g in a] != [g.prompt for g in b]


def test_sampler_is_independent_of_hash_seed():
    code = (
        "import json; from rollout.prompts.groups import GroupSampler; from rollout.prompts.files import builtin_prompts;"
        "print(json.dumps([[g.prompt, g.seeds] for g in "
        "GroupSampler(builtin_prompts(), group_size=2, seed=5).take(40)]))"
    )
    outs = []
    for hs in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        outs.append(out.stdout)
    assert outs[0] == outs[1]
    here = [[g.prompt, list(g.seeds)] for g in GroupSampler(builtin_prompts(), group_size=2, seed=5).take(40)]
    assert json.loads(outs[0]) == here


@pytest.mark.parametrize("stop", [3, 6, 7, 8, 20])  # mid-epoch, last of an epoch, boundary, later epochs
def test_sampler_resumes_exactly(stop):
    reference = GroupSampler(items(7), group_size=4, seed=21).take(40)
    first = GroupSampler(items(7), group_size=4, seed=21)
    first.take(stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = GroupSampler(items(7), group_size=4, seed=21)
    resumed.load_state_dict(state)
    assert resumed.take(40 - stop) == reference[stop:]


def test_sampler_validates_arguments_and_state():
    with pytest.raises(ValueError, match="group_size"):
        GroupSampler(items(3), group_size=0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        GroupSampler([], group_size=2, seed=0)
    s = GroupSampler(items(3), group_size=2, seed=0)
    with pytest.raises(ValueError, match="next_group_id") as e:
        s.load_state_dict({"epoch": 0, "position": 0, "bogus": 1})
    assert "bogus" in str(e.value)
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "position": 3, "next_group_id": 3})
    with pytest.raises(ValueError, match="epoch"):
        s.load_state_dict({"epoch": -1, "position": 0, "next_group_id": 0})
