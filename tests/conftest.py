"""Shared fixtures: a throwaway config per unit test; notebook tests run last, in course order."""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from course_utils.core.config import CourseConfig, load_config


@pytest.fixture
def config(tmp_path: Path) -> CourseConfig:
    """The smoke spec with a fresh workspace and no pre-seeded data cache."""
    return load_config("smoke", {"workspace": str(tmp_path / "workspace")}, environ={})


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a temporary folder, for download tests."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


STORY_WITH_VIOLENCE = (
    "Once upon a time a small tabby cat lived in a blue teapot by the sea. Every morning she counted the "
    "boats, sang to the gulls and shared her breakfast with a shy crab called Pim. One stormy night a wolf "
    "came down the hill and said he would kill the crab and all its friends. The cat was brave and kind."
)


# --- A fake OpenAI-compatible server: deterministic replies, errors on demand --------------------------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.seen.append(self.headers.get("Authorization", ""))
        if server.status != 200:  # echo the credentials back, as some servers do, to test scrubbing
            echoed = self.headers.get("Authorization", "") + self.headers.get("api-key", "")
            self._send(server.status, {"error": {"message": f"Rejected {echoed}", "type": "invalid_request_error"}})
            return
        if not request.get("stream"):
            self._send(200, {"id": "1", "object": "chat.completion", "created": 0, "model": "fake",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": server.reply}}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for token in re.findall(r"\S+\s*", server.reply):
            chunk = {"id": "1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_llm() -> Iterator[ThreadingHTTPServer]:
    """A fake endpoint; set ``.reply`` and ``.status`` to shape its answers; ``.seen`` lists the Authorization headers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    server.reply, server.status, server.seen = STORY_WITH_VIOLENCE, 200, []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (they fail fast), then the notebooks in course order."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is not None)


@pytest.fixture
def qdq_onnx() -> Callable[[Path, str], Path]:
    """``qdq_onnx(path, "fp16" | "fp32")``: a minimal ONNX whose only weight has that float type, the way ModelOpt's
    Q/DQ files for strongly and weakly typed TensorRT differ."""

    def make(path: Path, high_precision: str) -> Path:
        import onnx
        from onnx import TensorProto, helper

        dtype = TensorProto.FLOAT16 if high_precision == "fp16" else TensorProto.FLOAT
        weight = helper.make_tensor("w", dtype, [1], [1.0])
        node = helper.make_node("Add", ["images", "w"], ["logits"])
        graph = helper.make_graph([node], "qdq", [helper.make_tensor_value_info("images", dtype, [1])],
                                  [helper.make_tensor_value_info("logits", dtype, [1])], [weight])
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(helper.make_model(graph), str(path))
        return path

    return make


@pytest.fixture
def noise_image_folder(tmp_path: Path) -> Callable[[int, int], object]:
    """``noise_image_folder(train, val)``: an image folder of two visibly different classes (dark and bright noise,
    48 px) with that many images per class and split, read as the course reads a user's folder."""

    def make(train: int, val: int) -> object:
        import numpy as np
        from PIL import Image

        from course_utils.vision.data import read_image_folder

        rng = np.random.default_rng(0)
        for split, count in (("train", train), ("val", val)):
            for name, base in (("dark", 40), ("bright", 200)):
                folder = tmp_path / "set" / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    pixels = np.clip(base + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{index}.png")
        return read_image_folder(tmp_path / "set")

    return make
