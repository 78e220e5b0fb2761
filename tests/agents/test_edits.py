"""apply_edits, validate_candidate and normalized_hash on the real baseline train.py."""

from __future__ import annotations

import pytest

from daemon.agents import Edit
from daemon.agents.edits import MAX_SOURCE_BYTES, apply_edits, normalized_hash, validate_candidate
from daemon.errors import InvalidProposal
from tests.agents.support import BASELINE

LR_LINE = "MATRIX_LR = 0.02 "


def test_edit_applies_once() -> None:
    """A search text that occurs once is replaced, and only there."""
    result = apply_edits(BASELINE, [Edit("MATRIX_LR = 0.02", "MATRIX_LR = 0.03")])
    assert "MATRIX_LR = 0.03" in result
    assert result.replace("MATRIX_LR = 0.03", "MATRIX_LR = 0.02") == BASELINE


def test_edits_apply_in_order() -> None:
    """A later edit sees the file as the earlier edits left it."""
    result = apply_edits(BASELINE, [Edit("MATRIX_LR = 0.02", "MATRIX_LR = 0.03"),
                                    Edit("MATRIX_LR = 0.03", "MATRIX_LR = 0.04")])
    assert "MATRIX_LR = 0.04" in result


def test_missing_search_text_is_refused() -> None:
    """A search text absent from the file names the edit and says to copy it exactly."""
    with pytest.raises(InvalidProposal, match="edit 1: the search text does not occur"):
        apply_edits(BASELINE, [Edit("MATRIX_LR = 0.99", "MATRIX_LR = 0.03")])


def test_whitespace_only_mismatch_is_explained() -> None:
    """A search text that matches only when whitespace is ignored says so."""
    with pytest.raises(InvalidProposal, match="only when whitespace is ignored"):
        apply_edits(BASELINE, [Edit("MATRIX_LR  =  0.02", "MATRIX_LR = 0.03")])


def test_ambiguous_search_text_is_refused() -> None:
    """A search text found several times asks for more context."""
    with pytest.raises(InvalidProposal, match=r"occurs .* times"):
        apply_edits(BASELINE, [Edit("import ", "import  ")])


def test_no_edits_is_refused() -> None:
    """An empty edit list is an error, not a no-op candidate."""
    with pytest.raises(InvalidProposal, match="no edits"):
        apply_edits(BASELINE, [])


def test_unchanged_result_is_refused() -> None:
    """Edits that change nothing are refused."""
    with pytest.raises(InvalidProposal, match="unchanged"):
        apply_edits(BASELINE, [Edit("MATRIX_LR = 0.02", "MATRIX_LR = 0.02")])


def test_whole_file_replacement() -> None:
    """An edit with an empty search replaces the whole file."""
    assert apply_edits(BASELINE, [Edit("", BASELINE + "\n# more\n")]) == BASELINE + "\n# more\n"


def test_whole_file_with_other_edits_is_refused() -> None:
    """A whole-file replacement cannot be mixed with search/replace blocks."""
    with pytest.raises(InvalidProposal, match="whole-file replacement must be the only edit"):
        apply_edits(BASELINE, [Edit("", BASELINE), Edit("MATRIX_LR", "X")])


def test_baseline_is_valid() -> None:
    """The real baseline train.py passes every guard rule."""
    assert validate_candidate(BASELINE, frozenset()) == normalized_hash(BASELINE)


def test_hash_ignores_comments_and_formatting() -> None:
    """Comments, blank lines and spacing do not change the normalized hash; values do."""
    reformatted = BASELINE.replace("MATRIX_LR = 0.02", "MATRIX_LR=0.02").replace("# Model\n", "# the model\n\n")
    assert normalized_hash(reformatted) == normalized_hash(BASELINE)
    assert normalized_hash(BASELINE.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.021")) != normalized_hash(BASELINE)


def test_duplicate_is_refused() -> None:
    """A candidate equal to a seen one up to comments is refused."""
    seen = frozenset({normalized_hash(BASELINE)})
    with pytest.raises(InvalidProposal, match=r"identical .* already tried"):
        validate_candidate(BASELINE.replace("# Model\n", "# a comment\n"), seen)


def test_syntax_error_is_refused() -> None:
    """A candidate that does not parse names the line."""
    with pytest.raises(InvalidProposal, match=r"does not compile: line \d+"):
        validate_candidate(BASELINE.replace("def main() -> None:", "def main( -> None:"), frozenset())


def test_compile_error_is_refused() -> None:
    """A candidate that parses but does not compile (return outside a function) is refused."""
    with pytest.raises(InvalidProposal, match="does not compile"):
        validate_candidate(BASELINE + "\nreturn 1\n", frozenset())


def test_oversized_candidate_is_refused() -> None:
    """A candidate over the size limit is refused with the limit."""
    huge = BASELINE + "\n" + "#" * MAX_SOURCE_BYTES + "\n"
    with pytest.raises(InvalidProposal, match=f"over the limit of {MAX_SOURCE_BYTES}"):
        validate_candidate(huge, frozenset())


GUARD_CASES = {
    "subprocess": ("import subprocess\n", "importing 'subprocess' is not allowed"),
    "socket_from": ("from socket import create_connection\n", "importing 'socket' is not allowed"),
    "ctypes": ("import ctypes.util\n", "importing 'ctypes.util' is not allowed"),
    "urllib": ("import urllib.request\n", "importing 'urllib.request' is not allowed"),
    "pickle": ("import pickle\n", "importing 'pickle' is not allowed"),
    "exec": ("exec('x = 1')\n", r"calling exec\(\) is not allowed"),
    "dunder_import": ("__import__('os')\n", r"calling __import__\(\) is not allowed"),
    "os_system": ("os.system('ls')\n", r"os.system\(\) is not allowed"),
    "os_fork": ("os.fork()\n", r"os.fork\(\) is not allowed"),
    "harness": ("from trainer import harness\n", "must not import trainer.harness"),
    "harness_module": ("import trainer.harness\n", "must not import trainer.harness"),
    "eval_stage": ("from trainer import eval_stage\n", "must not import trainer.harness or trainer.eval_stage"),
    "eval_stage_module": ("import trainer.eval_stage\n", "must not import trainer.harness or trainer.eval_stage"),
    "evaluate_bpb": ("from trainer.prepare import evaluate_bpb\n", "evaluation is done by the trusted harness"),
    "private_prepare": ("from trainer.prepare import _read_json\n", "public names only"),
    "patch_prepare": ("import trainer.prepare as prepare\nprepare.EVAL_TOKENS = 1\n", "must not change"),
    "val_path": ("VAL = '/data/val/tokens.bin'\n", "names the validation split"),
    "eval_tokens_env": ("N = os.environ.get('AUTORESEARCH_EVAL_TOKENS')\n", "belongs to the trusted eval stage"),
    "environ_write": ("os.environ['AUTORESEARCH_TIME_BUDGET'] = '9999'\n", "must not change the environment"),
    "environ_update": ("os.environ.update({'A': 'b'})\n", "must not change the environment"),
    "relative_import": ("from . import prepare\n", "relative import"),
}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_guard_rule_refuses(case: str) -> None:
    """Each guard rule refuses its forbidden construct with a message saying why."""
    addition, message = GUARD_CASES[case]
    candidate = BASELINE.replace("\n\ndef main() -> None:", f"\n\n{addition}\n\ndef main() -> None:", 1)
    assert candidate != BASELINE
    with pytest.raises(InvalidProposal, match=message):
        validate_candidate(candidate, frozenset())


def test_dropping_the_time_budget_is_refused() -> None:
    """A candidate that stops reading AUTORESEARCH_TIME_BUDGET is refused."""
    candidate = BASELINE.replace('float(os.environ.get("AUTORESEARCH_TIME_BUDGET", "300"))', "3600.0")
    assert candidate != BASELINE
    with pytest.raises(InvalidProposal, match="no longer reads its time budget"):
        validate_candidate(candidate, frozenset())


def test_dropping_the_checkpoint_is_refused() -> None:
    """A candidate that no longer exports the checkpoint is refused."""
    candidate = BASELINE.replace("    export_checkpoint(model.float().cpu(), out_dir)\n", "")
    assert candidate != BASELINE
    with pytest.raises(InvalidProposal, match="no longer calls export_checkpoint"):
        validate_candidate(candidate, frozenset())
