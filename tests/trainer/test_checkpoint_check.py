"""checkpoint_check: the allow-lists a candidate's exported program must pass before torch.export.load reads it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer import checkpoint_check, prepare, train
from trainer.checkpoint_check import UnsafeCheckpoint, check_expression
from trainer.layout import DataError
from trainer.prepare import export_checkpoint


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(512, 8)
        self.head = torch.nn.Linear(8, 512)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(idx))


def _edit_program(path: Path, change: Callable[[dict], None]) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in entries if name.endswith("models/model.json"))
    program = json.loads(entries[name])
    change(program)
    entries[name] = json.dumps(program).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)


def test_baseline_model_export_passes(tmp_path: Path) -> None:
    """The real baseline GPT, exported with export_checkpoint, passes every allow-list and loads."""
    fields = {field.name for field in dataclasses.fields(train.GPTConfig)}
    settings = {"vocab_size": 512, "depth": 4, "model_dim": 64, "n_head": 2, "seq_len": 128}
    model = train.GPT(train.GPTConfig(**{k: v for k, v in settings.items() if k in fields}))
    model.init_weights()
    if hasattr(model, "use_flex_attention"):
        model.use_flex_attention(False)
    export_checkpoint(model, tmp_path)
    prepare.check_checkpoint_archive(tmp_path / "model.pt2")
    assert prepare.load_checkpoint(tmp_path / "model.pt2").module()(torch.zeros(2, 1024, dtype=torch.int64)).shape \
        == (2, 1024, 512)


def test_code_in_a_shape_expression_never_runs(tmp_path: Path) -> None:
    """A symbolic expression that sympy would evaluate as Python is refused before the loader sees it."""
    marker = tmp_path / "pwned"
    path = export_checkpoint(_Tiny(), tmp_path)

    def plant(program: dict) -> None:
        tensors = program["graph_module"]["graph"]["tensor_values"].values()
        entry = next(size["as_expr"] for tensor in tensors for size in tensor["sizes"] if "as_expr" in size)
        entry["expr_str"] = f"(__import__('os').system('touch {marker}') or 1)*{entry['expr_str']}"

    _edit_program(path, plant)
    with pytest.raises(DataError, match="outside the shape grammar"):
        prepare.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    "__import__('os').system('id')", "s0.__class__", "Symbol('s0').func", "lambda: 0", "exec('1')",
    "Pow(Integer(2), Integer(100000000))", "s0**999999999", "Integer(10000000000000000000000)", "'abc'",
    "Symbol('os', positive=True)", "Symbol('s0', commutative=eval)", "s0; 1", "[s0]", "s0 if 1 else 0",
    "Function('f')(s0)", "S.Infinity", "s0\\n", "Symbol('s0', positive=True, integer=True)[0]",
])
def test_shape_grammar_refuses_anything_but_integer_arithmetic(text: str) -> None:
    """Attribute access, calls of unknown names, strings, powers, huge literals and indexing are refused."""
    with pytest.raises(UnsafeCheckpoint):
        check_expression(text)


@pytest.mark.parametrize("text", [
    "Symbol('s95', positive=True, integer=True)", "Mul(Integer(1024), Symbol('s95', positive=True, integer=True))",
    "s0*1024", "FloorDiv(s0 + 1, 2)", "Max(1, s0) - Mod(s1, 8)", "-s0 // 3 % 7", "Add(Integer(-1), s12)",
])
def test_shape_grammar_accepts_what_export_writes(text: str) -> None:
    """srepr and infix forms of integer arithmetic on shape symbols pass."""
    check_expression(text)


def test_an_op_that_reads_files_is_refused(tmp_path: Path) -> None:
    """aten.from_file inside the graph (it would read the val tokens while scoring) is not a pure op."""

    class Reader(_Tiny):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            peek = torch.from_file(str(tmp_path / "secret"), shared=False, size=4, dtype=torch.uint8)
            return self.head(self.embedding(idx)) + 0.0 * peek.float().sum()

    (tmp_path / "secret").write_bytes(b"abcd")
    # A fake kernel lets export trace the op, as a hostile candidate would register one (RuntimeError: an
    # earlier test in this process registered it already).
    with contextlib.suppress(RuntimeError):
        torch.library.register_fake("aten::from_file")(
            lambda _name, _shared=None, size=0, **kw: torch.empty(size, dtype=kw.get("dtype")))
    path = export_checkpoint(Reader(), tmp_path)
    with pytest.raises(UnsafeCheckpoint, match="from_file"):
        prepare.check_checkpoint_archive(path)


@pytest.mark.parametrize("target", ["torch.ops.aten.add_.Tensor", "torch.ops.aten.add.out",
                                    "torch.ops.aten.rand.default", "torch.ops.aten.normal.Tensor_float",
                                    "torch.ops.aten.bernoulli.p", "torch.ops.aten.empty.memory_format",
                                    "torch.ops.aten.copy_.default", "torch.ops.higher_order.cond",
                                    "torch.ops.aten._local_scalar_dense.default", "builtins.eval"])
def test_impure_targets_are_refused(tmp_path: Path, target: str) -> None:
    """In-place, out=, random, uninitialized, control-flow and Python targets are not on the allow-list."""
    path = export_checkpoint(_Tiny(), tmp_path)
    _edit_program(path, lambda p: p["graph_module"]["graph"]["nodes"][0].update(target=target))
    with pytest.raises(UnsafeCheckpoint, match="allow-list"):
        prepare.check_checkpoint_archive(path)


def test_a_buffer_mutated_in_place_is_refused(tmp_path: Path) -> None:
    """A call counter kept in a buffer (state across calls) is refused, whatever op mutates it."""

    class Counter(_Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return self.head(self.embedding(idx)) * (self.calls > 3)

    path = export_checkpoint(Counter(), tmp_path)
    with pytest.raises(UnsafeCheckpoint):
        prepare.check_checkpoint_archive(path)


@pytest.mark.parametrize("kind", ["buffer_mutation", "user_input_mutation", "gradient_to_parameter", "token"])
def test_signature_outputs_that_mutate_are_refused(tmp_path: Path, kind: str) -> None:
    """Graph outputs that write back into buffers or inputs are refused from the signature alone."""
    path = export_checkpoint(_Tiny(), tmp_path)

    def mutate(program: dict) -> None:
        program["graph_module"]["signature"]["output_specs"].append(
            {kind: {"arg": {"as_tensor": {"name": "x"}}, "buffer_name": "b"}})

    _edit_program(path, mutate)
    with pytest.raises(UnsafeCheckpoint, match=kind):
        prepare.check_checkpoint_archive(path)


def test_a_second_user_input_is_refused(tmp_path: Path) -> None:
    """The program takes the token tensor and nothing else."""
    path = export_checkpoint(_Tiny(), tmp_path)
    _edit_program(path, lambda p: p["graph_module"]["signature"]["input_specs"].append(
        {"user_input": {"arg": {"as_tensor": {"name": "extra"}}}}))
    with pytest.raises(UnsafeCheckpoint, match="2 user inputs"):
        prepare.check_checkpoint_archive(path)


def test_node_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph with more nodes than the cap is refused."""
    path = export_checkpoint(_Tiny(), tmp_path)
    monkeypatch.setattr(checkpoint_check, "MAX_NODES", 1)
    with pytest.raises(UnsafeCheckpoint, match="nodes"):
        prepare.check_checkpoint_archive(path)


def test_archive_size_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive that unpacks past the weights cap is refused before anything is read."""
    path = export_checkpoint(_Tiny(), tmp_path)
    monkeypatch.setattr(prepare, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(UnsafeCheckpoint, match="unpacks to"):
        prepare.check_checkpoint_archive(path)


def test_range_constraint_keys_are_symbols(tmp_path: Path) -> None:
    """A range-constraint key that is not a shape symbol is refused."""
    path = export_checkpoint(_Tiny(), tmp_path)
    _edit_program(path, lambda p: p.update(range_constraints={"__import__('os')": {"min_val": 1, "max_val": 2}}))
    with pytest.raises(UnsafeCheckpoint, match="range constraint"):
        prepare.check_checkpoint_archive(path)


def test_eval_stage_reports_a_refused_checkpoint_as_invalid(prepared_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the eval stage, a refused program is an `invalid` result with a one-line reason."""
    from trainer import harness

    path = export_checkpoint(_Tiny(), tmp_path)
    _edit_program(path, lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.ops.aten.rand.default"))
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    code = harness.main(["eval", "--checkpoint", str(path), "--data", str(prepared_data / "val"),
                         "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert code == 0 and result["status"] == "invalid" and result["val_bpb"] is None
    assert "allow-list" in result["error"] and "\n" not in result["error"]
