"""`lorascope verify`: the classification rules on hand-made references, the reference cache, the
embedded engine passing (tiny and a Qwen2-style model with qkv bias; mixed ranks and targets; base
requests mixed in), a deliberately broken engine caught as *wrong adapter* with the right names, bad
input, and the stamp on report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorascope.adapters.synthetic import make_adapters
from lorascope.analysis.report import build_report
from lorascope.cli import app
from lorascope.verify import BASE, Answer, References, RefSeq, ambiguous_pairs, classify, references, verdict
from lorascope.verifycmd import VerifySpec, plan_settings, run_verify

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _seq(tokens: list[int], margin: float = 1.0) -> RefSeq:
    return RefSeq(tokens, [margin] * len(tokens), [1.0] * len(tokens), [t + 100 for t in tokens])


def _refs() -> References:
    seqs = {
        BASE: [_seq([1, 2, 3, 4])],
        "a": [_seq([5, 6, 7, 8])],
        "b": [RefSeq([9, 10, 11, 12], [1.0, 1.0, 0.001, 1.0], [1.0] * 4, [90, 91, 92, 93])],
    }
    return References("k", [[0, 1]], [BASE, "a", "b"], seqs)


@pytest.mark.parametrize(
    ("model", "tokens", "status", "got"),
    [
        ("a", [5, 6, 7, 8], "pass", []),
        ("a", [9, 10, 11, 12], "wrong_adapter", ["b"]),
        ("a", [1, 2, 3, 4], "wrong_adapter", [BASE]),  # the adapter was not applied
        (BASE, [5, 6, 7, 8], "contaminated_base", ["a"]),
        ("b", [9, 10, 92, 0], "drift", []),  # diverges where the reference's margin is tiny
        ("a", [5, 6, 0, 0], "wrong_output", ["a"]),  # a large margin: not noise; closest reference named
        (BASE, [9, 10, 11, 0], "wrong_output", ["b"]),
    ],
)
def test_classification_rules(model: str, tokens: list[int], status: str, got: list[str]) -> None:
    out = classify(_refs(), "s", 0, model, Answer(tokens=tokens), drift_tol=0.01)
    assert (out.status, out.got) == (status, got)
    if status == "drift":
        assert out.position == 2 and out.margin == pytest.approx(0.001) and out.runner_up is True
    if status == "wrong_output":
        assert out.position is not None and out.margin == pytest.approx(1.0)


def test_errors_text_answers_and_ambiguity() -> None:
    refs = _refs()
    assert classify(refs, "s", 0, "a", Answer(error="HTTP 500: boom"), 0.01).status == "error"
    assert classify(refs, "s", 0, "a", Answer(), 0.01).status == "error"

    def decode(ids: list[int]) -> str:
        return "".join(chr(96 + i) for i in ids)

    assert classify(refs, "s", 0, "a", Answer(text=decode([5, 6, 7, 8])), 0.01, decode).status == "pass"
    text = classify(refs, "s", 0, BASE, Answer(text=decode([9, 10, 11, 12])), 0.01, decode)
    assert (text.status, text.got) == ("contaminated_base", ["b"])
    refs.seqs["b"] = [_seq([5, 6, 7, 8])]  # two references coincide: an answer equal to both is ambiguous
    assert ambiguous_pairs(refs) == [{"prompt": 0, "models": ["a", "b"]}]
    out = classify(refs, "s", 0, "a", Answer(tokens=[5, 6, 7, 8]), 0.01)
    assert out.status == "pass" and "ambiguous" in out.detail
    assert verdict([out])[0] == "pass"
    assert verdict([out, classify(refs, "s", 0, BASE, Answer(tokens=[5, 6, 7, 8]), 0.01)])[0] == "fail"


def test_settings_below_at_and_above_the_adapter_count(tmp_path: Path) -> None:
    names = [s.name for s in plan_settings(VerifySpec(adapters_dir=tmp_path), 6)]
    assert names == ["max_loras=3", "max_loras=6", "max_loras=12", "one-at-a-time (max_loras=6)"]
    url = VerifySpec(adapters_dir=tmp_path, engine="url", url="http://x", serial=False)
    assert [(s.max_loras, s.serial) for s in plan_settings(url, 6)] == [(None, False)]


def _mixed_dir(root: Path, model: str) -> Path:
    """5 adapters in one directory: ranks 8 and 16, all seven targets and attention only."""
    make_adapters(root / "all", model, 3, [8, 16], ALL, seed=1)
    make_adapters(root / "attn", model, 2, [16, 8], ATTN, seed=2)
    pool = root / "pool"
    pool.mkdir()
    for kind in ("all", "attn"):
        for p in sorted((root / kind).iterdir()):
            (pool / f"{kind}-{p.name}").symlink_to(p, target_is_directory=True)
    return pool


def test_references_are_cached_beside_the_adapters(tmp_path: Path, model_dir) -> None:
    mdir = model_dir("tiny")
    adapters = {p.name: p for p in make_adapters(tmp_path / "ad", str(mdir), 2, 8, ["q_proj", "v_proj"], seed=4)}
    cache = tmp_path / "ad" / ".lorascope-verify"
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10]]
    first = references(mdir, adapters, prompts, 6, cache_root=cache)
    assert not first.cached and first.path is not None and first.path.is_file()
    again = references(mdir, adapters, prompts, 6, cache_root=cache)
    assert again.cached and again.key == first.key
    assert {m: [s.tokens for s in v] for m, v in again.seqs.items()} == {
        m: [s.tokens for s in v] for m, v in first.seqs.items()
    }
    assert references(mdir, adapters, prompts, 7, cache_root=cache).key != first.key  # the plan is in the key
    assert ambiguous_pairs(first) == []  # random adapters do change greedy outputs on tiny
    first.path.write_text("{broken")  # a damaged cache file is recomputed
    assert not references(mdir, adapters, prompts, 6, cache_root=cache).cached


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_the_embedded_engine_passes(tmp_path: Path, preset: str) -> None:
    pool = _mixed_dir(tmp_path, preset)
    levels = [] if preset == "tiny" else [2, 5]  # tiny: the default below / at / above, plus one at a time
    spec = VerifySpec(adapters_dir=pool, model=preset, max_loras=levels, prompts=2, tokens=12)
    result = run_verify(spec, tmp_path / "out", print)
    bad = [o for o in result["outcomes"] if o["status"] != "pass"]
    assert result["verdict"] == "pass" and not bad, bad
    settings = 4 if preset == "tiny" else 3
    assert len(result["outcomes"]) == settings * 2 * 6 and result["counts"]["pass"] == settings * 12
    assert result["ambiguous"] == []
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["verdict"] == "pass"


def test_a_broken_engine_is_caught_as_wrong_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded engine built with a test-only fault (adapters all-a0001 and all-a0002 run with each
    other's slot): `verify` names the swap and exits 1."""
    pool = _mixed_dir(tmp_path, "tiny")
    monkeypatch.setenv("LORASCOPE_TEST_FAULT_SWAP_ADAPTERS", "all-a0001,all-a0002")
    out = tmp_path / "out"
    done = CliRunner().invoke(
        app,
        [
            "verify",
            "--adapters",
            str(pool),
            "--model",
            "tiny",
            "--max-loras",
            "5",
            "--prompts",
            "2",
            "--tokens",
            "12",
            "--out",
            str(out),
        ],
    )
    assert done.exit_code == 1, done.output
    assert "wrong adapter" in done.output and "FAIL" in done.output
    result = json.loads((out / "verify.json").read_text())
    found = {(o["setting"], o["model"], o["prompt"]): o for o in result["outcomes"]}
    serial = "one-at-a-time (max_loras=5)"
    # one at a time (deterministic): each request swaps once the other adapter is resident
    assert (found[serial, "all-a0001", 1]["status"], found[serial, "all-a0001", 1]["got"]) == (
        "wrong_adapter",
        ["all-a0002"],
    )
    for k in (0, 1):
        assert (found[serial, "all-a0002", k]["status"], found[serial, "all-a0002", k]["got"]) == (
            "wrong_adapter",
            ["all-a0001"],
        )
    # nobody else is affected, in any setting
    pair = {"all-a0001", "all-a0002"}
    assert all(o["status"] == "pass" for o in result["outcomes"] if o["model"] not in pair)
    # a swapped request names the other adapter; with every request at once it may also have read the
    # other adapter's slot while that slot was still being written (the fault looks slots up without
    # waiting for loads): a garbled output, `wrong_output`, whose closest reference is anyone's
    named = [o for o in result["outcomes"] if o["status"] == "wrong_adapter" and not set(o["got"]) <= pair]
    assert not named, named
    assert all(o["model"] in pair for o in result["outcomes"] if o["status"] != "pass")


def test_bad_input_exits_2_naming_the_fix(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    cases = [
        (["--adapters", str(tmp_path / "missing")], "lorascope adapters make"),
        (["--adapters", str(tmp_path / "empty")], "no PEFT adapters"),
        (["--adapters", str(tmp_path / "empty"), "--engine", "nope"], "--engine must be one of"),
        (["--adapters", str(tmp_path / "empty"), "--engine", "url"], "--engine url needs --url"),
        (["--adapters", str(tmp_path / "empty"), "--max-loras", "3,x"], "comma list of integers"),
        (["--adapters", str(tmp_path / "empty"), "--tokens", "0"], "must be >= 1"),
    ]
    for args, message in cases:
        done = runner.invoke(app, ["verify", *args])
        assert done.exit_code == 2, (args, done.output)
        assert message in " ".join(done.output.split()), (args, done.output)
    make_adapters(tmp_path / "ad", "tiny", 1, 8, ["q_proj"])
    done = runner.invoke(app, ["verify", "--adapters", str(tmp_path / "ad"), "--model", "no-such-model"])
    assert done.exit_code == 2 and "neither a preset" in done.output


def test_the_report_carries_the_stamp(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert "Correctness not verified" in build_report(run).read_text()
    outcomes = [
        {
            "setting": "max_loras=3",
            "prompt": 0,
            "model": BASE,
            "status": "contaminated_base",
            "got": ["a0"],
            "detail": "",
        },
        {"setting": "max_loras=3", "prompt": 0, "model": "a0", "status": "pass", "got": [], "detail": ""},
    ]
    (run / "verify.json").write_text(
        json.dumps(
            {
                "verdict": "fail",
                "summary": "FAIL: 1 of 2 answers <b>",
                "engine": "vllm",
                "engine_version": "0.32.0",
                "settings": [{"name": "max_loras=3"}],
                "outcomes": outcomes,
                "ambiguous": [],
            }
        )
    )
    html = build_report(run).read_text()
    stamp = html[html.index('id="verify"') :]
    assert html.index('id="verify"') < html.index("<h2>Run</h2>")  # on the first page
    assert "Correctness: FAILED" in stamp and "vllm 0.32.0" in stamp and "&lt;b&gt;" in stamp
    assert "1 contaminated base (a0); ok 0/1" in stamp and "ok 1/1" in stamp
    (run / "verify.json").write_text(
        json.dumps({"verdict": "pass", "summary": "PASS: 2 of 2", "settings": [], "outcomes": []})
    )
    assert "Correctness: VERIFIED" in build_report(run).read_text()


@pytest.mark.slow
def test_run_verify_puts_the_verdict_on_the_report(tmp_path: Path) -> None:
    """`lorascope run --verify`: verify.json in the run directory, the stamp on report.html, and
    `lorascope report` re-renders it."""
    import subprocess
    import sys

    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "v"\nmodel = "tiny"\ninput_len = "16"\noutput_len = "8"\nrequests = 8\nwarmup = 0\n'
        '[[sweep]]\nname = "a"\nadapters = 3\nconcurrency = 2\ntraffic = "uniform"\nmax_loras = 2\n'
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorascope.cli",
            "run",
            "--spec",
            str(spec),
            "--out",
            str(out),
            "--no-progress",
            "--verify",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "verify.json").read_text())
    assert result["verdict"] == "pass" and result["adapters"] == ["a0000", "a0001", "a0002"]
    assert json.loads((out / "manifest.json").read_text())["verify"] is True
    assert "Correctness: VERIFIED" in (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    assert "Correctness: VERIFIED" in (out / "report.html").read_text()
