"""Where a model loads from: a local folder, the Hugging Face cache with no network, or one quick look at the hub."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from longdoc.errors import LongDocError
from longdoc.model import load_model, resolve_device

MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "needle-tiny"
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline mode off, and a record of every host name looked up (each one fails)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    lookups: list[str] = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return Path(constants.HF_HUB_CACHE), lookups


def test_hub_model_not_cached_fails_after_one_lookup_without_retries(hub):
    _, lookups = hub
    started = time.perf_counter()
    with pytest.raises(LongDocError, match="neither a local folder nor in the Hugging Face cache, and the hub cannot"):
        load_model("meta-llama/Llama-3.1-8B-Instruct", device="cpu")
    elapsed = time.perf_counter() - started
    # One request (its transport reconnects once at once); the hub client's backoff retries would make 6 over ~23 s.
    assert set(lookups) == {"huggingface.co"} and len(lookups) <= 2, lookups
    assert elapsed < 2, elapsed


def test_hub_model_not_cached_in_offline_mode_fails_without_any_lookup(hub, monkeypatch):
    _, lookups = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongDocError, match="the hub is switched off"):
        load_model("meta-llama/Llama-3.1-8B-Instruct", device="cpu")
    assert lookups == []


def test_cached_hub_model_loads_without_touching_the_network(hub):
    cache, lookups = hub
    repo = cache / "models--longdoc-test--needle-tiny"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy(MODEL / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model, tokenizer = load_model("longdoc-test/needle-tiny", device="cpu")
    assert tokenizer.is_fast and model.config.num_hidden_layers > 0
    assert lookups == []


def test_local_folder_loads_without_touching_the_network(hub):
    _, lookups = hub
    model, tokenizer = load_model(str(MODEL), device="cpu")
    assert tokenizer.is_fast and model.config._attn_implementation == "longdoc_sdpa"
    assert lookups == []


@pytest.mark.parametrize(
    "name, message",
    [
        ("br[acket]/nope[1]", "neither a local folder nor a Hugging Face hub id"),
        (str(MODEL / "config.json"), "is not a model folder"),
    ],
)
def test_names_that_are_no_model(hub, name, message):
    with pytest.raises(LongDocError, match=message.replace("[", r"\[")):
        load_model(name, device="cpu")
    assert hub[1] == []


def test_folder_without_tokenizer_files_is_refused_before_the_weights_load(tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ["config.json", "generation_config.json", "model.safetensors"]:
        shutil.copy(MODEL / name, folder / name)
    with pytest.raises(LongDocError, match="could not load a tokenizer .* put the model's tokenizer.json"):
        load_model(str(folder), device="cpu")


def test_damaged_weights_are_one_error(tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(MODEL, folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(LongDocError, match="could not load the weights"):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda1", "cpu:0"])
def test_malformed_device_is_refused(device):
    with pytest.raises(LongDocError, match=f"unknown device '{device}'"):
        resolve_device(device)
