"""The shared grammar vectors (tests/schedule_vectors.json) agree with the Python core.

The same file is checked against the JavaScript port by ``node --test tests/js/``; this side makes
sure the file itself is what the core produces today, so it cannot go stale silently.
"""

from __future__ import annotations

import json

import make_schedule_vectors as vectors
import pytest

from lib_scheduled_lora.core.schedule import parse_schedule
from lib_scheduled_lora.core.tags import parse_tag


@pytest.fixture(scope="module")
def stored():
    return json.loads(vectors.VECTORS_PATH.read_text(encoding="utf-8"))


def test_file_matches_a_fresh_generation(stored):
    fresh = json.loads(vectors.dumps(vectors.build()))
    assert stored == fresh, "tests/schedule_vectors.json is stale: run python tests/make_schedule_vectors.py"


def test_every_doc_example_is_covered(stored):
    texts = {v["text"] for v in stored["tags"]}
    assert set(vectors.DOC_TAGS) <= texts
    assert "<lora:wday:0@0.3:1>" in texts


def test_vectors_cover_errors_and_canonical_forms(stored):
    tags = stored["tags"]
    assert sum("error" in v for v in tags) >= 30
    canon = {v["canonical"] for v in tags if "canonical" in v}
    # te/unet, hires, dyn, pass-through and named forms all appear in canonical text
    for needle in ("te=", "hr=", "hrte=", "hrunet=", "dyn=", "lbw="):
        assert any(needle in c for c in canon), needle
    random_tags = stored["random_tags"]
    assert 0.15 < sum("canonical" in v for v in random_tags) / len(random_tags) < 0.85


def test_canonical_text_round_trips(stored):
    for v in stored["tags"] + stored["random_tags"]:
        if "canonical" in v:
            assert parse_tag(v["canonical"]) == parse_tag(v["text"])
            assert parse_tag(v["canonical"]).format() == v["canonical"]
    for v in stored["schedules"]:
        if "canonical" in v:
            assert parse_schedule(v["canonical"]) == parse_schedule(v["text"])


def test_the_docs_error_example(stored):
    (v,) = [v for v in stored["tags"] if v["text"] == "<lora:x:0@0.3:abc>"]
    assert v["error"] == "<lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"
    assert v["column"] == 15
