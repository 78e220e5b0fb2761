"""The research workspace: program.md, the baseline train.py, a git repository, the config file.

Layout of `autoresearch init DIR`:

    DIR/program.md          the research directive (the human edits it; the agent reads it)
    DIR/train.py            the baseline the agent starts from (never rewritten by the daemon)
    DIR/autoresearch.toml   settings, with `workspace` pointing here
    DIR/.git                kept experiments are commits on `autoresearch/<session tag>`
    DIR/results.tsv         exported after every experiment (untracked)
    DIR/data/, DIR/reports/ prepared data and morning reports (untracked)

Commits to a session branch are written with git plumbing into a private index, so the working tree
(the human's program.md and train.py) is never touched while the daemon runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import WorkspaceError

PROGRAM_FILE = "program.md"
TRAIN_FILE = "train.py"
CONFIG_FILE = "autoresearch.toml"
RESULTS_FILE = "results.tsv"
BRANCH_PREFIX = "autoresearch/"
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch",
    "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch",
    "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}
_IGNORED = ("data/", "reports/", "results.tsv", ".results.tsv.*.tmp", "*.db", "*.db-journal", "*.db.lock", "runs/")
_TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# One commit lock per workspace folder: Workspace objects are cheap values and several may point at
# the same repository, so the lock lives here rather than in the (frozen) instance.
_COMMIT_LOCKS: dict[Path, threading.Lock] = {}
_COMMIT_LOCKS_GUARD = threading.Lock()


def _commit_lock(root: Path) -> threading.Lock:
    with _COMMIT_LOCKS_GUARD:
        return _COMMIT_LOCKS.setdefault(root, threading.Lock())


def default_program_md() -> str:
    return (Path(__file__).resolve().parents[1] / "assets" / PROGRAM_FILE).read_text()


def default_baseline_source() -> str:
    baseline = Path(__file__).resolve().parents[2] / "trainer" / TRAIN_FILE
    try:
        return baseline.read_text()
    except OSError as exc:
        raise WorkspaceError(f"the baseline {baseline} cannot be read ({exc.strerror})",
                             hint="reinstall the project: `make setup`") from None


def _config_text(root: Path) -> str:
    return (
        "# autoresearch settings; every key is described in README.md ('Configuration').\n"
        "# Environment variables AUTORESEARCH_<SECTION>__<KEY> override what is written here.\n"
        f"workspace = {str(root)!r}\n"
        "\n"
        "[training]\n"
        "time_budget_s = 300.0\n"
        "\n"
        "[agent]\n"
        "# provider = 'auto' uses Anthropic when an API key is set (api_key_file), else the offline agent.\n"
        "provider = 'auto'\n"
        "\n"
        "[sandbox]\n"
        "backend = 'auto'\n"
    )


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def program_path(self) -> Path:
        return self.root / PROGRAM_FILE

    @property
    def train_path(self) -> Path:
        return self.root / TRAIN_FILE

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def runs_dir(self) -> Path:
        """Sandbox out dirs of experiments (checkpoints, result.json)."""
        return self.root / "runs"

    @classmethod
    def init(cls, root: Path, *, program_md: str | None = None, baseline_source: str | None = None) -> Workspace:
        """Create (or complete) a workspace; files that exist are kept, so re-running is harmless."""
        root = root.resolve()
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"{root} exists and is not a folder", hint="choose another path for `init`")
        root.mkdir(parents=True, exist_ok=True)
        workspace = cls(root)
        created = []
        for path, text in (
            (workspace.program_path, program_md if program_md is not None else default_program_md()),
            (workspace.train_path, baseline_source if baseline_source is not None else default_baseline_source()),
            (root / CONFIG_FILE, _config_text(root)),
            (root / ".gitignore", "".join(f"{line}\n" for line in _IGNORED)),
        ):
            if not path.exists():
                path.write_text(text)
                created.append(path.name)
        workspace.ensure_repository()
        return workspace

    def ensure_repository(self) -> None:
        """Create the workspace's git repository and its first commit (program.md, the baseline) when missing."""
        if not (self.root / ".git").exists():
            self._git("init", "-q", "-b", "main")
        if self._git("rev-parse", "--verify", "-q", "HEAD", check=False).returncode != 0:
            self._git("add", PROGRAM_FILE, TRAIN_FILE, CONFIG_FILE, ".gitignore")
            self._git("commit", "-q", "-m", "autoresearch workspace: program.md and baseline train.py")

    @classmethod
    def open(cls, root: Path) -> Workspace:
        """An initialised workspace, or a `WorkspaceError` saying how to make one."""
        root = root.resolve()
        missing = [name for name in (PROGRAM_FILE, TRAIN_FILE, ".git") if not (root / name).exists()]
        if missing:
            raise WorkspaceError(f"{root} is not an autoresearch workspace (missing {', '.join(missing)})",
                                 hint=f"run `autoresearch init {root}`")
        return cls(root)

    def program_md(self) -> str:
        text = self.program_path.read_text()
        if not text.strip():
            raise WorkspaceError(f"{self.program_path} is empty", hint="write the research directive into it")
        return text

    def baseline_source(self) -> str:
        source = self.train_path.read_text()
        try:
            compile(source, str(self.train_path), "exec")
        except SyntaxError as exc:
            raise WorkspaceError(f"{self.train_path} does not parse: line {exc.lineno}: {exc.msg}",
                                 hint="fix the baseline train.py (git diff shows what changed)") from None
        return source

    def branch(self, tag: str) -> str:
        if not _TAG_PATTERN.match(tag):
            raise WorkspaceError(f"session tag {tag!r} is not a valid branch name part",
                                 hint="use letters, digits, '.', '_' and '-'")
        return BRANCH_PREFIX + tag

    def commit_kept(self, tag: str, source: str, message: str) -> str:
        """Commit `source` as train.py on the session branch (created from main on first use); returns the sha."""
        ref = f"refs/heads/{self.branch(tag)}"
        with _commit_lock(self.root):
            return self._commit_locked(ref, source, message)

    def _commit_locked(self, ref: str, source: str, message: str) -> str:
        branch_head = self._git("rev-parse", "--verify", "-q", ref, check=False).stdout.strip()
        parent = branch_head or self._git("rev-parse", "main").stdout.strip()
        blob = self._git("hash-object", "-w", "--stdin", input_text=source).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
            index_env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self._git("read-tree", parent, env=index_env)
            self._git("update-index", "--add", "--cacheinfo", f"100644,{blob},{TRAIN_FILE}", env=index_env)
            tree = self._git("write-tree", env=index_env).stdout.strip()
        commit = self._git("commit-tree", tree, "-p", parent, "-m", message.strip() or "kept experiment",
                           env=_GIT_IDENTITY).stdout.strip()
        # The expected old value ("" = must not exist yet) makes a concurrent writer fail loudly
        # instead of silently dropping a commit.
        self._git("update-ref", ref, commit, branch_head)
        return commit

    def main_commit(self) -> str:
        """The commit of main: the baseline train.py as the human last committed it."""
        return self._git("rev-parse", "main").stdout.strip()

    def branch_log(self, tag: str) -> list[str]:
        """Subjects of the session branch's commits, newest first (empty when nothing was kept yet)."""
        ref = f"refs/heads/{self.branch(tag)}"
        if not self._has_ref(ref):
            return []
        return self._git("log", "--format=%s", f"main..{ref}").stdout.splitlines()

    def write_results(self, tsv: str) -> Path:
        """Replace results.tsv atomically (a reader never sees half a file)."""
        # A temporary name of its own per call: several lanes export at once, and a shared name
        # would let one lane rename away the file another is about to rename.
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=f".{RESULTS_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(tsv)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, self.results_path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return self.results_path

    def _has_ref(self, ref: str) -> bool:
        return self._git("rev-parse", "--verify", "-q", ref, check=False).returncode == 0

    def _git(self, *args: str, check: bool = True, input_text: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **_GIT_IDENTITY, **(env or {})}
        try:
            done = subprocess.run(["git", "-C", str(self.root), *args], capture_output=True, text=True,
                                  input=input_text, env=full_env, check=False, timeout=60)
        except FileNotFoundError:
            raise WorkspaceError("git is not installed", hint="apt-get install git") from None
        if check and done.returncode != 0:
            raise WorkspaceError(f"git {args[0]} failed in {self.root}: {done.stderr.strip()[:300]}",
                                 hint="check the workspace repository (`git status` there)")
        return done
