"""Serving a model the way vLLM users do, without workers: served names and their defaults,
``--chat-template`` as a file or inline, a chat request to a model without a chat template
(400, not a guessed template), ``/v1/models/{id}`` and 404 for unknown models through the
real HTTP front of a real (not started) ``Router``, and user mistakes on ``pdserve serve``
that end with one clear line instead of a traceback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.router.flow import RequestError
from pdserve.router.http import HttpFront
from pdserve.router.pool_config import PoolConfig
from pdserve.router.served_model import load_chat_template, served_names
from pdserve.router.server import Router, RouterConfig
from tests.gguf_files import write_gguf

BIN = Path(sys.executable).parent
MESSAGES = [{"role": "user", "content": "Hi"}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def test_served_names_default_to_the_model_argument_as_given() -> None:
    assert served_names("/models/llama/") == ("/models/llama/",)
    assert served_names("smollm2", ["chat", "smol", "chat"]) == ("chat", "smol")
    with pytest.raises(ValueError, match="must not be empty"):
        served_names("x", [" "])


def test_chat_template_is_a_file_or_inline_jinja(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_chat_template(str(tmp_path / "empty.jinja"))


@pytest.fixture(scope="module")
def bare_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a GGUF file whose metadata has no chat template."""
    return write_gguf(builtin_checkpoint("tiny"), tmp_path_factory.mktemp("bare") / "bare.gguf",
                      tokenizer=True, chat_template=False)


def router(model: Path, **config: Any) -> Router:
    engine = EngineConfig(model=str(model), dtype="float32", device="cpu")
    return Router(RouterConfig(pools=PoolConfig(engine=engine), **config))


async def _call(front: HttpFront, method: str, path: str,
                body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    port = await front.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"http://127.0.0.1:{port}{path}", json=body) as resp:
            return resp.status, await resp.json()
    finally:
        await front.stop()


def call(r: Router, method: str, path: str, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, Any]]:
    return asyncio.run(_call(HttpFront(r), method, path, body))


def test_chat_to_a_model_without_template_is_a_clear_400(bare_gguf: Path) -> None:
    r = router(bare_gguf)
    assert r.model_names == (str(bare_gguf),)  # the --model argument, as given
    status, body = call(r, "POST", "/v1/chat/completions",
                        {"model": str(bare_gguf), "messages": MESSAGES})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "has no chat template" in body["error"]["message"]
    assert "--chat-template" in body["error"]["message"]
    assert r.outcomes == {"invalid_argument": 1}  # refused, and counted as such
    assert r.metrics.samples()['pdserve:requests_total{outcome="invalid_argument"}'] == 1


def test_the_given_chat_template_renders_conversations(bare_gguf: Path) -> None:
    r = router(bare_gguf, chat_template=TEMPLATE)
    assert r.tokenizer.decode(r.render_chat(MESSAGES)) == "<user>Hi\n"
    plain = router(bare_gguf)
    with pytest.raises(RequestError, match="no chat template") as refused:
        plain.render_chat(MESSAGES)
    assert refused.value.code == "invalid_argument"


def test_models_by_id_and_unknown_models_through_the_http_front(bare_gguf: Path) -> None:
    r = router(bare_gguf, served_model_names=("tiny-chat", "default"))
    status, listing = call(r, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny-chat", "default"]
    assert listing["data"][0]["root"] == str(bare_gguf)
    status, card = call(r, "GET", "/v1/models/default")
    assert status == 200 and card["id"] == "default" and card["object"] == "model"
    status, body = call(r, "GET", "/v1/models/gpt-4o")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = call(r, "POST", "/v1/completions", {"model": "gpt-4o", "prompt": "Hi"})
    assert status == 404 and "'gpt-4o' does not exist" in body["error"]["message"]
    assert "'tiny-chat', 'default'" in body["error"]["message"]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "pdserve"), "serve", *args], capture_output=True,
                          text=True, timeout=120)


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_user_mistakes_end_serve_with_one_clear_line(tmp_path: Path) -> None:
    line = _one_error_line(_serve("--model", str(tmp_path / "no-such-model")))
    assert line.startswith("pdserve: error: model ") and "neither a built-in" in line
    line = _one_error_line(_serve("--model", "tiny", "--chat-template",
                                  str(tmp_path / "chat.jinja")))
    assert "--chat-template" in line and "neither an existing file" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_error_line(_serve("--model", "tiny", "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    line = _one_error_line(_serve("--max-num-seqs", "many"))
    assert "--max-num-seqs: invalid int value: 'many'" in line  # argparse's own line


def test_verbose_is_accepted_after_the_subcommand_as_the_chart_passes_it() -> None:
    from pdserve.cli import build_parser

    parser = build_parser()
    for argv in (["serve", "--model", "tiny", "-v"], ["-v", "serve"], ["serve", "--verbose"]):
        assert parser.parse_args(argv).verbose is True, argv
    assert parser.parse_args(["serve", "--log-level", "debug"]).log_level == "debug"
    assert parser.parse_args(["serve"]).model == "smollm2"
