"""Runtime adapter loading over HTTP: every path that escapes the allowed root is refused, a good
path loads and serves, a malformed adapter is a 400 and the server keeps answering."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorascope.adapters.peft import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny):
    """root/ (allowed) holding good/ and traps; outside/ holding an adapter the server must not read."""
    base = tmp_path_factory.mktemp("runtime-lora")
    root, outside = base / "root", base / "outside"
    src = sorted(tiny[1].values())[0]
    shutil.copytree(src, root / "good")
    shutil.copytree(src, outside / "evil")
    (root / "sub").mkdir()
    (root / "a-file").write_text("not an adapter")
    (root / "link-out").symlink_to(outside / "evil", target_is_directory=True)
    (root / "sub" / "link-up").symlink_to(base, target_is_directory=True)
    half = root / "half-link"  # a real directory whose config file links outside
    half.mkdir()
    shutil.copy(src / WEIGHTS_FILE, half / WEIGHTS_FILE)
    (half / CONFIG_FILE).symlink_to(outside / "evil" / CONFIG_FILE)
    nan = root / "nan"  # a NaN in one tensor
    shutil.copytree(src, nan)
    tensors = load_file(nan / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / WEIGHTS_FILE)
    shutil.copytree(src, root / "no-weights")
    (root / "no-weights" / WEIGHTS_FILE).unlink()
    shutil.copytree(src, root / "bad-json")
    (root / "bad-json" / CONFIG_FILE).write_text("{ not json")
    return root, outside


@pytest.fixture(scope="module")
def rt_server(tiny, layout, start_server):
    with start_server(tiny[0], tiny[1], allowed_adapter_root=layout[0], enable_runtime_lora=True) as s:
        yield s


def _names(c) -> set[str]:
    return {m["id"] for m in c.get("/v1/models").json()["data"]}


ESCAPES = [
    ("../outside/evil", 400, "'..'"),
    ("good/../../outside/evil", 400, "'..'"),
    ("a/../../b", 400, "'..'"),
    ("{outside}/evil", 403, "outside the allowed"),
    ("/etc", 403, "outside the allowed"),
    ("/", 403, "outside the allowed"),
    ("link-out", 403, "outside the allowed"),
    ("sub/link-up/outside/evil", 403, "outside the allowed"),
    ("{root}/link-out", 403, "outside the allowed"),
    ("half-link", 403, "links outside"),
    ("a-file", 400, "not a directory"),
    ("missing", 400, "not a directory"),
    ("", 400, "lora_path"),
    (".", 400, ""),  # the root itself is no adapter
    ("nan", 400, "NaN"),
    ("no-weights", 400, WEIGHTS_FILE),
    ("bad-json", 400, "JSON"),
]


@pytest.mark.parametrize(("path", "status", "says"), ESCAPES, ids=[e[0] or "empty" for e in ESCAPES])
def test_escapes_and_bad_adapters_are_refused(rt_server, layout, path: str, status: int, says: str) -> None:
    root, outside = layout
    lora_path = path.format(root=root, outside=outside)
    with rt_server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "intruder", "lora_path": lora_path})
        assert r.status_code == status, r.text
        assert says in r.json()["error"]["message"]
        assert "intruder" not in _names(c)
        # the server keeps serving
        ok = c.post("/v1/completions", json={"model": rt_server.served, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_good_adapter_loads_serves_and_unloads(rt_server, layout, tiny) -> None:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with rt_server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "good"})
        assert r.status_code == 200, r.text
        card = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "fresh")
        assert card["parent"] == rt_server.served and card["root"] == str((layout[0] / "good").resolve())
        # same weights as the adapter good/ was copied from: the same tokens
        same = sorted(tiny[1].items())[0][0]
        got = c.post("/v1/completions", json={"model": "fresh"} | body).json()["choices"][0]["token_ids"]
        want = c.post("/v1/completions", json={"model": same} | body).json()["choices"][0]["token_ids"]
        assert got == want
        dup = c.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "good"})
        assert dup.status_code == 400 and "already" in dup.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert c.post("/v1/completions", json={"model": "fresh"} | body).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404


@pytest.mark.parametrize("name", ["a,b", "with space", "", "tiny-base"])
def test_bad_adapter_names_are_refused(rt_server, name: str) -> None:
    with rt_server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "good"})
    assert r.status_code == 400 and "lora_name" in r.json()["error"]["message"]


def test_runtime_loading_needs_a_root(tiny, start_server) -> None:
    with start_server(*tiny, enable_runtime_lora=True) as s, s.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(Path(tiny[1][sorted(tiny[1])[0]]))})
        assert r.status_code == 403 and "allowed-adapter-root" in r.json()["error"]["message"]
