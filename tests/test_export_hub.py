"""Model card and Hub push, against a loopback fake Hub (tests/hub_server.py): nothing leaves 127.0.0.1."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lens_tune.export.card import write_model_card
from lens_tune.export.hub import NO_TOKEN, HubError, push_to_hub
from lens_tune.recipe.load import load_recipe
from lens_tune.recipe.schema import Recipe
from tests.hub_server import FakeHub

TOKEN = "hf_TESTsecretTOKEN0123456789abcdefXYZ"
REPO = "alice/robot-lora"


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """Online mode, no saved login, no real endpoint, and every socket connection checked to be loopback."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"), raising=False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"), raising=False)
    monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port, never the real Hub

    real_connect = socket.socket.connect
    seen: list = []

    def connect(self, address):
        seen.append(address)
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert address[0] in ("127.0.0.1", "::1", "localhost"), f"connection outside loopback: {address!r}"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield seen


def make_export(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "pytorch_lora_weights.safetensors": bytes(range(256)) * 40 + b"\x00\xff\x00binary",
        "lens_comfyui.safetensors": b"\x00" * 1000 + bytes(range(255, -1, -1)),
        "README.md": b"---\nlicense: mit\ntags:\n- lora\n---\n# test\n",
        "adapter_config.json": b'{"r": 8}\n',
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_token(tmp_path: Path, caplog, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in str(record.args)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


# ------------------------------------------------------------------------------------------------------------------
# push


def test_push_uploads_every_byte_in_one_private_commit(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    export = tmp_path / "export"
    files = make_export(export)
    with FakeHub() as hub:
        url = push_to_hub(export, REPO, private=True, token=TOKEN, endpoint=hub.endpoint)
        assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
        assert len(url.rsplit("/", 1)[1]) == 40
    assert len(hub.commits) == 1
    assert hub.commits[0]["repo"] == REPO and hub.commits[0]["revision"] == "main"
    assert hub.files == files
    assert hub.created and hub.created[0]["name"] == "robot-lora" and hub.created[0]["organization"] == "alice"
    assert hub.repos[REPO]["private"] is True
    assert hub.unknown == []
    assert hub.authorizations and all(a == f"Bearer {TOKEN}" for a in hub.authorizations)
    assert snapshot(export) == files
    assert_no_token(tmp_path, caplog, url)


def test_push_public_to_existing_repo_with_token_from_env(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    export = tmp_path / "export"
    files = make_export(export)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(existing={REPO}) as hub:
        push_to_hub(export, REPO, private=False, endpoint=hub.endpoint)
    assert len(hub.commits) == 1 and hub.files == files
    assert hub.unknown == []
    assert all(a == f"Bearer {TOKEN}" for a in hub.authorizations)
    assert_no_token(tmp_path, caplog)


def test_push_uses_saved_login(tmp_path, caplog):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    export = tmp_path / "export"
    make_export(export)
    with FakeHub() as hub:
        push_to_hub(export, REPO, private=True, endpoint=hub.endpoint)
    assert all(a == f"Bearer {TOKEN}" for a in hub.authorizations)
    assert hub.repos[REPO]["private"] is True


def test_missing_token(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    export = tmp_path / "export"
    files = make_export(export)
    with FakeHub() as hub:
        with pytest.raises(HubError) as info:
            push_to_hub(export, REPO, private=True, endpoint=hub.endpoint)
    assert str(info.value) == NO_TOKEN
    assert hub.requests == []
    assert snapshot(export) == files


@pytest.mark.parametrize(
    "fail, expected",
    [
        ({"create": 401}, "rejected the token (401): it is invalid or expired"),
        ({"commit": 401}, "rejected the token (401): it is invalid or expired"),
        ({"create": 403}, f"no write access to {REPO} (403): the token's user cannot write there"),
        ({"commit": 403}, f"no write access to {REPO} (403): the token's user cannot write there"),
        ({"create": 409}, f"the name {REPO} conflicts with an existing repository"),
    ],
)
def test_refusals(tmp_path, caplog, fail, expected):
    caplog.set_level(logging.DEBUG)
    export = tmp_path / "export"
    files = make_export(export)
    with FakeHub(fail=fail) as hub:
        with pytest.raises(HubError) as info:
            push_to_hub(export, REPO, private=True, token=TOKEN, endpoint=hub.endpoint)
    message = str(info.value)
    assert expected in message
    assert message.count("\n") == 0
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert hub.commits == []
    assert hub.unknown == []
    assert snapshot(export) == files
    assert_no_token(tmp_path, caplog, message, repr(info.value))


def test_connection_refused(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    export = tmp_path / "export"
    files = make_export(export)
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(HubError) as info:
        push_to_hub(export, REPO, private=True, token=TOKEN, endpoint=endpoint)
    assert str(info.value) == f"could not reach the Hugging Face Hub at {endpoint}"
    assert snapshot(export) == files
    assert_no_token(tmp_path, caplog, str(info.value))


# ------------------------------------------------------------------------------------------------------------------
# model card

RECIPE = """
model:
  source: SceneWorks/Lens
data:
  trigger: sks
  datasets:
    - kind: subject
      folder: images
      resolution: [512, 768]
dreambooth:
  instance_prompt: a photo of [trigger] toy robot
lora:
  rank: 8
  alpha: 4
train:
  steps: 300
  learning_rate: 0.0002
  optimizer: adamw
  batch_size: 2
validation:
  prompts:
    - a photo of [trigger] toy robot on a beach
    - a watercolor of [trigger] toy robot
"""


@pytest.fixture
def recipe(tmp_path) -> Recipe:
    path = tmp_path / "run" / "recipe.lock.yaml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    return load_recipe(path, Recipe)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_model_card(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    grid = tmp_path / "run" / "samples" / "step-000300" / "grid.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (64, 32), "red").save(grid)
    export = tmp_path / "export"
    make_export(export)
    readme = write_model_card(export, recipe, repo_id=REPO, trigger="sks", steps=300, sample_grid=grid,
                              base_model="SceneWorks/Lens")
    assert readme == export / "README.md"
    text = readme.read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "SceneWorks/Lens"
    assert meta["library_name"] == "diffusers"
    assert meta["license"] == "mit"
    assert meta["tags"] == ["lora", "text-to-image", "lens", "lens-tune", "diffusers"]
    assert meta["instance_prompt"] == "a photo of sks toy robot"
    assert [w["text"] for w in meta["widget"]] == ["a photo of sks toy robot on a beach", "a watercolor of sks toy robot"]
    assert all(w["output"]["url"] == "samples.png" for w in meta["widget"])
    assert (export / "samples.png").read_bytes() == grid.read_bytes()
    assert "(samples.png)" in text
    for needle in ("# robot-lora", "`sks`", "lens-tune sample --model SceneWorks/Lens --adapter alice/robot-lora",
                   "from lens_tune import LensPipeline", "pipe.load_lora_weights(", "lens_comfyui.safetensors",
                   "ComfyUI/models/loras/", "| rank | 8 |", "| alpha | 4.0 |", "| targets | attention-mlp |",
                   "| steps | 300 |", "| learning rate | 0.0002 |", "| optimizer | adamw |",
                   "| resolution(s) | 512, 768 |", "| batch size | 2 |", "| adapter type | lora |"):
        assert needle in text, needle
    assert TOKEN not in text
    assert str(tmp_path) not in text and "/images" not in text
    assert not any(line.lstrip("`'\"(").startswith("/") for line in text.splitlines() if line.strip())


def test_model_card_local_model_no_grid(tmp_path, recipe):
    export = tmp_path / "export"
    export.mkdir()
    local_model = tmp_path / "models" / "lens-local"
    text = write_model_card(export, recipe, repo_id=None, trigger=None, steps=10, sample_grid=None,
                            base_model=str(local_model)).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "lens-local"
    assert meta["instance_prompt"] == "a photo of sks toy robot"  # the recipe's trigger
    assert "output" not in meta["widget"][0]
    assert not (export / "samples.png").exists()
    assert str(tmp_path) not in text
