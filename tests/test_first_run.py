# A new user's first contact: README's first command, as README.md states it, on a fresh clone of this repository
# (no checkpoints/, only pip's cache reused) must prepare the default model and print generated text.
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_FLAG = re.compile(r'--prompt "([^"]+)"')


def first_readme_command() -> str:
    """The first command line of README.md's first bash block (comment lines skipped)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no bash block"
    lines = [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines[0]


def fresh_clone(dest: Path) -> Path:
    """git clone of this repository; a plain copy of what git would track where the checkout has no .git."""
    if (REPO / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)], check=True)
    else:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", "checkpoints", "__pycache__", ".pytest_cache"))
    assert not (dest / "checkpoints").exists()
    return dest


def test_readme_first_command_on_a_fresh_clone(tmp_path):
    command = first_readme_command()
    assert "generate.py" in command and "pip install -r requirements.txt" in command, command
    clone = fresh_clone(tmp_path / "zoofast")
    # this interpreter's pip and python first on PATH (the venv the suite runs in, as a user's activated one)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, f"{command!r} failed:\n{r.stderr[-3000:]}"
    assert (clone / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth").is_file()
    assert "preparing HuggingFaceTB/SmolLM2-135M-Instruct (first use)" in r.stderr
    if "--compile" in command:   # it says what it compiles, and roughly how long, before the wait (or that a fused
        # decode step needs nothing: fused_decode.py)
        assert re.search(r"compiling .* with torch.compile \(Inductor\): about \d+(-\d+)? s each|nothing to compile: "
                         r"decode steps run as one C\+\+ call", r.stderr), r.stderr[-2000:]
    prompt = PROMPT_FLAG.search(command)[1]
    text = r.stdout.split(prompt, 1)[-1] if prompt in r.stdout else ""
    assert len(text.split()) >= 20, f"no generated text after the prompt:\n{r.stdout[-2000:]}"
    assert re.search(r"decode [\d.]+ tokens/s", r.stderr)
