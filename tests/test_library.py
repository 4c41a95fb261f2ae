"""Prompt names resolve to files inside the network folders, and nowhere else."""

from __future__ import annotations

import os

import pytest

from lib_scheduled_lora.core.library import NetworkLibrary, strip_network_tags
from lib_scheduled_lora.core.tags import tags_in_prompt
from lib_scheduled_lora.errors import MissingNetworkError


@pytest.fixture
def folders(tmp_path):
    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    (loras / "wday.safetensors").write_bytes(b"x")
    (loras / "styles" / "ink.safetensors").write_bytes(b"x")
    (loras / "notes.txt").write_text("not a network")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.safetensors").write_bytes(b"x")
    os.symlink(secret / "private.safetensors", loras / "leak.safetensors")
    return loras, secret


def test_names_are_file_stems_anywhere_below_the_folder(folders):
    loras, _ = folders
    library = NetworkLibrary.scan([loras])
    assert library.find("wday") == (loras / "wday.safetensors").resolve()
    assert library.find("ink") == (loras / "styles" / "ink.safetensors").resolve()


@pytest.mark.parametrize("name", ["../secret/private", "styles/ink", "/etc/passwd", "leak", "notes", "..", ""])
def test_names_cannot_escape_the_folders(folders, name):
    loras, _ = folders
    with pytest.raises(MissingNetworkError, match="no network named"):
        NetworkLibrary.scan([loras]).find(name)


def test_missing_network_names_the_tag(folders):
    loras, _ = folders
    with pytest.raises(MissingNetworkError) as error:
        NetworkLibrary.scan([loras]).find("nope", "<lora:nope:0@0.3:1>")
    assert str(error.value).startswith("<lora:nope:0@0.3:1>: no network named 'nope'")
    assert "wday" in str(error.value)


def test_tags_are_stripped_like_the_host_does():
    prompt = "a photo of <lora:wday:0@0.3:1> a man, <lyco:ink:0.5> white shirt"
    assert strip_network_tags(prompt) == "a photo of a man, white shirt"
    assert [tag.name for _, tag in tags_in_prompt(prompt)] == ["wday", "ink"]
    assert strip_network_tags("<hypernet:x:1> cat") == "<hypernet:x:1> cat"  # not ours


def test_a_bad_tag_stops_before_anything_runs():
    from lib_scheduled_lora.errors import ScheduleSyntaxError

    with pytest.raises(ScheduleSyntaxError, match="column 15"):
        tags_in_prompt("a cat <lora:x:0@0.3:abc>")
