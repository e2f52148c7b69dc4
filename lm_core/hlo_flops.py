"""Matmul FLOPs of a compiled XLA program, read from its optimized HLO text, with loops counted per iteration.

XLA's own `compiled.cost_analysis()["flops"]` counts the body of a while loop once, however many times it runs, so
for a model whose layers run as a scan (ModelConfig.scan_layers), a chunked loss or gradient accumulation it
undercounts by the trip count. Here every `dot` and `convolution` (TPU compiles matmuls to convolutions) counts
2 · output elements · contracted size, a while body counts its trip count times, and fusions and calls count what
they call. The trip count is XLA's `known_trip_count` where it recorded one, else the constant bound of the loop
condition's `i < N` (what a JAX scan lowers to); a loop with neither counts once. Elementwise work is not counted:
these are the matmul FLOPs an analytic 6·N-style count (lm_core.flops) is compared with. `collective_bytes` counts
the bytes of the communication ops the same loop-aware way.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$")
# "%name = TYPE op(operands), attributes"; TYPE may be a tuple "(s32[], f32[8]{0:T(8)})" with spaces in it
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(.*)$")
_SIGNATURE_PARAM = re.compile(r"([\w.\-]+): ([a-z]\w*\[[\d,]*\])")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(type_text: str) -> list[int] | None:
    match = _SHAPE.match(type_text)
    if match is None:
        return None
    return [int(d) for d in match.group(1).split(",") if d]


def _parse(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, dict[str, list[int] | None]], str]:
    """(instruction lines per computation, shapes of named values per computation, the entry computation's name)."""
    bodies: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, list[int] | None]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            entry = current if line.startswith("ENTRY") else entry
            bodies[current] = []
            shapes[current] = {name: _dims(t) for name, t in _SIGNATURE_PARAM.findall(header.group(2))}
        elif line == "}":  # not "}}, metadata=...": a custom call's backend config can span several lines
            current = None
        elif current is not None:
            instruction = _INSTRUCTION.match(line)
            if instruction:
                bodies[current].append(line)
                shapes[current][instruction.group(1)] = _dims(instruction.group(2))
    return bodies, shapes, entry


def _operand_names(operands: str) -> list[str]:
    return [name.lstrip("%") for name in re.findall(r"%[\w.\-]+", operands)]


def _matmul_flops(op: str, out: list[int] | None, operands: list[list[int] | None], attrs: str) -> float:
    if out is None:
        return 0.0
    if op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        lhs = operands[0] if operands else None
        if contracting is None or lhs is None:
            return 0.0
        return 2.0 * math.prod(out) * math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if labels is None or len(operands) < 2 or None in operands[:2]:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs, rhs = operands[0], operands[1]
    features = math.prod(size for size, label in zip(rhs, rhs_labels, strict=False) if label == "i")
    spatial = sorted(label for label in out_labels if label.isdigit())
    outer = math.prod(size for size, label in zip(out, out_labels, strict=False) if not label.isdigit())
    window = _window(attrs, len(spatial))
    taps = math.prod(_real_taps(lhs[lhs_labels.index(d)], out[out_labels.index(d)], *window[i])
                     for i, d in enumerate(spatial))
    return 2.0 * outer * features * taps


def _window(attrs: str, rank: int) -> list[tuple[int, int, int, int, int]]:
    """Per spatial dimension: (size, stride, padding before, input dilation, kernel dilation)."""
    if rank == 0:
        return []
    match = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\d_x\-]+)", match.group(1))) if match else {}

    def ints(name: str, default: str) -> list[int]:
        return [int(v.split("_")[0]) for v in fields.get(name, "x".join([default] * rank)).split("x")]

    return list(zip(ints("size", "1"), ints("stride", "1"), ints("pad", "0"), ints("lhs_dilate", "1"),
                    ints("rhs_dilate", "1"), strict=True))


def _real_taps(in_size: int, out_size: int, size: int, stride: int, pad_low: int, lhs_dilate: int,
               rhs_dilate: int) -> int:
    """Over all outputs along one spatial axis, how many window taps land on a real input element.

    Padding and the holes of a dilated input hold zeros, so taps there do no work. TPU compiles batched and
    grouped matmuls to convolutions whose batch or head axes are spatial, e.g. a window of size 4 over an input
    of size 1 padded by 3 on each side: each output reads one real element, not four.
    """
    last = (in_size - 1) * lhs_dilate
    return sum(1 for o in range(out_size) for j in range(size)
               if 0 <= (p := o * stride + j * rhs_dilate - pad_low) <= last and p % lhs_dilate == 0)


def _trip_count(attrs: str, condition: list[str], body: list[str]) -> int:
    """Iterations of a while loop: XLA's known_trip_count, else bound / step of the loop counter.

    The counter is the tuple element the condition compares (`i < N`, N a constant); its step is the constant
    the body writes back (1 for a JAX scan, 2 for the bidirectional "windowed einsum" loops XLA writes for an
    all-gathered matmul). A loop not of this form counts once.
    """
    known = _TRIP_COUNT.search(attrs)
    if known:
        return int(known.group(1))
    constants = _constants(condition)
    compare = next((line for line in condition if " compare(" in line and "direction=LT" in line), "")
    compared = _operand_names(compare.split(" compare(", 1)[-1])
    index = _tuple_index(condition, compared)
    bounds = [constants[n] for n in compared if n in constants]
    if len(bounds) != 1 or index is None:
        return 1
    return -(-bounds[0] // _counter_step(body, index))


def _constants(lines: list[str]) -> dict[str, int]:
    found = {}
    for line in lines:
        match = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = [su]32\[\]\S* constant\((\d+)\)", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def _tuple_index(lines: list[str], names: list[str]) -> int | None:
    """The loop-state tuple index that one of `names` reads (a get-tuple-element of the loop parameter)."""
    for line in lines:
        match = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .* get-tuple-element\(.*index=(\d+)", line)
        if match and match.group(1) in names:
            return int(match.group(2))
    return None


def _counter_step(body: list[str], index: int) -> int:
    """The constant the loop body adds to tuple element `index`: what the body's ROOT tuple puts back there,
    followed through copies and converts to an `add(counter, constant)`; 1 if it is not of that form.

    Only the value written back counts: a windowed-einsum body also computes `i + 1` (the second shard's index)
    on the way, which is not the step (taking it had counted those loops twice).
    """
    definitions, constants, root = {}, _constants(body), None
    for line in body:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, _, op, operands, _ = match.groups()
        definitions[name] = (op, _operand_names(operands))
        root = (op, _operand_names(operands)) if line.lstrip().startswith("ROOT ") else root
    if root is None or root[0] != "tuple" or index >= len(root[1]):
        return 1
    name = root[1][index]
    while definitions.get(name, ("", []))[0] in ("copy", "bitcast", "convert"):
        name = definitions[name][1][0]
    op, operands = definitions.get(name, ("", []))
    steps = [constants[n] for n in operands if n in constants]
    return steps[0] if op == "add" and len(steps) == 1 and steps[0] > 0 else 1


def matmul_flops(hlo_text: str) -> float:
    """Matmul FLOPs of one execution of the program (per device for an SPMD-partitioned program)."""
    return sum(matmul_flops_by_origin(hlo_text).values())


def matmul_flops_by_origin(hlo_text: str) -> dict[str, float]:
    """`matmul_flops` split by the JAX operation each matmul came from (the last part of its op_name metadata).

    Mostly "dot_general"; a TPU compile also turns some gathers and scatter-adds (an embedding lookup and its
    gradient) into one-hot matmuls, which show up under their own names. "custom-call" kernels (splash, cuDNN
    attention) are opaque: their FLOPs are not in here at all.
    """

    def cost(name: str, op: str, out_type: str, operands: str, attrs: str, known: dict[str, list[int] | None]
             ) -> dict[str, float]:
        if op not in MATMUL_OPS:
            return {}
        return {_origin(attrs): _instruction_matmul_flops(op, out_type, operands, attrs, known)}

    return loop_aware_totals(hlo_text, cost)


MATMUL_OPS = ("dot", "convolution")


def _instruction_matmul_flops(op: str, out_type: str, operands: str, attrs: str,
                              known: dict[str, list[int] | None]) -> float:
    """The FLOPs of one dot or convolution instruction, its operands' shapes looked up in `known`."""
    return _matmul_flops(op, _dims(out_type), [known.get(n) for n in _operand_names(operands)], attrs)


def recomputed_matmul_flops(hlo_text: str) -> float:
    """The part of `matmul_flops` that rematerialisation adds: matmuls of `jax.checkpoint`'s recomputation in the
    backward pass (op names under "rematted_computation": remat'd blocks, the chunked loss's recomputed logits)."""

    def cost(name: str, op: str, out_type: str, operands: str, attrs: str, known: dict[str, list[int] | None]
             ) -> dict[str, float]:
        if op not in MATMUL_OPS or "/rematted_computation/" not in _op_name(attrs):
            return {}
        return {"recomputed": _instruction_matmul_flops(op, out_type, operands, attrs, known)}

    return loop_aware_totals(hlo_text, cost).get("recomputed", 0.0)


OPAQUE_KERNEL_TARGETS = ("tpu_custom_call", "__cudnn", "__gpu$xla.gpu.triton")


def opaque_kernel_calls(hlo_text: str) -> dict[str, float]:
    """Executions per program run of kernels whose work XLA cannot see (Pallas/Mosaic TPU kernels such as splash
    attention, cuDNN attention, Triton), by instruction name without its ".N" suffix: their FLOPs are not in
    `matmul_flops`."""

    def cost(name: str, op: str, out_type: str, operands: str, attrs: str, known: dict[str, list[int] | None]
             ) -> dict[str, float]:
        target = re.search(r'custom_call_target="([^"]+)"', attrs)
        if op != "custom-call" or target is None or not target.group(1).startswith(OPAQUE_KERNEL_TARGETS):
            return {}
        return {re.sub(r"\.\d+$", "", name): 1.0}

    return loop_aware_totals(hlo_text, cost)


COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                  "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY_TYPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes each device's collectives produce in one execution, by kind (`COLLECTIVES`), loops counted per
    iteration: the gathered array of an all-gather, the reduced buffer of an all-reduce, the exchanged buffer of
    an all-to-all (a device keeps 1/n of it and sends the rest). Asynchronous pairs count once, at their start."""

    def cost(name: str, op: str, out_type: str, operands: str, attrs: str, known: dict[str, list[int] | None]
             ) -> dict[str, float]:
        kind = op.removesuffix("-start")
        if kind not in COLLECTIVES:
            return {}
        sizes = [_ELEMENT_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                 for dtype, dims in _ARRAY_TYPE.findall(out_type)]
        # a "-start" op returns (operands..., result, contexts...): its result is the largest of them
        return {kind: float(max(sizes, default=0) if op.endswith("-start") else sum(sizes))}

    return loop_aware_totals(hlo_text, cost)


def loop_aware_totals(hlo_text: str, cost: Callable[..., dict[str, float]]) -> dict[str, float]:
    """Sum `cost(name, op, out_type, operands, attrs, shapes_of_named_values)` (a dict of named amounts) over every
    instruction one execution runs: while bodies times their trip count, fusions and calls what they call, the
    costliest branch of a conditional. An instruction without op_name metadata (XLA drops it inside some fusions)
    is given its caller's, so costs keyed by op name land where they came from."""
    bodies, shapes, entry = _parse(hlo_text)

    @functools.cache
    def computation_totals(name: str, caller_op_name: str) -> tuple[tuple[str, float], ...]:
        total: dict[str, float] = {}

        def add(items: Iterable[tuple[str, float]], repeats: int = 1) -> None:
            for key, amount in items:
                total[key] = total.get(key, 0.0) + repeats * amount

        for line in bodies.get(name, []):
            instruction, out_type, op, operands, attrs = _INSTRUCTION.match(line).groups()
            op_name = _op_name(attrs) or caller_op_name
            if op_name and not _op_name(attrs):
                attrs = f'{attrs}, metadata={{op_name="{op_name}"}}'
            add(cost(instruction, op, out_type, operands, attrs, shapes[name]).items())
            if op.endswith("-done"):  # an async pair's work is counted at its start
                continue
            called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs)
            repeats = 1
            if op == "while":
                called = [re.search(r"body=%([\w.\-]+)", attrs).group(1)]
                condition = re.search(r"condition=%([\w.\-]+)", attrs).group(1)
                repeats = _trip_count(attrs, bodies.get(condition, []), bodies.get(called[0], []))
            branches = re.search(r"branch_computations=\{(.*?)\}", attrs)
            if branches:  # one branch runs: count the costliest
                called.append(max(_operand_names(branches.group(1)),
                                  key=lambda n: sum(f for _, f in computation_totals(n, op_name))))
            for callee in called:
                add(computation_totals(callee, op_name), repeats)
        return tuple(total.items())

    return dict(computation_totals(entry, ""))


def _op_name(attrs: str) -> str:
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    return op_name.group(1) if op_name else ""


def _origin(attrs: str) -> str:
    return _op_name(attrs).rsplit("/", 1)[-1] or "unknown"
