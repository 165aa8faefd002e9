"""What a new user reads: the method page every docstring cites, and the README's claims about the files, the
commands and the packages they need, checked against the code they describe."""

from __future__ import annotations

import ast
import builtins
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from shortv_export.cli import main
from shortv_export.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
METHOD = ROOT / "docs" / "method.md"

# "method.md", as a path ("docs/method.md"), a Markdown link ("[docs/method.md](docs/method.md)") or bare, and the
# section it names, if any
REFERENCE = re.compile(r"([\w./-]*method\.md)(?:\]\([^)]*\))?(?:\s+section\s+(\d+))?")
# Files allowed to cite a bare "method.md" (none today); the section must resolve either way.
PENDING: set[str] = set()


def _references() -> list[tuple[str, str, str | None, str]]:
    """(file, path as written, section or None, the text after it) of every method.md reference in the repo."""
    files = [ROOT / "README.md"]
    for folder in ("shortv_export", "modeling", "scripts", "tests", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh") and p.is_file()]
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("shortv_export/modeling/") or rel == "tests/test_docs.py":
            continue  # the symlink to modeling/ (read there), and this file's own patterns
        text = path.read_text()
        for m in REFERENCE.finditer(text):
            found.append((rel, m.group(1), m.group(2), " ".join(text[m.end() : m.end() + 80].split())))
    return found


def test_every_method_md_reference_names_docs_method_md_and_a_section_it_has():
    sections = set(re.findall(r"^## (\d+)\. ", METHOD.read_text(), re.M))
    assert sections == {"1", "2", "3", "4", "5"}
    references = _references()
    assert len(references) >= 10  # the docstrings, tests, scripts and README that cite it
    for rel, path, section, after in references:
        assert section is None or section in sections, f"{rel}: {path} section {section} does not exist"
        if rel.startswith("modeling/"):  # copied to the Hub, where a bare path means nothing
            assert path == "docs/method.md" and after.startswith("in the shortv-export repository"), rel
        elif rel not in PENDING:
            assert path == "docs/method.md", f"{rel} cites {path!r}, a file users do not have"


def _quickstart_args() -> list[str]:
    """The arguments of the README quickstart's shortv-export command."""
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    return shlex.split(block.split("&& shortv-export ", 1)[1])


def test_the_quickstart_command_runs_again_on_its_own_output(tmp_path, monkeypatch):
    """As written, twice in a row: the second run replaces the first run's folder (reusing its LC) instead of
    stopping at 'already exists'. (--no-verify: the fresh-process check is tests/test_remote_code.py's.)"""
    args = _quickstart_args()
    assert args[0] == "examples/tiny-llava-easyvqa" and "--overwrite" in args
    monkeypatch.chdir(tmp_path)
    args = [str(ROOT / args[0]), *args[1:], "--no-verify", "-q"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    out = tmp_path / args[args.index("--out") + 1]
    (out / "stale.txt").write_text("from the first run")
    second = CliRunner().invoke(main, [*args[:-1]])  # not quiet: say where the LC came from
    assert second.exit_code == 0, second.output
    assert "reusing LC" in second.output and not (out / "stale.txt").exists()


def test_the_readme_calibration_set_is_what_the_package_ships():
    samples = [json.loads(line) for line in (ROOT / "shortv_export" / "calib" / "samples.jsonl").open()]
    images = {s["image"] for s in samples}
    assert len(samples) == 40 and len(images) == 20
    assert len({i for i in images if i.endswith("_crop.jpg")}) == 10  # 10 photographs and a crop of each
    licensed = (ROOT / "shortv_export" / "calib" / "LICENSES.md").read_text()
    assert all(f"| {i} |" in licensed for i in images if not i.endswith("_crop.jpg"))
    assert "40 prompts" in README and "over 20 images" in README and "real photographs" not in README


def test_every_readme_python_snippet_defines_what_it_uses_but_the_image():
    """Run top to bottom, the snippets need only ``image`` (a PIL image) from the reader; in particular the ONNX one
    builds its ``prompt`` with the chat template (a bare question has no ``<image>`` placeholder)."""
    defined: set[str] = set()
    for code in re.findall(r"```python\n(.*?)```", README, re.S):
        loaded, stored = set(), set()
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else stored).add(node.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                stored |= {(a.asname or a.name).split(".")[0] for a in node.names}
        assert loaded - stored - defined - set(dir(builtins)) <= {"image"}, code
        defined |= stored
    onnx = next(c for c in re.findall(r"```python\n(.*?)```", README, re.S) if "ShortVOnnxModel" in c)
    assert "apply_chat_template" in onnx


def test_the_readme_names_the_families_whose_processors_need_torchvision():
    paragraph = re.search(r"need torchvision in\s+transformers:(.*?)This tool does not need it", README, re.S)
    named = set(re.findall(r"`(\w+)`", paragraph.group(1)))
    assert named == {k for k, f in FAMILIES.items() if f.torchvision}
    alone = re.search(r"((?:`\w+`(?:, | and ))+`\w+`) load with transformers alone", README).group(1)
    assert set(re.findall(r"`(\w+)`", alone)) == {k for k, f in FAMILIES.items() if not f.torchvision}


def test_help_and_package_description_name_every_family_and_what_quiet_prints():
    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    first = help_text.split("Convert MODEL", 1)[1].split(".", 1)[0]
    assert "llava" not in first.lower()  # not "a llava-hf Hub id": every family
    assert all(f.display in help_text for f in FAMILIES.values())
    assert "-q, --quiet Print only the result line" in help_text
    description = re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert "vision-language" in description and "Qwen" in description and "Gemma" in description


def test_make_tiny_llava_without_num2words_is_one_error_line(tmp_path):
    """SmolVLM's processor imports num2words: without it, the script says so in one line (exit 2), no
    traceback, and writes nothing."""
    script = ROOT / "scripts" / "make_tiny_llava.py"
    code = (
        "import runpy, sys\n"
        "sys.modules['num2words'] = None  # as if not installed\n"
        f"sys.argv = [{str(script)!r}, {str(tmp_path / 'smol')!r}, '--kind', 'smolvlm']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert ran.stderr.strip().splitlines() == [
        "Error: --kind smolvlm: its processor needs num2words: pip install num2words "
        "(or pip install 'shortv-export[smolvlm]')"
    ]
    assert not (tmp_path / "smol").exists()
