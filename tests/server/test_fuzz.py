"""Fuzz the live server from its own OpenAPI schema (schemathesis + hypothesis): over a thousand
generated requests across every route, none answered with a 5xx, and /health answers afterwards."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = 1100


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(tiny, start_server, tmp_path) -> None:
    # a short context keeps every generated generation short (max_tokens is capped by it)
    with start_server(*tiny, max_model_len=48, allowed_adapter_root=tmp_path, enable_runtime_lora=True) as s:
        with s.client() as c:
            spec = c.get("/openapi.json").json()
        schema = schemathesis.openapi.from_dict(spec)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"}
        statuses: dict[int, int] = {}
        failures: list[str] = []

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(*[op.as_strategy() for op in operations]))
        def check(case) -> None:
            response = case.call(base_url=s.url, timeout=30)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code}: "
                                f"{response.text[:300]}")

        check()
        assert sum(statuses.values()) >= 1000 and 200 in statuses and 400 in statuses, statuses
        assert not failures, "\n".join(failures[:10])
        with s.client() as c:
            assert c.get("/health").status_code == 200
            ok = c.post("/v1/completions", json={"model": s.served, "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200
