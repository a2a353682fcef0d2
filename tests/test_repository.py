"""The repository itself: no machine's paths or issue references in its text, documentation about the
project only, CI steps that fail when a piped command fails, and presets inside the built wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from compression.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent

# A path that only exists on one machine: a home or workspace folder, or a scratch folder. Generic
# examples elsewhere (/mnt/shared on a cluster, /app in an image, /usr/bin/chromium) are fine.
MACHINE_PATH = re.compile(r"(?<![\w.~$/-])/(?:work|home|root|Users|tmp|private/var|var/folders)/[\w.-]")
# "#12" as a reference (a hex colour in quotes is not one), "issue 12", "PR 3".
ISSUE_REFERENCE = re.compile(r"(?<![\w&/$#\"'])#\d+\b|\b(?:issues?|pull requests?|PRs?)\s+#?\d+\b", re.IGNORECASE)
# Notes on how the work was organised rather than on the project.
ORGANISATION_NOTE = re.compile(r"\b(?:agents?|worktrees?|hand-?offs?|teammates?|the lead|your brief|final report)\b",
                               re.IGNORECASE)


def repository_files() -> list[Path]:
    """Tracked files and new ones git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def findings(pattern: re.Pattern[str], files: list[Path]) -> list[str]:
    found = []
    for path in files:
        text = text_of(path)
        for number, line in enumerate((text or "").splitlines(), 1):
            if match := pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    return found


def test_the_patterns_catch_what_they_are_for():
    """The checks below could pass by matching nothing."""
    assert MACHINE_PATH.search("base `" + "/wo" + "rk/main/bench/checkpoints/pretrain.safetensors`")
    assert MACHINE_PATH.search('"pruned_path": "' + "/t" + 'mp/bench-budget-htvq757i/runs/x.safetensors"')
    assert MACHINE_PATH.search("cd " + "/ho" + "me/alice/prunepipe")
    for fine in ("/mnt/shared/runs", "/app", "/usr/bin/chromium", "data/tmp/x", "https://example.com/home/x",
                 "~/prunepipe", "$HOME/x"):
        assert not MACHINE_PATH.search(fine), fine
    for reference in ("see #15", "(#7)", "issue 18", "Issues 6", "PR 3"):
        assert ISSUE_REFERENCE.search(reference), reference
    for fine in ('edgecolors="#999999"', "# 2 workers", "[link](#bad-input)", "step #", "v4.2.2"):
        assert not ISSUE_REFERENCE.search(fine), fine
    assert ORGANISATION_NOTE.search("Notes for the agents sharing this machine")
    assert ORGANISATION_NOTE.search("touch only the files your brief names; the lead commits")


def test_no_machine_paths_in_the_repository():
    assert findings(MACHINE_PATH, repository_files()) == []


def test_no_issue_references_in_the_repository():
    assert findings(ISSUE_REFERENCE, [p for p in repository_files() if p.name != "test_repository.py"]) == []


def test_documentation_is_about_the_project():
    docs = [p for p in repository_files() if p.suffix == ".md"]
    assert (ROOT / "docs").is_dir() and any(p.parent == ROOT / "docs" for p in docs)
    assert findings(ORGANISATION_NOTE, docs) == []


# --------------------------------------------------------------------------------------------
# CI: a piped command that fails must fail its step

WORKFLOWS = ROOT / ".github" / "workflows"
# GitHub runs `shell: bash` as `bash --noprofile --norc -eo pipefail {0}`, but a step without a shell
# as `bash -e {0}`: no pipefail, so `prunepipe run | tee log` would pass whatever the run did.
_PIPE = re.compile(r"(?<![|>])\|(?![|])")
_SET_PIPEFAIL = re.compile(r"\bset\s+(?:-[a-z]*o\s+pipefail|-o\s+pipefail)\b")


def _pipes(script: str) -> bool:
    """Whether a shell script has a pipe outside quotes and comments."""
    unquoted = re.sub(r"'[^']*'|\"(?:\\.|[^\"\\])*\"", "", script)
    code = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in unquoted.splitlines())
    return bool(_PIPE.search(code))


def steps_piping_without_pipefail(workflow: dict) -> list[str]:
    default = (workflow.get("defaults") or {}).get("run", {}).get("shell")
    unsafe = []
    for job_name, job in workflow.get("jobs", {}).items():
        job_default = (job.get("defaults") or {}).get("run", {}).get("shell", default)
        for step in job.get("steps", []):
            script = step.get("run")
            if script is None or not _pipes(script):
                continue
            shell = step.get("shell", job_default)
            if shell == "bash" or "pipefail" in (shell or "") or _SET_PIPEFAIL.search(script):
                continue
            unsafe.append(f"{job_name}: {step.get('name', script.splitlines()[0])}")
    return unsafe


def test_the_pipefail_check_catches_a_bare_pipe():
    bare = {"jobs": {"run": {"steps": [{"name": "run", "run": "prunepipe run 2>&1 | tee log"}]}}}
    assert steps_piping_without_pipefail(bare) == ["run: run"]
    quoted = {"jobs": {"run": {"steps": [{"run": "echo 'a | b' # x | y\ntest -f a || exit 1"}]}}}
    assert steps_piping_without_pipefail(quoted) == []
    for safe in ({"defaults": {"run": {"shell": "bash"}}, **bare},
                 {"jobs": {"run": {"steps": [{"run": "set -euo pipefail\nprunepipe run | tee log"}]}}}):
        assert steps_piping_without_pipefail(safe) == []


def test_no_workflow_step_pipes_without_pipefail():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert files
    for path in files:
        assert steps_piping_without_pipefail(yaml.safe_load(path.read_text())) == [], path.name


def test_the_pipeline_workflow_uploads_its_mlflow_store():
    pipeline = yaml.safe_load((WORKFLOWS / "pipeline.yml").read_text())
    steps = pipeline["jobs"]["run"]["steps"]
    uploads = {s["with"]["path"]: s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")}
    assert "mlflow-store/" in uploads and uploads["mlflow-store/"]["if"].startswith("always()")
    runner = next(s["run"] for s in steps if "prunepipe run" in s.get("run", ""))
    assert 'MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow-store/mlflow.db"' in runner


# --------------------------------------------------------------------------------------------
# Packaging


def test_the_wheel_carries_the_presets(tmp_path):
    """A non-editable install finds every preset: they are package data, not files next to the source."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("prunepipe-*.whl"))
    presets = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert "default.yaml" in presets
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "installed")
        packaged = sorted(Path(n).name for n in archive.namelist() if n.startswith("compression/configs/"))
    assert packaged == presets
    loaded = subprocess.run(
        [sys.executable, "-c", "from compression.config import CONFIG_DIR, load_config; "
         "print(CONFIG_DIR); print(load_config('ssd300_voc').model.name)"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed")}, capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.splitlines() == [str(tmp_path / "installed" / "compression" / "configs"), "ssd300_vgg16"]
