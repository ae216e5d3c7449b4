"""What a compiled program moves and computes per call, read from its HLO.

XLA's `cost_analysis()` counts the body of a loop once, and counts no
collectives; a chunked output head or gradient accumulation runs its body
many times. `collective_bytes` and `matmul_flops` walk the optimized HLO
(`compiled.as_text()`) from the entry computation and weight every
instruction by the trip counts of the loops it sits in (XLA's
`known_trip_count`; a loop without one counts once and is reported in
`unknown_loops`).

A collective's bytes are those of its full (unsharded) buffer: an
all-gather's result, a reduce-scatter's operand, an all-reduce's result, an
all-to-all's or collective-permute's result (of an async `*-start`, the
results half of its tuple; a combined collective, the sum of its arrays).
XLA's TPU compiler writes a reduce-scatter as an all-reduce inside an
`all-reduce-scatter` fusion: counted as the reduce-scatter it is. FLOPs are 2 x the
multiply-adds of every dot and convolution (elementwise work is left out).
"""

from __future__ import annotations

import collections
import math
import re

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_COMP = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")  # Header line.
_INST = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9_-]*)\((.*)$")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_CALLS = re.compile(
    r"(?:body|condition|to_apply|calls|true_computation|"
    r"false_computation)=%([\w.-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [
      (t, tuple(int(d) for d in dims.split(",") if d))
      for t, dims in _ARRAY.findall(shape)
      if t in _ITEMSIZE
  ]


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple: the sum of its arrays)."""
  return sum(_ITEMSIZE[t] * math.prod(d) for t, d in _arrays(shape))


class Program:
  """An HLO module's computations, instructions and loop multipliers."""

  def __init__(self, hlo_text: str):
    self.comps: dict[str, list[tuple]] = {}
    self.shapes: dict[str, str] = {}
    self.entry = None
    current = None
    for line in hlo_text.splitlines():
      m = _COMP.match(line)
      if m:  # Computations start unindented; instructions are indented.
        current = m.group(2)
        self.comps[current] = []
        if m.group(1):
          self.entry = current
        continue
      m = _INST.match(line)
      if m and current is not None:
        _, name, shape, op, rest = m.groups()
        self.shapes[name] = shape
        self.comps[current].append((name, shape, op, rest))
    self.unknown_loops = 0
    self.weight = self._weights()

  def _weights(self) -> dict[str, float]:
    """How many times each computation runs per call of the entry."""
    weight = collections.defaultdict(float)
    self.in_loop: set[str] = set()  # Computations run inside a while loop.
    order = [self.entry]
    weight[self.entry] = 1.0
    seen = set()
    while order:  # Callers before callees: HLO has no recursion.
      comp = order.pop(0)
      if comp in seen:
        continue
      seen.add(comp)
      for _, _, op, rest in self.comps.get(comp, ()):
        callees = _CALLS.findall(rest)
        for group in _BRANCHES.findall(rest):
          callees += [c.strip().lstrip("%") for c in group.split(",")]
        trip = 1
        if op == "while":
          t = _TRIP.search(rest)
          trip = int(t.group(1)) if t else self._counted_trip(rest)
          self.unknown_loops += trip is None
          trip = trip or 1
        for callee in callees:
          weight[callee] += weight[comp] * trip
          if op == "while" or comp in self.in_loop:
            self.in_loop.add(callee)
          order.append(callee)
    return weight

  def _counted_trip(self, rest: str) -> int | None:
    """A loop's trip count read from its condition when XLA gives none (its
    TPU compiler): `counter < N` against a constant N, the counter from 0
    in steps of 1 as JAX's fori_loop and scan write them; else None."""
    m = re.search(r"condition=%([\w.-]+)", rest)
    insts = self.comps.get(m.group(1), ()) if m else ()
    consts = {n: r for n, _, o, r in insts if o == "constant"}
    for _, _, op, r in insts:
      if op == "compare" and "direction=LT" in r:
        args = [a.strip().lstrip("%") for a in r.split(")", 1)[0].split(",")]
        if len(args) == 2 and args[1] in consts:
          value = re.match(r"\s*(-?\d+)\)", consts[args[1]])
          return int(value.group(1)) if value else None
    return None

  def instructions(self, loops_only: bool = False):
    """(weight, name, shape, op, rest) of every instruction (loops_only:
    of those inside a while loop)."""
    for comp, insts in self.comps.items():
      if loops_only and comp not in self.in_loop:
        continue
      w = self.weight.get(comp, 0.0)
      for name, shape, op, rest in insts:
        yield w, name, shape, op, rest

  def operand_shapes(self, rest: str) -> list[str]:
    args = rest.split(")", 1)[0]
    return [
        self.shapes.get(a.strip().lstrip("%"), "")
        for a in args.split(",")
        if a.strip()
    ]


SCALAR_BYTES = 64  # A collective of at most this many bytes moves scalars.


def _collectives(prog: Program, loops_only: bool = False):
  """(weight, kind, {dtype: bytes of the full buffers}) of every collective,
  a combined one (XLA's GPU compiler joins many into one tuple) by each of
  its arrays' element types."""
  for comp, insts in prog.comps.items():
    if loops_only and comp not in prog.in_loop:
      continue
    for _, shape, op, rest in insts:
      kind = op[: -len("-start")] if op.endswith("-start") else op
      if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"  # XLA TPU's: an all-reduce fused with a slice.
      if kind in COLLECTIVES:
        yield prog.weight.get(comp, 0.0), kind, _buffer_bytes(
            prog, kind, op, shape, rest
        )


def _buffer_bytes(
    prog: Program, kind: str, op: str, shape: str, rest: str
) -> dict[str, float]:
  """{dtype: bytes} of a collective's full buffers (see the module doc)."""
  arrays = _arrays(shape)
  if kind == "reduce-scatter" and op != "all-reduce":
    arrays = [a for s in prog.operand_shapes(rest) for a in _arrays(s)]
  elif op.endswith("-start") and kind != "all-reduce":
    # ((operands), (results)) plus context scalars: the results.
    arrays = [a for a in arrays if a[1]]
    arrays = arrays[len(arrays) // 2 :]
  by = collections.defaultdict(float)
  for t, dims in arrays:
    by[t] += _ITEMSIZE[t] * math.prod(dims)
  return by


def collective_bytes_by_dtype(hlo_text: str) -> dict[str, dict[str, float]]:
  """Loop-weighted bytes per collective kind and element type, e.g.
  {"all-gather": {"bf16": ...}}: which collectives move float32."""
  out: dict[str, dict[str, float]] = {}
  for w, kind, by in _collectives(Program(hlo_text)):
    for t, nbytes in by.items():
      out.setdefault(kind, {})
      out[kind][t] = out[kind].get(t, 0.0) + w * nbytes
  return out


def collective_bytes(hlo_text: str) -> dict:
  """Loop-weighted bytes per collective kind and their 'total'; 'count'
  (loop-weighted) per kind; 'in_loops': loop-weighted bytes of the
  collectives inside while loops that move more than scalars."""
  prog = Program(hlo_text)
  out = {k: 0.0 for k in COLLECTIVES}
  count = {k: 0.0 for k in COLLECTIVES}
  for w, kind, by in _collectives(prog):
    out[kind] += w * sum(by.values())
    count[kind] += w
  out["total"] = sum(out[k] for k in COLLECTIVES)
  out["count"] = count
  out["in_loops"] = sum(
      w * sum(b.values())
      for w, _, b in _collectives(prog, True)
      if sum(b.values()) > SCALAR_BYTES
  )
  out["unknown_loops"] = prog.unknown_loops
  return out


def _dims(rest: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r"=\{([0-9,]*)\}", rest)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def matmul_flops(hlo_text: str, loop_weighted: bool = True) -> float:
  """Loop-weighted 2 x multiply-adds of every dot and convolution
  (loop_weighted=False: each loop body once, as cost_analysis counts)."""
  prog = Program(hlo_text)
  total = 0.0
  for w, _, shape, op, rest in prog.instructions():
    if op not in ("dot", "convolution") or not w:
      continue
    out = _arrays(shape)
    if not out:
      continue
    operands = [_arrays(s) for s in prog.operand_shapes(rest)]
    if op == "dot":
      lhs = operands[0] if operands else []
      contract = (
          math.prod(lhs[0][1][d] for d in _dims(rest, "lhs_contracting_dims"))
          if lhs
          else 1
      )
    else:
      contract = _conv_contract(rest, operands)
    total += (w if loop_weighted else 1) * 2 * math.prod(out[0][1]) * contract
  return total


def _conv_contract(rest: str, operands) -> int:
  """Multiply-adds per output element of a convolution: the kernel's input
  features x, per spatial dimension, the window positions that can meet
  the input (min(window, input size): a dot written as a convolution, as
  XLA's TPU compiler writes a batched one, pads a size-1 input to the
  window and meets it once; one with lhs_dilate meets window / dilate
  input elements)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->", rest)
  if not labels or len(operands) < 2 or not operands[0] or not operands[1]:
    return 1
  lhs_l, rhs_l = labels.groups()
  lhs, rhs = operands[0][0][1], operands[1][0][1]
  dilate = re.search(r"lhs_dilate=([0-9x]+)", rest)
  dilate = [int(d) for d in dilate.group(1).split("x")] if dilate else []
  contract = rhs[rhs_l.index("i")]
  for k, label in enumerate(rhs_l):
    if label.isdigit():
      d = dilate[int(label)] if int(label) < len(dilate) else 1
      contract *= min(rhs[k], lhs[lhs_l.index(label)], -(-rhs[k] // d))
  return contract


def summary(compiled) -> dict:
  """Collective bytes by kind, matmul FLOPs and memory of a compiled step."""
  text = compiled.as_text()
  coll = collective_bytes(text)
  return {
      "collective_bytes": {k: coll[k] for k in (*COLLECTIVES, "total")},
      "collective_count": coll["count"],
      "collective_bytes_in_loops": coll["in_loops"],
      "unknown_loops": coll["unknown_loops"],
      "matmul_flops": matmul_flops(text),
      "memory_bytes": memory_bytes(compiled),
  }


def memory_bytes(compiled) -> dict:
  """XLA's buffer assignment per device (any backend): arguments, outputs,
  aliased, temporaries, and total = argument + output - alias + temp."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
      for k in ("argument", "output", "alias", "temp")
  }
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out
