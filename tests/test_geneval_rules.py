"""GenEval's rules on hand-built detections: accuracy, strict accuracy and partial reward, each computed by hand."""

from __future__ import annotations

import pytest

from rewards.geneval_rules import (
    Detection,
    accuracy,
    group_by_class,
    partial_reward,
    relative_position,
    strict_accuracy,
)


def det(label: str, box: tuple[float, float, float, float] = (0, 0, 10, 10), score: float = 0.9,
        color: str | None = None) -> Detection:
    return Detection(label, score, box, color=color)


def scores(objects: list[Detection], meta: dict) -> tuple[bool, bool, float]:
    grouped = group_by_class(objects, min_score=0.0)
    return accuracy(grouped, meta), strict_accuracy(grouped, meta), partial_reward(grouped, meta)


def check(objects: list[Detection], meta: dict, acc: bool, strict: bool, partial: float) -> None:
    got = scores(objects, meta)
    assert got[:2] == (acc, strict)
    assert got[2] == pytest.approx(partial, abs=1e-12)


# ------------------------------------------------------------------------------------------------- single_object

SINGLE = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}


def test_single_object() -> None:
    check([det("bowl")], SINGLE, True, True, 1.0)
    check([det("cup")], SINGLE, False, False, 0.0)  # 1 - |1 - 0| / 1
    check([det("bowl"), det("bowl", (50, 50, 60, 60))], SINGLE, True, False, 0.0)  # top-1 passes; 1 - |1 - 2| / 1


# ---------------------------------------------------------------------------------------------------- two_object

TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}


def test_two_object() -> None:
    check([det("cat"), det("dog")], TWO, True, True, 1.0)
    check([det("cat")], TWO, False, False, 0.5)  # mean(1, 0)
    dogs = [det("dog", (i * 20, 0, i * 20 + 10, 10)) for i in range(3)]
    check([det("cat"), *dogs], TWO, True, False, 0.0)  # mean(1, 1 - 2/1 = -1)


# ------------------------------------------------------------------------------------------------------ counting

COUNTING = {"tag": "counting", "include": [{"class": "wine glass", "count": 3}],
            "exclude": [{"class": "wine glass", "count": 4}]}


def glasses(n: int) -> list[Detection]:
    return [det("wine glass", (i * 20, 0, i * 20 + 10, 10), score=0.9 - i * 0.01) for i in range(n)]


def test_counting_exact() -> None:
    check(glasses(3), COUNTING, True, True, 1.0)


def test_counting_under() -> None:
    check(glasses(2), COUNTING, False, False, 1 - 1 / 3)


def test_counting_over_fails_by_its_exclude_clause() -> None:
    check(glasses(4), COUNTING, False, False, 1 - 1 / 3)
    # Without the exclude clause the top-3 of four glasses pass the official check: the exclude is what fails it.
    no_exclude = {k: v for k, v in COUNTING.items() if k != "exclude"}
    check(glasses(4), no_exclude, True, False, 1 - 1 / 3)


def test_counting_far_over_is_negative() -> None:
    check(glasses(7), COUNTING, False, False, 1 - 4 / 3)  # n > 2N


# -------------------------------------------------------------------------------------------------------- colors

COLORS_META = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}


def test_colors() -> None:
    check([det("car", color="red")], COLORS_META, True, True, 1.0)
    check([det("car", color="blue")], COLORS_META, False, False, 0.5)  # mean(1, 1 - |1 - 0|/1)
    check([], COLORS_META, False, False, 0.0)  # mean(0, 0)


def test_colors_official_checks_only_the_top_n() -> None:
    cars = [det("car", score=0.9, color="red"), det("car", (30, 0, 40, 10), score=0.5, color="blue")]
    check(cars, COLORS_META, True, False, 0.0)  # mean(1 - |1 - 2|/1 = 0, 0: count wrong with a colour clause)


def test_color_credit_counts_crops_of_that_colour() -> None:
    meta = {"tag": "colors", "include": [{"class": "apple", "count": 2, "color": "red"}]}
    apples = [det("apple", color="red"), det("apple", (30, 0, 40, 10), score=0.8, color="green")]
    check(apples, meta, False, False, (1 + (1 - 1 / 2)) / 2)


def test_colour_clause_needs_coloured_detections() -> None:
    with pytest.raises(ValueError, match="need a colour"):
        scores([det("car")], COLORS_META)


# ---------------------------------------------------------------------------------------------------- color_attr

COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                               {"class": "scissors", "count": 1, "color": "black"}]}


def test_color_attr() -> None:
    bag = det("handbag", color="pink")
    check([bag, det("scissors", (50, 0, 60, 10), color="black")], COLOR_ATTR, True, True, 1.0)
    check([bag, det("scissors", (50, 0, 60, 10), color="white")], COLOR_ATTR, False, False, 3 / 4)  # (1, 1, 1, 0)
    check([bag], COLOR_ATTR, False, False, 2 / 4)  # (1, 1, 0, 0)


# ------------------------------------------------------------------------------------------------------ position

CAT = (100, 100, 200, 200)  # centre (150, 150), 100 × 100


@pytest.mark.parametrize(("box", "relations"), [
    # offset (200, 20); revised (200 - 20, max(20 - 20, 0)) = (180, 0); dx = 180 / |(200, 20)| = 0.896
    ((300, 120, 400, 220), {"right of"}),
    # offset (-200, 0): dx = -180 / 200 = -0.9
    ((-100, 100, 0, 200), {"left of"}),
    # offset (0, -150): dy = -(150 - 20) / 150 = -0.867 (y grows downward: smaller y is above)
    ((100, -50, 200, 50), {"above"}),
    # offset (10, 150): revised (0, 130): dy = 130 / |(10, 150)| = 0.865
    ((110, 250, 210, 350), {"below"}),
    # offset (200, 200): revised (180, 180) / 282.8 = 0.636 each: diagonal, both relations
    ((300, 300, 400, 400), {"right of", "below"}),
    # offset (100, 60): revised (80, 40) / 116.6 = (0.686, 0.343): right only
    ((200, 160, 300, 260), {"right of"}),
    # offset (15, 10) within 0.1 × (100 + 100) on both axes: no relation
    ((115, 110, 215, 210), set()),
])
def test_relative_position(box: tuple[float, float, float, float], relations: set[str]) -> None:
    assert relative_position(det("dog", box), det("cat", CAT)) == relations


def position_meta(relation: str, cats: int = 1) -> dict:
    return {"tag": "position", "include": [{"class": "cat", "count": cats},
                                           {"class": "dog", "count": 1, "position": [relation, 0]}]}


PLACES = {"right of": (300, 100, 400, 200), "left of": (-100, 100, 0, 200),
          "above": (100, -100, 200, 0), "below": (100, 300, 200, 400)}
OPPOSITE = {"right of": "left of", "left of": "right of", "above": "below", "below": "above"}


@pytest.mark.parametrize("relation", list(PLACES))
def test_position_each_relation(relation: str) -> None:
    objects = [det("cat", CAT), det("dog", PLACES[relation])]
    check(objects, position_meta(relation), True, True, 1.0)
    # Misplaced: (1, 1, 0) -> 2/3; the reference server's extra 1.0 would give 0.75.
    check(objects, position_meta(OPPOSITE[relation]), False, False, 2 / 3)
    assert partial_reward(group_by_class(objects, 0.0), position_meta(OPPOSITE[relation])) != 0.75


def test_position_without_its_target_fails() -> None:
    check([det("dog", PLACES["right of"])], position_meta("right of"), False, False, 1 / 3)  # (0, 1, 0)


def test_position_relates_every_dog_to_every_cat() -> None:
    cats = [det("cat", CAT), det("cat", (500, 100, 600, 200), score=0.8)]  # the dog is between them
    check([*cats, det("dog", PLACES["right of"])], position_meta("right of", cats=2), False, False, 2 / 3)


def test_position_official_checks_the_top_dog() -> None:
    dogs = [det("dog", PLACES["right of"], score=0.9), det("dog", PLACES["left of"], score=0.6)]
    check([det("cat", CAT), *dogs], position_meta("right of"), True, False, 1 / 3)  # (1, 1 - 1 = 0, 0)


# --------------------------------------------------------------------------------------------------- thresholding


def test_group_by_class_thresholds_sorts_and_caps() -> None:
    objects = [det("cup", score=s) for s in (0.2, 0.95, 0.5, 0.3)] + [det("dog", score=0.31)]
    grouped = group_by_class(objects, min_score=0.3)
    assert [d.score for d in grouped["cup"]] == [0.95, 0.5]  # strictly above the threshold, best first
    assert [d.score for d in grouped["dog"]] == [0.31]
    many = [det("cup", score=0.5 + i / 100) for i in range(20)]
    assert len(group_by_class(many, 0.0, max_per_class=16)["cup"]) == 16
    assert "cup" not in group_by_class([det("cup", score=0.3)], 0.3)


def test_bad_position_target_is_named() -> None:
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]}
    with pytest.raises(ValueError, match="earlier include clause"):
        accuracy(group_by_class([det("dog")], 0.0), meta)
