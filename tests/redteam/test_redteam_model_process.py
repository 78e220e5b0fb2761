"""Class: a compromised model process. The untrusted half of the eval stage must not reach the val split,
the result or the scorer, whatever code it runs.

The eval container is made exactly as the runner makes it (sandbox.docker_backend.container_config of a
split-identity spec, mounts under the private folder). Its scorer is the real trainer.privsep /
trainer.model_process code; the model process is replaced by a hostile stand-in that tries, from inside, every
way it has to the val tokens (the files, the scorer's memory and descriptors, a whole-filesystem search for
their bytes), to the result (the out dir), to the scorer (signals) and to more privilege. Positive controls in
the same container show that each target exists: the scorer reads the val tokens, writes the out dir and finds
the same bytes with the same search, and the stand-in reads what it was handed.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from daemon.research.runner import EVAL_COMMAND, EVAL_DATA, EVAL_OUT, TRAINER_TARGET
from sandbox.docker_backend import DockerBackend
from sandbox.spec import MODEL_UID, PRIVATE_DIR, SANDBOX_UID, Mount, RunSpec
from tests.redteam.redteam_helpers import EVAL_LIMITS, INSTANCE, REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SEARCH = """
import os
def search(needle):
    hits = []
    for root, dirs, files in os.walk("/", followlinks=False):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 256 * 1024 * 1024:
                    continue
                with open(path, "rb") as handle:
                    if needle in handle.read():
                        hits.append(path)
            except OSError:
                continue
    return hits
"""

SCORER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, "/probe")
from search import search
from trainer.layout import DataError
from trainer.model_process import ModelProcess
from trainer.privsep import become, stage_identities

identities = stage_identities(os.environ)
with ModelProcess(identities, [sys.executable, "/probe/hostile.py"]) as model:
    become(identities.scorer_uid)
    tokens = Path("@DATA@/tokens.bin").read_bytes()
    Path("@OUT@/scorer.txt").write_text("written by the scorer")
    needle = bytes.fromhex(open("/probe/needle.hex").read())
    report = {"uid": os.getuid(), "read val tokens": len(tokens), "search hits": search(needle)}
    try:
        model.load(Path("/checkpoint/model.pt2"), 2, 8, 16)
    except DataError as exc:
        report["model process said"] = str(exc)
print("SCORER " + json.dumps(report), flush=True)
""".replace("@DATA@", EVAL_DATA).replace("@OUT@", EVAL_OUT)

HOSTILE = """
import json, os, signal, socket, sys
sys.path.insert(0, "/probe")
from search import search

channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket-fd") + 1]))
message, fds, _, _ = socket.recv_fds(channel, 65536, 3)
scorer = os.getppid()
results = {}

def attempt(name, action):
    try:
        action()
        results[name] = "succeeded"
    except OSError as exc:
        results[name] = "refused: " + type(exc).__name__

attempt("read the val tokens", lambda: open("@DATA@/tokens.bin", "rb").read())
attempt("list the private folder", lambda: os.listdir("@PRIVATE@"))
attempt("write result.json", lambda: open("@OUT@/result.json", "w").write("{}"))
attempt("signal the scorer", lambda: os.kill(scorer, 0))
attempt("read the scorer's memory", lambda: open(f"/proc/{scorer}/mem", "rb").read(1))
attempt("read the scorer's environment", lambda: open(f"/proc/{scorer}/environ", "rb").read())
attempt("open the scorer's descriptors", lambda: os.listdir(f"/proc/{scorer}/fd"))
attempt("read the checkpoint folder", lambda: os.listdir("/checkpoint"))
attempt("become root", lambda: os.setuid(0))
attempt("rewrite the checkpoint copy", lambda: os.pwrite(fds[0], b"XX", 0))
needle = bytes.fromhex("@NEEDLE@")
report = {"uid": os.getuid(), "attempts": results, "search hits": search(needle),
          "checkpoint copy starts": os.pread(fds[0], 4, 0).hex()}
print("HOSTILE " + json.dumps(report), flush=True)
channel.send(json.dumps({"error": "hostile stand-in done"}).encode())
"""


def _report(output: str, tag: str) -> dict[str, object]:
    line = next(line for line in output.splitlines() if line.startswith(tag + " "))
    return dict(json.loads(line[len(tag) + 1:]))


def test_compromised_model_process_reaches_neither_val_split_nor_result_nor_scorer(
        docker_backend: DockerBackend, trainer_image: str, prepared_data: Path, tmp_path: Path) -> None:
    """Run as the eval stage's model process, hostile code is refused every path to the val tokens, the result
    and the scorer, while the scorer beside it reads and writes them (positive controls)."""
    tokens = (prepared_data / "val" / "tokens.bin").read_bytes()
    needle = tokens[len(tokens) // 2:len(tokens) // 2 + 48]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "search.py").write_text(SEARCH)
    (probe / "scorer.py").write_text(SCORER)
    (probe / "hostile.py").write_text(HOSTILE.replace("@DATA@", EVAL_DATA).replace("@OUT@", EVAL_OUT)
                                      .replace("@PRIVATE@", PRIVATE_DIR).replace("@NEEDLE@", needle.hex()))
    (probe / "needle.hex").write_text(needle.hex())
    checkpoint = tmp_path / "train-out"
    checkpoint.mkdir()
    (checkpoint / "model.pt2").write_bytes(b"PK\x03\x04 stand-in")
    os.chown(checkpoint, SANDBOX_UID, SANDBOX_UID)
    checkpoint.chmod(0o770)
    out = tmp_path / "eval-out"
    spec = RunSpec(name="redteam-model-process", command=("python3", "/probe/scorer.py"), image=trainer_image,
                   mounts=(Mount(REPO_ROOT / "trainer", TRAINER_TARGET), Mount(probe, "/probe"),
                           Mount(prepared_data / "val", EVAL_DATA), Mount(checkpoint, "/checkpoint"),
                           Mount(out, EVAL_OUT, True)),
                   env={"PYTHONPATH": "/opt/autoresearch"}, limits=EVAL_LIMITS,
                   labels={"autoresearch.instance": INSTANCE}, split_identities=True, workdir="/")
    result = docker_backend.run(spec)
    assert result.ok, result.output_tail
    scorer, hostile = _report(result.output_tail, "SCORER"), _report(result.output_tail, "HOSTILE")
    assert scorer["uid"] == SANDBOX_UID and hostile["uid"] == MODEL_UID
    assert scorer["read val tokens"] == len(tokens) and scorer["search hits"] == [f"{EVAL_DATA}/tokens.bin"]
    assert (out / "scorer.txt").read_text() == "written by the scorer"
    assert "hostile stand-in done" in str(scorer["model process said"])
    attempts = hostile["attempts"]
    assert isinstance(attempts, dict) and len(attempts) == 10
    assert {name: why for name, why in attempts.items() if not why.startswith("refused")} == {}
    assert hostile["search hits"] == [] and hostile["checkpoint copy starts"] == b"PK\x03\x04".hex()
    assert not (out / "result.json").exists()


def test_eval_container_starts_no_process_as_root_after_the_split(
        docker_backend: DockerBackend, trainer_image: str, tmp_path: Path) -> None:
    """Once the scorer has dropped, no process of the stage but the container's deadline keeper keeps uid 0."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "ps.py").write_text(textwrap.dedent("""
        import json, os, sys, time
        from trainer.model_process import ModelProcess
        from trainer.privsep import Identities, become
        identities = Identities.from_env(os.environ)
        with ModelProcess(identities, [sys.executable, "-c", "import time; time.sleep(3)"]) as model:
            become(identities.scorer_uid)
            time.sleep(0.5)
            rows = []
            for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
                    rows.append((open(f"/proc/{pid}/comm").read().strip(), status["Uid"].split()[1],
                                 status["CapEff"].strip()))
                except OSError:
                    continue
            print("PROCS " + json.dumps(rows), flush=True)
    """))
    out = tmp_path / "out"
    spec = RunSpec(name="redteam-model-process-ps", command=("python3", "/probe/ps.py"), image=trainer_image,
                   mounts=(Mount(REPO_ROOT / "trainer", TRAINER_TARGET), Mount(probe, "/probe"),
                           Mount(out, EVAL_OUT, True)),
                   env={"PYTHONPATH": "/opt/autoresearch"}, limits=EVAL_LIMITS,
                   labels={"autoresearch.instance": INSTANCE}, split_identities=True, workdir="/")
    result = docker_backend.run(spec)
    assert result.ok, result.output_tail
    line = next(line for line in result.output_tail.splitlines() if line.startswith("PROCS "))
    procs = json.loads(line[len("PROCS "):])
    by_uid = {(name, uid) for name, uid, _caps in procs}
    assert ("python3", str(SANDBOX_UID)) in by_uid and ("python3", str(MODEL_UID)) in by_uid
    assert {name for name, uid, _caps in procs if uid == "0"} <= {"timeout"}
    assert all(int(caps, 16) == 0 for _name, uid, caps in procs if uid != "0")


def test_checkpoint_the_scorer_cannot_read_is_invalid_not_a_crash(
        docker_backend: DockerBackend, trainer_image: str, prepared_data: Path, tmp_path: Path) -> None:
    """The real eval stage, split as the runner runs it, meets a checkpoint its scorer may not read: the result
    is `invalid` with the reason and the stage exits 0 (no crash, no checkpoint hash)."""
    from tests.trainer.test_trainer_harness import _TokenModel
    from trainer.prepare import export_checkpoint

    checkpoint = tmp_path / "train-out"
    checkpoint.mkdir()
    export_checkpoint(_TokenModel(512), checkpoint).chmod(0o600)  # root's alone: neither 1000 nor 1001 reads it
    out = tmp_path / "eval-out"
    spec = RunSpec(name="redteam-model-process-unreadable", command=EVAL_COMMAND, image=trainer_image,
                   mounts=(Mount(REPO_ROOT / "trainer", TRAINER_TARGET), Mount(prepared_data / "val", EVAL_DATA),
                           Mount(checkpoint, "/checkpoint"), Mount(out, EVAL_OUT, True)),
                   env={"PYTHONPATH": "/opt/autoresearch", "AUTORESEARCH_EVAL_TOKENS": "4096"}, limits=EVAL_LIMITS,
                   labels={"autoresearch.instance": INSTANCE}, split_identities=True, workdir="/")
    result = docker_backend.run(spec)
    assert result.ok, result.output_tail
    verdict = json.loads(result.files["result.json"])
    assert verdict["status"] == "invalid" and verdict["checkpoint_sha256"] == "" and verdict["val_bpb"] is None
    assert "PermissionError" in verdict["error"]
