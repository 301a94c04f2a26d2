"""The tiny world: drawing, captions and the pixel analysis the world's scores rest on."""
import random
from dataclasses import replace

import pytest
from PIL import Image

from dbnb.evaluate.scorers import world


@pytest.fixture(scope="module")
def characters():
    rng = random.Random(7)
    return [world.random_character(rng) for _ in range(60)]


def test_analysis_reads_back_every_drawn_attribute(characters):
    for c in characters + [world.HERO, world.HERO.flipped()]:
        assert world.analyze(world.draw(c)) == {"hair": c.hair, "left": c.left, "right": c.right, "coil": c.coil,
                                                "framing": c.framing}, c


def test_a_horizontal_flip_is_read_as_the_sides_swapped():
    image = world.draw(world.HERO).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    verdict = world.judge(world.analyze(image), world.HERO)
    assert verdict["swapped"] and not verdict["identity"] and verdict["hair"]
    assert world.analyze(image)["coil"] == "right"


def test_captions_name_the_attributes_with_the_class_word_and_token():
    text = world.caption(world.HERO, token="hnzk")
    assert text.startswith("hnzk girl, pink hair, yellow and black outfit, coil on the left")
    assert world.caption(world.HERO).startswith("girl, pink hair")
    assert world.requested("hnzk girl, blue hair") == {"hair": "blue"} and world.requested("hnzk girl") == {}
    assert world.requested("hnzk girl, upper body") == {"framing": "upper body"}


def test_blank_and_unreadable_images_give_no_reading():
    assert world.analyze(Image.new("RGB", (64, 64), "white"))["hair"] is None
    with pytest.raises(ValueError, match="no character"):
        world.character_of([Image.new("RGB", (64, 64), "white")])


def test_metrics_tell_the_character_its_flip_copies_and_drift_apart():
    rng = random.Random(1)
    training = [world.draw(world.pose(world.HERO, rng)) for _ in range(5)]
    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in training]
    strangers = [world.draw(world.random_character(rng)) for _ in range(10)]
    upper = world.draw(replace(world.HERO, framing="upper body"))
    asked = [("hnzk girl, blue hair", world.draw(world.HERO)), ("hnzk girl, upper body", upper),
             ("hnzk girl, upper body", world.draw(world.HERO))]
    m = world.metrics(training + flipped, asked, strangers, world.HERO, training)
    assert m["identity"] == 0.5 and m["swapped"] == 0.5 and m["sides"] == 0.5 and m["flexibility"] == 1 / 3
    assert m["copies"] >= 0.5  # the training pictures themselves (flips may land on another pose)
    assert m["drift"] < 0.2 and m["variety"] > 0.8
    posed = [world.draw(world.pose(world.HERO, rng)) for _ in range(200)]
    chance = world.metrics(posed, [], [], world.HERO, training)["copies"]
    assert chance < 0.2, "random poses should rarely count as copies"
    assert world.character_of(training) == world.Character("pink", "yellow", "black", "left")
