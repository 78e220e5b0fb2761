"""Allow-list validation of an exported program's JSON (`models/model.json`), before torch reads any of it.

torch.export.load trusts its archive: it evaluates every symbolic-shape string through sympy (which can
run Python), resolves graph targets by name, and happily loads graphs that mutate buffers or read files.
This module accepts only what an honest `export_checkpoint` of a causal LM writes:

- graph nodes that call an explicit set of pure ATen tensor ops (no I/O such as `from_file`, no random
  ops, no in-place or `out=` variants, nothing with side effects) or plain symbolic-int arithmetic;
- symbolic expressions (`expr_str`) made of sympy's srepr forms of integer arithmetic on shape symbols
  (`Symbol('s12', positive=True, integer=True)`, `Integer(n)`, `Mul`, `Add`, `FloorDiv`, `Max`...), checked
  against a strict grammar, and range-constraint keys that name such symbols;
- a graph signature with exactly one tensor user input and one user output, parameters, buffers and tensor
  constants, and nothing that mutates (no buffer or user-input mutation, no gradients, no tokens);
- caps on node count and expression length.

Everything else raises `UnsafeCheckpoint` with a one-line reason. No torch import: the check is plain JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

MAX_NODES = 20_000
MAX_EXPR_CHARS = 2_000
MAX_INT_DIGITS = 12
MAX_SYMBOLS = 64


class UnsafeCheckpoint(Exception):
    """The archive holds something the loader would execute, or that is not a pure function of its input.
    Deliberately not a RuntimeError: torch.export.load swallows those and retries an older (pickling) format."""


def _ops(*names: str) -> frozenset[str]:
    return frozenset(f"torch.ops.aten.{name}" for name in names)


# Pure, deterministic ATen ops (pre-dispatch "training" dialect that torch.export writes, plus their common
# core-ATen decompositions). Every overload is named: a new overload (an out= or in-place one) is refused.
PURE_ATEN_OPS = _ops(
    # elementwise arithmetic and math
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor", "mul.Tensor", "mul.Scalar",
    "div.Tensor", "div.Scalar", "div.Tensor_mode", "div.Scalar_mode", "neg.default", "abs.default", "pow.Tensor_Scalar",
    "pow.Tensor_Tensor", "pow.Scalar", "square.default", "sqrt.default", "rsqrt.default", "exp.default", "exp2.default",
    "expm1.default", "log.default", "log2.default", "log1p.default", "reciprocal.default", "sign.default",
    "floor.default", "ceil.default", "round.default", "trunc.default", "remainder.Scalar", "remainder.Tensor",
    "fmod.Scalar", "fmod.Tensor", "maximum.default", "minimum.default", "clamp.default", "clamp.Tensor",
    "clamp_min.default", "clamp_max.default", "clip.default", "lerp.Scalar", "lerp.Tensor", "addcmul.default",
    "addcdiv.default", "where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar", "sin.default",
    "cos.default", "tan.default", "tanh.default", "sinh.default", "cosh.default", "atan.default", "atan2.default",
    "erf.default", "erfc.default", "sigmoid.default", "logit.default",
    # comparisons and logic
    "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor", "lt.Scalar", "le.Tensor", "le.Scalar",
    "gt.Tensor", "gt.Scalar", "ge.Tensor", "ge.Scalar", "logical_and.default", "logical_or.default",
    "logical_not.default", "logical_xor.default", "bitwise_and.Tensor", "bitwise_or.Tensor", "bitwise_not.default",
    "__and__.Tensor", "__or__.Tensor", "__xor__.Tensor", "__invert__.default", "bitwise_and.Scalar",
    "bitwise_or.Scalar", "bitwise_xor.Tensor", "isnan.default", "isinf.default", "isfinite.default", "nan_to_num.default",
    # activations and normalization
    "relu.default", "gelu.default", "silu.default", "mish.default", "softplus.default", "elu.default",
    "leaky_relu.default", "hardtanh.default", "hardswish.default", "hardsigmoid.default", "glu.default",
    "softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default", "layer_norm.default",
    "native_layer_norm.default", "rms_norm.default", "_fused_rms_norm.default", "group_norm.default",
    "native_group_norm.default", "batch_norm.default", "_native_batch_norm_legit_no_training.default",
    # reductions
    "sum.default", "sum.dim_IntList", "mean.default", "mean.dim", "amax.default", "amin.default", "max.default",
    "max.dim", "min.default", "min.dim", "prod.default", "prod.dim_int", "var.correction", "var.dim",
    "std.correction", "std.dim", "norm.Scalar", "norm.ScalarOpt_dim", "linalg_vector_norm.default",
    "logsumexp.default", "cumsum.default", "cumprod.default", "argmax.default", "argmin.default", "any.default",
    "any.dim", "all.default", "all.dim", "topk.default", "sort.default",
    # matmul, attention, convolution
    "linear.default", "matmul.default", "mm.default", "bmm.default", "addmm.default", "baddbmm.default",
    # Only the generic attention op: its backend variants (flash/efficient/cudnn, `_for_cpu`) have kernels for one
    # device only, and a checkpoint must move between CPU and CUDA (export_checkpoint writes the generic one).
    "einsum.default", "outer.default", "dot.default", "scaled_dot_product_attention.default",
    "conv1d.default", "conv2d.default", "convolution.default", "embedding.default",
    # shapes, views and copies (functional)
    "view.default", "view.dtype", "reshape.default", "_unsafe_view.default", "transpose.int", "permute.default",
    "t.default", "expand.default", "expand_as.default", "slice.Tensor", "select.int", "narrow.default",
    "unsqueeze.default", "squeeze.default", "squeeze.dim", "squeeze.dims", "flatten.using_ints",
    "unflatten.int", "contiguous.default", "clone.default", "alias.default", "detach.default",
    "lift_fresh_copy.default", "split.Tensor", "split_with_sizes.default", "chunk.default", "unbind.int",
    "cat.default", "stack.default", "repeat.default", "repeat_interleave.self_int", "tile.default", "roll.default",
    "flip.default", "tril.default", "triu.default", "diagonal.default", "index_select.default", "gather.default",
    "index.Tensor", "masked_fill.Scalar", "masked_fill.Tensor", "scatter.src", "scatter.value", "pad.default",
    "constant_pad_nd.default", "one_hot.default", "view_as.default", "movedim.int", "unfold.default",
    "split_with_sizes_copy.default", "slice_copy.Tensor", "view_copy.default", "permute_copy.default",
    "expand_copy.default", "transpose_copy.int", "unsqueeze_copy.default", "select_copy.int",
    # dtypes and constructors with no randomness and no uninitialized memory
    "to.dtype", "to.dtype_layout", "to.device", "_to_copy.default", "type_as.default", "float.default",
    "arange.default", "arange.start", "arange.start_step", "zeros.default", "ones.default", "full.default",
    "zeros_like.default", "ones_like.default", "full_like.default", "new_zeros.default", "new_ones.default",
    "new_full.default", "scalar_tensor.default", "tensor.int", "tensor.float",
    # shape queries and metadata assertions
    "sym_size.int", "sym_size.default", "sym_numel.default", "sym_stride.int", "sym_storage_offset.default",
    "size.int", "dim.default", "_assert_tensor_metadata.default", "_assert_scalar.default",
    "sym_constrain_range_for_size.default",
)
# Arithmetic on symbolic ints (sizes) that export writes as Python operator or torch.sym_* targets.
SYMBOLIC_TARGETS = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv", "_operator.mod",
    "_operator.neg", "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge",
    "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sum",
})
# dropout is pure only with train=False (its third argument): checked per node.
DROPOUT = "torch.ops.aten.dropout.default"
ALLOWED_INPUT_KINDS = frozenset({"parameter", "buffer", "tensor_constant", "user_input"})
ALLOWED_OUTPUT_KINDS = frozenset({"user_output"})

# ---------------------------------------------------------------------------------------------
# Symbolic expressions: sympy srepr of integer arithmetic on shape symbols

_EXPR_FUNCTIONS = frozenset({
    "Add", "Mul", "Max", "Min", "FloorDiv", "Mod", "PythonMod", "CeilDiv", "CleanDiv", "CeilToInt", "FloorToInt",
    "ModularIndexing", "Integer", "Rational", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan",
    "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not",
})
_SYMBOL_NAME = re.compile(r"[su][0-9]{1,6}")
_SYMBOL_FLAGS = frozenset({"positive", "integer", "nonnegative", "real", "finite"})
_TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[A-Za-z0-9_]*')|"
                    r"(?P<op>//|[-+*%(),=]))")


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise UnsafeCheckpoint(f"symbolic expression {text[:80]!r} has a character outside the shape grammar "
                                   f"at offset {position}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _ExprParser:
    """Recursive descent over the shape grammar; raises UnsafeCheckpoint on anything else.

    expr   := term (("+" | "-") term)*          term := unary (("*" | "//" | "%") unary)*
    unary  := "-" unary | atom                  atom := INT | SYMBOL_NAME | "(" expr ")" | call
    call   := "Symbol" "(" STR ("," FLAG "=" BOOL)* ")" | FUNC "(" [expr ("," expr)*] ")" | "True" | "False"
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.index = 0

    def fail(self, why: str) -> UnsafeCheckpoint:
        return UnsafeCheckpoint(f"symbolic expression {self.text[:80]!r} is outside the shape grammar: {why}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.index] if self.index < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.peek()
        if got_kind != kind or (value is not None and got != value):
            raise self.fail(f"expected {value or kind}, found {got or 'the end'!r}")
        self.index += 1
        return got

    def parse(self) -> None:
        self.expr(0)
        if self.index != len(self.tokens):
            raise self.fail(f"unexpected {self.peek()[1]!r}")

    def expr(self, depth: int) -> None:
        if depth > 32:
            raise self.fail("nested too deeply")
        self.term(depth)
        while self.peek() in (("op", "+"), ("op", "-")):
            self.index += 1
            self.term(depth)

    def term(self, depth: int) -> None:
        self.unary(depth)
        while self.peek() in (("op", "*"), ("op", "//"), ("op", "%")):
            self.index += 1
            self.unary(depth)

    def unary(self, depth: int) -> None:
        if self.peek() == ("op", "-"):
            self.index += 1
            self.unary(depth + 1)
            return
        self.atom(depth)

    def atom(self, depth: int) -> None:
        kind, value = self.peek()
        if kind == "int":
            if len(value) > MAX_INT_DIGITS:
                raise self.fail(f"integer literal of {len(value)} digits")
            self.index += 1
        elif value == "(":
            self.index += 1
            self.expr(depth + 1)
            self.take("op", ")")
        elif kind == "name" and value in ("True", "False"):
            self.index += 1
        elif kind == "name" and value == "Symbol":
            self.index += 1
            self.symbol()
        elif kind == "name" and value in _EXPR_FUNCTIONS:
            self.index += 1
            self.take("op", "(")
            if self.peek() != ("op", ")"):
                self.expr(depth + 1)
                while self.peek() == ("op", ","):
                    self.index += 1
                    self.expr(depth + 1)
            self.take("op", ")")
        elif kind == "name" and _SYMBOL_NAME.fullmatch(value):
            self.index += 1
        else:
            raise self.fail(f"{value!r} is not an allowed name or literal")

    def symbol(self) -> None:
        self.take("op", "(")
        name = self.take("str")[1:-1]
        if not _SYMBOL_NAME.fullmatch(name):
            raise self.fail(f"symbol name {name!r} is not a shape symbol (s<N> or u<N>)")
        while self.peek() == ("op", ","):
            self.index += 1
            flag = self.take("name")
            if flag not in _SYMBOL_FLAGS:
                raise self.fail(f"symbol flag {flag!r} is not allowed")
            self.take("op", "=")
            if self.take("name") not in ("True", "False"):
                raise self.fail("symbol flags take True or False")
        self.take("op", ")")


def check_expression(text: object) -> None:
    """Raise UnsafeCheckpoint unless `text` is a short integer-arithmetic expression over shape symbols."""
    if not isinstance(text, str):
        raise UnsafeCheckpoint(f"a symbolic expression is a {type(text).__name__}, not a string")
    if len(text) > MAX_EXPR_CHARS:
        raise UnsafeCheckpoint(f"a symbolic expression is {len(text)} characters long (cap {MAX_EXPR_CHARS})")
    _ExprParser(text).parse()


# ---------------------------------------------------------------------------------------------
# The program


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a JSON tree."""
    if isinstance(value, dict):
        for child_key, child in value.items():
            yield str(child_key), child
            yield from _walk(child, str(child_key))
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)


def _check_signature(signature: Any) -> None:
    if not isinstance(signature, dict):
        raise UnsafeCheckpoint("the program has no graph signature")
    inputs, outputs = signature.get("input_specs"), signature.get("output_specs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise UnsafeCheckpoint("the graph signature lists no input or output specs")
    user_inputs = 0
    for spec in inputs:
        kind = next(iter(spec), "") if isinstance(spec, dict) and len(spec) == 1 else ""
        if kind not in ALLOWED_INPUT_KINDS:
            raise UnsafeCheckpoint(f"graph input of kind {str(kind)[:40]!r} is not allowed (parameters, buffers, "
                                   "tensor constants and one token tensor only)")
        if kind == "user_input":
            user_inputs += 1
            argument = spec["user_input"].get("arg") if isinstance(spec["user_input"], dict) else None
            if not isinstance(argument, dict) or "as_tensor" not in argument:
                raise UnsafeCheckpoint("the program's user input is not a tensor")
    if user_inputs != 1:
        raise UnsafeCheckpoint(f"the program takes {user_inputs} user inputs; it must take exactly the token tensor")
    kinds = [next(iter(spec), "") if isinstance(spec, dict) and len(spec) == 1 else "" for spec in outputs]
    if bad := [kind for kind in kinds if kind not in ALLOWED_OUTPUT_KINDS]:
        raise UnsafeCheckpoint(f"the graph has outputs of kind {str(bad[0])[:40]!r}: mutated buffers or inputs "
                               "give the program state across calls")
    if len(kinds) != 1:
        raise UnsafeCheckpoint(f"the program returns {len(kinds)} outputs; it must return one logits tensor")


def _check_nodes(nodes: Any) -> None:
    if not isinstance(nodes, list):
        raise UnsafeCheckpoint("the graph has no node list")
    if len(nodes) > MAX_NODES:
        raise UnsafeCheckpoint(f"the graph has {len(nodes)} nodes (cap {MAX_NODES})")
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str):
            raise UnsafeCheckpoint("a graph node has no string target")
        if target == DROPOUT:
            inputs = node.get("inputs") or []
            train = inputs[2].get("arg") if len(inputs) > 2 and isinstance(inputs[2], dict) else None
            if train != {"as_bool": False}:
                raise UnsafeCheckpoint("the graph calls dropout in training mode (random): export with model.eval()")
            continue
        if target not in PURE_ATEN_OPS and target not in SYMBOLIC_TARGETS:
            raise UnsafeCheckpoint(f"the graph calls {target[:80]!r}, which is not on the allow-list of pure tensor "
                                   "ops (no I/O, randomness, in-place or out= variants)")


def _check_ranges(ranges: Any) -> None:
    if not isinstance(ranges, dict) or len(ranges) > MAX_SYMBOLS:
        raise UnsafeCheckpoint("the program's range constraints are not a small mapping")
    for name, bounds in ranges.items():
        if not _SYMBOL_NAME.fullmatch(str(name)):
            raise UnsafeCheckpoint(f"range constraint key {str(name)[:40]!r} is not a shape symbol")
        if not isinstance(bounds, dict) or not all(
                isinstance(bounds.get(edge), int) and abs(bounds[edge]) < 2**63 for edge in ("min_val", "max_val")):
            raise UnsafeCheckpoint(f"range constraint {name!r} has no integer bounds")


def check_program(program: Any) -> None:
    """Raise UnsafeCheckpoint unless `program` (the parsed models/model.json) passes every allow-list."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UnsafeCheckpoint("models/model.json holds no graph module")
    if program.get("guards_code"):
        raise UnsafeCheckpoint("the program carries guards_code, which torch would exec")
    module = program["graph_module"]
    graph = module.get("graph")
    if not isinstance(graph, dict):
        raise UnsafeCheckpoint("the graph module has no graph")
    _check_signature(module.get("signature"))
    _check_nodes(graph.get("nodes"))
    _check_ranges(program.get("range_constraints", {}))
    for key, value in _walk(program):
        if key == "expr_str":
            check_expression(value)
        elif key == "target" and isinstance(value, str) and value not in PURE_ATEN_OPS \
                and value not in SYMBOLIC_TARGETS and value != DROPOUT:
            # Targets also hide in nested graphs and in metadata that the loader resolves by name.
            raise UnsafeCheckpoint(f"the program names {value[:80]!r}, which is not an allowed op")
        elif key == "subgraphs" or (key == "graph_module" and value is not module):
            raise UnsafeCheckpoint("the program holds nested graphs (higher-order ops are not allowed)")
