"""Build small lab repositories (real bare git repos) for pipeline and worker tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


class LabFactory:
    """Creates labs as ``<root>/repos/<owner>/<name>.git``; ``template`` clones them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.template = f"file://{root / 'repos'}/{{repo}}.git"

    def make(
        self, repo: str, files: dict[str, str], branches: dict[str, dict[str, str]] | None = None
    ) -> str:
        """Create ``repo`` (owner/name) with ``files`` on main (and more branches)."""
        work = self.root / "src" / repo
        work.mkdir(parents=True)
        for rel, text in files.items():
            path = work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        _git("init", "--quiet", "--initial-branch=main", ".", cwd=work)
        _git("add", "-A", cwd=work)
        _git("commit", "--quiet", "-m", "lab", cwd=work)
        for branch, extra in (branches or {}).items():
            _git("checkout", "--quiet", "-b", branch, cwd=work)
            for rel, text in extra.items():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                (work / rel).write_text(text)
            _git("add", "-A", cwd=work)
            _git("commit", "--quiet", "-m", branch, cwd=work)
            _git("checkout", "--quiet", "main", cwd=work)
        bare = self.root / "repos" / f"{repo}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        _git("clone", "--quiet", "--bare", str(work), str(bare), cwd=self.root)
        return repo

    def script_lab(self, repo: str, integration: str, **scripts: str) -> str:
        """A lab whose integration script is ``integration`` (bash); optional
        ``post_create``, ``post_start`` and ``unit`` (a .bats file)."""
        files = {".devcontainer/test/integration.sh": "set -u\n" + integration}
        if "post_create" in scripts:
            files[".devcontainer/post-create.sh"] = scripts["post_create"]
        if "post_start" in scripts:
            files[".devcontainer/post-start.sh"] = scripts["post_start"]
        if "unit" in scripts:
            files[".devcontainer/test/unit/unit.bats"] = scripts["unit"]
        return self.make(repo, files)
