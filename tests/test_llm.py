"""The LLM endpoint's keys: a custom server may need none; the hosted providers need one, named in the error."""

from __future__ import annotations

from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError
from course_utils.genai.llm import LOCAL_API_KEY, LLMEndpointError, check_endpoint, endpoint, make_client

SECRET = "sk-test-SECRET-0123456789abcdef"


def _with_llm(config: CourseConfig, **llm: object) -> CourseConfig:
    return config.model_copy(update={"llm": config.llm.model_copy(update=llm)})


def test_custom_server_without_a_key_gets_a_client(config: CourseConfig, tmp_path: Path,
                                                   fake_llm: ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{fake_llm.server_address[1]}/v1"
    custom = _with_llm(config, provider="custom", base_url=url, model="m", api_key_env="NO_SUCH_KEY")
    ep = endpoint(custom, environ={}, secrets_file=tmp_path / "none.env")
    assert ep.provider == "custom" and ep.base_url == url and ep.keyless
    assert "<not needed>" in repr(ep) and LOCAL_API_KEY not in repr(ep) + ep.describe()
    assert make_client(ep).base_url is not None
    assert check_endpoint(ep) >= 0  # the client really talks to the keyless server
    assert len(fake_llm.seen) == 1  # type: ignore[attr-defined]


def test_custom_server_uses_a_key_when_there_is_one(config: CourseConfig, tmp_path: Path) -> None:
    custom = _with_llm(config, provider="custom", base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY")
    ep = endpoint(custom, environ={"MY_KEY": SECRET}, secrets_file=tmp_path / "none.env")
    assert not ep.keyless and ep.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(ep) and "$MY_KEY" in repr(ep)


def test_keyless_custom_server_that_wants_a_key_names_the_variable(config: CourseConfig, tmp_path: Path,
                                                                   fake_llm: ThreadingHTTPServer) -> None:
    fake_llm.status = 401  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{fake_llm.server_address[1]}/v1"
    custom = _with_llm(config, provider="custom", base_url=url, api_key_env="VLLM_KEY", max_retries=0)
    with pytest.raises(LLMEndpointError, match="wants an API key.*VLLM_KEY.*llm.api_key_env") as error:
        check_endpoint(endpoint(custom, environ={}, secrets_file=tmp_path / "none.env"))
    assert LOCAL_API_KEY not in str(error.value)


@pytest.mark.parametrize("provider, extra", [("openai", {}), ("nim", {}),
                                             ("azure", {"base_url": "https://x.openai.azure.com",
                                                        "azure_api_version": "2024-10-21"})])
def test_hosted_providers_without_a_key_name_the_variable(config: CourseConfig, tmp_path: Path, provider: str,
                                                          extra: dict[str, str]) -> None:
    hosted = _with_llm(config, provider=provider, api_key_env="NO_SUCH_KEY", **extra)
    with pytest.raises(LLMEndpointError, match="NO_SUCH_KEY.*llm.api_key_env") as error:
        endpoint(hosted, environ={}, secrets_file=tmp_path / "none.env")
    assert isinstance(error.value, CourseError) and LOCAL_API_KEY not in str(error.value)
