"""--push, --verify, the model card and Hub downloads, against a local stand-in for the Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import image, tiny_dir
from hub_stand_in import Hub
from huggingface_hub import ModelCard

from shortv_export.cli import main


@pytest.fixture
def hub():
    with Hub() as h:
        yield h


def hub_env(hub, tmp_path, **extra) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    env.update(HF_TOKEN="hf_good", **extra)
    return {k: v for k, v in env.items() if v is not None}


def shortv_export(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(["shortv-export", *map(str, args)], env=env, capture_output=True, text=True)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# What a push can only find out when it uploads (the folder is written by then, and kept), and what it checks before
# the conversion starts (nothing is written).
UPLOAD_ERRORS = [
    ("read-only token", "hf_readonly", "may not write to this repo (403)"),
    ("someone else's repo", "hf_good", "may not write to this repo (403)"),
    ("server error", "hf_good", "the Hub answered 500"),
]
EARLY_ERRORS = [
    ("no token", None, "no Hub token: set HF_TOKEN or run `hf auth login`"),
    ("bad token", "hf_bad", "rejected the token (401)"),
    ("network down", "hf_good", "could not reach the Hub"),
    ("offline mode", "hf_good", "offline mode (HF_HUB_OFFLINE=1)"),
]
PUSH_ERRORS = UPLOAD_ERRORS + EARLY_ERRORS
# Every token these tests hand the tool: none may ever show in what it prints (the case's own token included).
TOKENS = {token for _, token, _ in PUSH_ERRORS if token}


def assert_no_token_in(text: str) -> None:
    shown = sorted(token for token in TOKENS if token in text)
    assert not shown, f"the output shows the token(s) {shown}"


def test_push_end_to_end_then_a_rerun_uploads_nothing(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    out = tmp_path / "tiny-shortv"
    first = shortv_export(tiny_dir("llava"), "--n", 2, "--out", out, "--push", "--repo-id", "me/tiny", env=env)
    assert first.returncode == 0, first.stderr
    assert "pushed:" in first.stdout and "verified:" in first.stdout
    local = folder_files(out)
    remote = hub.repos["me/tiny"].files("main")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local  # every file, byte-identical
    assert {"model.safetensors", "lc.json", "lc.png", "README.md", "modeling_shortv_llava.py"} <= set(local)
    commits, uploaded = hub.commits_made, hub.uploaded_bytes

    again = shortv_export(
        tiny_dir("llava"), "--n", 2, "--out", out, "--overwrite", "--push", "--repo-id", "me/tiny", env=env
    )
    assert again.returncode == 0, again.stderr
    assert "reusing LC" in again.stdout and "nothing to upload" in again.stdout
    assert (hub.commits_made, hub.uploaded_bytes) == (commits, uploaded)
    assert_no_token_in(first.stdout + first.stderr + again.stdout + again.stderr)  # the token never shows


@pytest.mark.parametrize("kind", ["llava", "gemma3"])  # Gemma 3: another family, whose processor needs no torchvision
def test_card_parses_and_its_snippet_runs_against_the_pushed_files(hub, tmp_path, monkeypatch, kind):
    """The push in-process (the console script's own end-to-end push is the test above); the card's snippet in a
    fresh process, as a user runs it."""
    _in_process_env(monkeypatch, hub, "hf_good")
    out = tmp_path / "pushed"
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--layers", "3,1", "--out", str(out), "--push"])
    assert result.exit_code == 0, result.output
    assert "me/pushed" in hub.repos  # default repo id: <token user>/<folder name>
    text = hub.repos["me/pushed"].files("main")["README.md"].decode()
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"shortv", "custom_code", kind} <= set(card.data.tags)
    assert {"modeling_shortv.py", f"modeling_shortv_{kind}.py"} <= set(hub.repos["me/pushed"].files("main"))
    for needle in ("`shortv_layers` = [3, 1]", "ratio", "## Verification", "arxiv.org/abs/2504.00502", "--layers"):
        assert needle in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "repo = 'me/pushed'" in snippet
    run_dir = tmp_path / "user"
    run_dir.mkdir()
    image(40, 30).save(run_dir / "photo.jpg")
    user_env = hub_env(hub, tmp_path, HF_HOME=str(tmp_path / "user-home"), PYTHONPATH="")
    ran = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['shortv_export'] = None\n" + snippet],
        cwd=run_dir,
        env=user_env,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip()  # it printed a decoded answer


def test_model_from_the_hub_is_downloaded_and_converted(hub, tmp_path):
    hub.add_repo("me/tiny-base", folder_files(tiny_dir("llava")))
    env = hub_env(hub, tmp_path)
    out = tmp_path / "converted"
    result = shortv_export("me/tiny-base", "--layers", "2", "--out", out, "--no-verify", env=env)
    assert result.returncode == 0, result.stderr
    source = tiny_dir("llava")
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "me/tiny-base"
    # A revision that does not exist is a clear error.
    bad = shortv_export("me/tiny-base", "--layers", "2", "--model-revision", "nope", "--out", tmp_path / "x", env=env)
    assert bad.returncode == 2 and "revision 'nope' not found" in bad.stderr
    # Offline, the cached copy is enough for a dry run (its files listed from the cache, not the Hub).
    offline = shortv_export("me/tiny-base", "--dry-run", "--samples", "2", env=dict(env, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr
    assert "model.safetensors" in offline.stdout and "would calibrate LC on 2 samples" in offline.stdout


def test_push_to_a_branch_and_as_a_pull_request(hub, tmp_path, monkeypatch):
    _in_process_env(monkeypatch, hub, "hf_good")
    out = tmp_path / "branchy"
    args = [str(tiny_dir("llava")), "--layers", "2", "--out", str(out), "--no-verify"]
    result = CliRunner().invoke(main, [*args, "--push", "--repo-id", "me/b", "--revision", "dev", "--private"])
    assert result.exit_code == 0, result.output
    repo = hub.repos["me/b"]
    assert repo.private and "model.safetensors" in repo.files("dev") and "model.safetensors" not in repo.files("main")
    (out / "extra.txt").write_text("x")  # a change, so the pull request has something to propose
    pr = CliRunner().invoke(main, [*args, "--overwrite", "--push", "--repo-id", "me/b", "--create-pr"])
    assert pr.exit_code == 0, pr.output
    assert "discussions/1" in pr.output and "refs/pr/1" in repo.refs
    both = CliRunner().invoke(main, [*args, "--overwrite", "--push", "--create-pr", "--revision", "dev"])
    assert both.exit_code == 2 and "--create-pr" in both.stderr


def _in_process_env(monkeypatch, hub, token):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "shortv-no-login"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", "/nonexistent/stored_tokens")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


@pytest.mark.parametrize("case, token, message", PUSH_ERRORS)
def test_push_errors_are_clear_and_keep_the_folder(hub, tmp_path, monkeypatch, case, token, message):
    from huggingface_hub import constants

    _in_process_env(monkeypatch, hub, token)
    repo_id = "other/tiny" if case == "someone else's repo" else "me/tiny"
    if case == "network down":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    if case == "offline mode":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if case == "server error":
        hub.fail = ("/commit/", 500)
    out = tmp_path / "kept"
    args = [
        str(tiny_dir("llava")),
        "--layers",
        "2",
        "--out",
        str(out),
        "-q",
        "--no-verify",
        "--push",
        "--repo-id",
        repo_id,
    ]
    if case in [c for c, _, _ in EARLY_ERRORS]:  # checked before calibration or the write: nothing is written
        import shortv_export.write as write

        monkeypatch.setattr(write, "write_checkpoint", lambda *a, **k: pytest.fail("wrote before checking the push"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_no_token_in(result.output + result.stderr)
    if case in [c for c, _, _ in EARLY_ERRORS]:
        assert result.stderr.strip().endswith("Nothing was written: fix this and run the command again")
        assert not out.exists() and hub.commits_made == 0
    else:
        assert f"{out} is complete and intact; retry with: hf upload {repo_id} {out} ." in result.stderr
        assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_push_honours_hf_hub_offline_set_after_import(hub, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 put in the environment after huggingface_hub read its constant (which stays False) stops
    the push just as the constant does: the one-line offline message, nothing sent to the Hub, nothing written."""
    from huggingface_hub import constants

    _in_process_env(monkeypatch, hub, "hf_good")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert constants.HF_HUB_OFFLINE is False  # only the environment says offline
    out = tmp_path / "kept"
    args = [str(tiny_dir("llava")), "--layers", "2", "--out", str(out), "-q", "--no-verify", "--push"]
    result = CliRunner().invoke(main, [*args, "--repo-id", "me/tiny"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: push failed: the Hub is in offline mode (HF_HUB_OFFLINE=1); unset it. Nothing was written: fix "
        "this and run the command again"
    ]
    assert not out.exists()  # checked before the conversion
    assert hub.repos == {} and hub.commits_made == 0


def test_push_options_need_push(tmp_path):
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2", "--repo-id", "me/x"])
    assert result.exit_code == 2 and "only apply with --push" in result.stderr


@pytest.mark.fresh_verify  # the real subprocess; the other tests' verification forks (tests/fork_server.py)
def test_verify_catches_a_broken_folder(tmp_path, monkeypatch):
    """A written folder whose modeling file is broken fails verification, and the push does not happen."""
    import shortv_export.verify as verify

    out = tmp_path / "broken"
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified:" in result.output
    assert "## Verification" in (out / "README.md").read_text()
    (out / "modeling_shortv_llava.py").write_text("raise ImportError('broken on purpose')\n")
    with pytest.raises(verify.ShortVError, match="does not load with transformers alone"):
        verify.verify_folder(out, tiny_dir("llava"), [2])


@pytest.mark.fresh_verify
@pytest.mark.xdist_group("fork-server-pin")  # a long one: a group of its own is scheduled first (conftest)
def test_the_fork_server_runs_user_code_as_a_fresh_process_does(tmp_path):
    """What the tests' stand-in for verification's fresh process gives back equals what the real one does: the
    arguments, working directory, environment, thread count, output, error output and exit code, with nothing
    of this package imported."""
    from conftest import fork_server

    import shortv_export.verify as verify

    code = (
        "import json, os, sys, torch\n"
        "from transformers.dynamic_module_utils import HF_MODULES_CACHE\n"
        "print(json.dumps([sys.argv[1:], os.getcwd(), os.environ['SHORTV_PROBE'], HF_MODULES_CACHE,\n"
        "    torch.get_num_threads(), 'shortv_export' in sys.modules]))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    env = dict(os.environ, SHORTV_PROBE="seen", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="2")
    for status in ("0", "3"):
        real = verify.run_user_code(code, ["a b", status], env, tmp_path)
        forked = fork_server().run(code, ["a b", status], env, tmp_path)
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
        assert json.loads(real.stdout) == [["a b", status], str(tmp_path), "seen", str(tmp_path / "modules"), 2, False]
        assert real.returncode == int(status) and real.stderr == "to stderr\n"
    for code, returncode, last in (
        ("raise ValueError('boom')", 1, "ValueError: boom"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9, None),  # killed: no output, minus the signal
        ("import sys; sys.exit('a message')", 1, "a message"),
        ("import atexit; atexit.register(print, 'at exit')", 0, None),
    ):
        real, forked = (run(code, [], env, tmp_path) for run in (verify.run_user_code, fork_server().run))
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
        assert real.returncode == returncode and (last is None or real.stderr.strip().splitlines()[-1] == last)
    assert real.stdout == "at exit\n"


@pytest.mark.parametrize(
    "dtype", [pytest.param(d, marks=pytest.mark.xdist_group(f"verify-wrong-cache-{d}")) for d in ("fp32", "bf16")]
)  # long ones: groups of their own are scheduled first (conftest)
def test_verify_catches_a_checkpoint_that_caches_wrong_keys_and_values(tmp_path, dtype):
    """Prefill logits are right, but the frozen layers write other K/V into the cache (what transformers 5.24's
    rename did to the old model file): generating with the cache no longer matches generating without it, in
    fp32 and in bf16 (whose own rounding stays inside the tolerance: the intact folder passes)."""
    import shortv_export.verify as verify

    out = tmp_path / "bad-cache"
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "0,2", "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    figures = verify.verify_folder(out, tiny_dir("llava"), [0, 2], dtype=dtype)
    assert figures["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert figures["generate_max_abs_logits_diff_cached_vs_uncached"] <= figures["generate_cache_tolerance"]
    code = (out / "modeling_shortv.py").read_text()
    good = "key, value = cache.update(key, value, self.layer_idx)"
    assert good in code
    (out / "modeling_shortv.py").write_text(
        code.replace(good, "cache.update(key.flip(2), value.flip(2), self.layer_idx)")
    )
    with pytest.raises(verify.ShortVError, match="the cache is wrong"):
        verify.verify_folder(out, tiny_dir("llava"), [0, 2], dtype=dtype)
