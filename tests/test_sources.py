"""The config's data/eval sections turn into prompt lists; training on the GenEval test prompts is refused."""

from pathlib import Path

import pytest

from cluster.config import DataConfig, EvalConfig
from rollout.prompts.sources import eval_prompts, training_prompts

DATA = Path(__file__).resolve().parents[1] / "data"  # the prompt sets of Flow-GRPO (data/README.md)
GENEVAL = DATA / "geneval" / "test_metadata.jsonl"


def test_generated_training_prompts_avoid_the_test_file():
    test = GENEVAL
    test_prompts = {line.split('"prompt": "')[1].split('"')[0] for line in test.read_text().splitlines() if line}
    items = training_prompts(DataConfig(source="geneval_generate", num_prompts=500, exclude_path=str(test)), seed=3)
    assert len(items) == 500 and len({i.prompt for i in items}) == 500
    assert not {i.prompt for i in items} & test_prompts
    assert {i.metadata["tag"] for i in items} >= {"two_object", "counting", "colors", "position", "color_attr"}


def test_training_on_the_test_file_is_refused():
    test = GENEVAL
    with pytest.raises(ValueError, match="training on the test set is refused"):
        training_prompts(DataConfig(source="geneval_jsonl", path=str(test), exclude_path=str(test)))


def test_text_training_prompts_that_share_a_test_prompt_are_refused(tmp_path):
    test = GENEVAL
    p = tmp_path / "train.txt"
    p.write_text("a cosy cabin in the snow\na photo of two wine glasses\n")
    with pytest.raises(ValueError, match="1 of the training prompts"):
        training_prompts(DataConfig(source="text", path=str(p), exclude_path=str(test)))
    p.write_text("a cosy cabin in the snow\n")
    assert [i.prompt for i in training_prompts(DataConfig(source="text", path=str(p), exclude_path=str(test)))] == [
        "a cosy cabin in the snow"]


def test_eval_prompts_take_the_first_n():
    ocr = DATA / "ocr" / "test.txt"
    first = ocr.read_text().splitlines()[:5]
    items = eval_prompts(EvalConfig(source="text", path=str(ocr), num_prompts=5))
    assert [i.prompt for i in items] == [ln.strip() for ln in first]


def test_builtin_source_needs_no_file():
    assert len(training_prompts(DataConfig())) > 0
