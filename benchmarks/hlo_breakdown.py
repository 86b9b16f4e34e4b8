"""What a compiled step's operations are for, from its optimized HLO text.

Every instruction carries the Python stack that traced it (`stack_frame_id`); the innermost
frame in this project's code says which part of the model or step it belongs to (PARTS:
weight matmuls, attention, norms, ...; a backward op is charged to the forward code it
differentiates). Used two ways:

- `static_costs`: FLOPs (dots and convolutions, from their shapes) and bytes (operands and
  result of every unfused instruction), loop bodies times their trip counts: any backend's
  program, e.g. one compiled for TPU on this machine.
- `trace_times`: the busy time of each executed operation in a jax.profiler trace of a CPU run
  (XLA's per-thunk events), by part, and how many CPU threads were busy meanwhile.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re

PARTS = ("weight matmuls", "attention", "norms", "GELU", "bias + residual", "patches",
         "masking + packing", "losses", "optimizer", "layout copies", "other")
# attention: its score and value products, softmax and mask; layout copies: copies and
# transposes alone (and a scan's stacking); other: what no frame of ours names.
# Innermost function of this project -> part (non-matmul work of a matmul's function: "bias").
FUNCTIONS = {
    "LayerNorm.__call__": "norms", "layer_norm": "norms", "_layer_norm_fwd": "norms",
    "_layer_norm_bwd": "norms", "dense_attention": "attention",
    "chunked_attention": "attention", "segmented_attention": "attention",
    "cudnn_attention": "attention", "Mlp.__call__": "GELU", "Dense.__call__": "bias + residual",
    "Attention.__call__": "bias + residual", "Block.forward": "bias + residual",
    "project_patches": "patches", "patchify_video": "patches", "audio_image": "patches",
    "mean_pool": "losses", "patch_kernel_for": "patches",
    "run_blocks": "layout copies",  # a scan's stacked weights and per-layer buffers
    "AVSiam.decode": "masking + packing",  # mask tokens in, tokens back in their order
}
FILES = {"masking.py": "masking + packing", "packing.py": "masking + packing",
         "losses.py": "losses", "optim.py": "optimizer", "optax": "optimizer",
         "accumulation.py": "masking + packing"}
MATMUL_FUNCTIONS = ("Dense.__call__", "Attention.__call__", "project_patches")
MOVES = {"copy", "transpose", "bitcast", "reshape", "broadcast", "parameter", "constant",
         "slice", "concatenate", "pad", "dynamic-slice", "dynamic-update-slice", "tuple",
         "get-tuple-element"}
NOT_WORK = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_NUMPY = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  op: str
  rest: str
  computation: str


def _bytes(shape_text: str) -> int:
  return sum(_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _SHAPE.findall(shape_text))


class Module:
  """An optimized HLO module's text: computations, instructions and source frames."""

  def __init__(self, text: str):
    self.comps: dict[str, list[Instr]] = {}
    self.instr: dict[str, Instr] = {}
    self.entry = None
    current = None
    for line in text.splitlines():
      head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
      if head and not line.startswith(" "):
        current = head.group(2)
        self.comps[current] = []
        if head.group(1):
          self.entry = current
        continue
      m = _INSTR.match(line) if current else None
      if m:
        ins = Instr(m.group(1), m.group(2), m.group(3), m.group(4), current)
        self.comps[current].append(ins)
        self.instr[ins.name] = ins
      if line.startswith("}"):
        current = None
    self._frames(text)

  def _frames(self, text: str) -> None:
    def table(title):
      block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z|\n(?=[A-Z]\w+\n))", text, re.M | re.S)
      return block.group(1).splitlines() if block else []
    files = {int(i): f.strip('"') for i, f in (l.split(" ", 1) for l in table("FileNames"))}
    funcs = {int(i): f.strip('"') for i, f in (l.split(" ", 1) for l in table("FunctionNames"))}
    locs, frames = {}, {}
    for line in table("FileLocations"):
      i, body = line.split(" ", 1)
      f = re.search(r"file_name_id=(\d+)", body)
      g = re.search(r"function_name_id=(\d+)", body)
      locs[int(i)] = (files.get(int(f.group(1)), "") if f else "",
                      funcs.get(int(g.group(1)), "") if g else "")
    for line in table("StackFrames"):
      i, body = line.split(" ", 1)
      loc = re.search(r"file_location_id=(\d+)", body)
      parent = re.search(r"parent_frame_id=(\d+)", body)
      frames[int(i)] = (locs.get(int(loc.group(1)), ("", "")) if loc else ("", ""),
                        int(parent.group(1)) if parent else 0)
    self.frames = frames

  def stack(self, ins: Instr) -> list[tuple[str, str]]:
    """(file, function) from the innermost frame out."""
    m = re.search(r"stack_frame_id=(\d+)", ins.rest)
    out, fid, seen = [], int(m.group(1)) if m else 0, set()
    while fid and fid in self.frames and fid not in seen:
      seen.add(fid)
      loc, parent = self.frames[fid]
      out.append(loc)
      fid = parent
    return out

  def called(self, ins: Instr) -> list[str]:
    return re.findall(r"(?:calls|body|to_apply|branch_computations)=\{?%?([\w.\-]+)", ins.rest)

  def fused(self, ins: Instr) -> list[Instr]:
    """The instructions a fusion computes (itself otherwise)."""
    if ins.op != "fusion":
      return [ins]
    return [i for c in self.called(ins) for i in self.comps.get(c, [])]


def frame_part(module: Module, ins: Instr) -> str | None:
  for path, func in module.stack(ins):
    if "/avsiam_jax/" not in path and "/optax/" not in path:
      continue
    for key, part in FILES.items():
      if path.endswith(key) or f"/{key}/" in path:
        return part
    short = func.split(".<locals>")[0]
    if short in FUNCTIONS:
      if ins.op in ("dot", "convolution") and short in MATMUL_FUNCTIONS:
        return "weight matmuls"
      return FUNCTIONS[short]
  return None


def part_of(module: Module, ins: Instr) -> str:
  """PARTS entry of an unfused instruction (a fusion: by what it computes)."""
  body = module.fused(ins)
  dots = [i for i in body if i.op in ("dot", "convolution")]
  if dots:
    return frame_part(module, dots[0]) or frame_part(module, ins) or "weight matmuls"
  own = frame_part(module, ins)
  if own in ("masking + packing", "optimizer", "losses"):
    return own
  if all(i.op in MOVES for i in body) and any(i.op in ("copy", "transpose") for i in body):
    return "layout copies"
  votes = collections.Counter(p for p in (frame_part(module, i) for i in body
                                          if i.op not in MOVES) if p)
  return votes.most_common(1)[0][0] if votes else (own or "other")


def _dims(module: Module, name: str) -> list[int]:
  ins = module.instr.get(name)
  shape = _SHAPE.findall(ins.shape) if ins else []
  return [int(d) for d in shape[0][1].split(",") if d] if shape else []


def dot_flops(module: Module, ins: Instr) -> float:
  """2 x output elements x the contracted size, of a dot or a 1x1 convolution (TPU programs
  express matmuls as convolutions: the contracted size is the kernel's but its output
  features); NaN for a convolution with a window (a TPU program's batched matmuls: their
  batch dimensions become windows, dilated and padded, not read here)."""
  out = _SHAPE.findall(ins.shape)
  if not out or ins.op not in ("dot", "convolution"):
    return 0.0
  n_out = math.prod(int(d) for d in out[0][1].split(",") if d)
  operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")", 1)[0])
  if ins.op == "convolution":
    window = re.search(r"window=\{size=([\dx]+)", ins.rest)
    if window and any(int(w) != 1 for w in window.group(1).split("x")):
      return float("nan")
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.rest)
    kernel = _dims(module, operands[1]) if len(operands) > 1 else []
    if not labels or len(labels.group(1)) != len(kernel):
      raise ValueError(f"convolution {ins.name}: kernel layout not understood")
    return 2.0 * n_out * math.prod(n for n, l in zip(kernel, labels.group(1)) if l != "o")
  lhs = _dims(module, operands[0]) if operands else []
  contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
  k = math.prod(lhs[int(c)] for c in contract.group(1).split(",") if c) if contract else 1
  return 2.0 * n_out * k


def _trip_count(ins: Instr) -> int:
  m = re.search(r'known_trip_count":\{"n":"(\d+)"', ins.rest)
  return int(m.group(1)) if m else 1


def as_module(program: "Module | str") -> Module:
  """A program's Module, parsed from its HLO text unless it is one already."""
  return program if isinstance(program, Module) else Module(program)


def _executed(module: Module, comp: str = "", times: int = 1):
  """(unfused instruction, runs per run of the entry) of every instruction that does work."""
  for ins in module.comps.get(comp or module.entry, []):
    if ins.op == "while":
      body = re.search(r"body=%?([\w.\-]+)", ins.rest)
      if body:
        yield from _executed(module, body.group(1), times * _trip_count(ins))
      continue
    if ins.op in ("call", "conditional", "async-start"):
      for c in module.called(ins):
        yield from _executed(module, c, times)
      continue
    if ins.op not in NOT_WORK:
      yield ins, times


def _operands(ins: Instr) -> list[str]:
  return re.findall(r"%([\w.\-]+)", ins.rest.split("), ", 1)[0])


def static_costs(program: "Module | str") -> dict[str, dict[str, float]]:
  """{part: {"flops", "bytes"}} of one run of the program's entry computation."""
  module = as_module(program)
  out = collections.defaultdict(lambda: {"flops": 0.0, "bytes": 0.0})
  for ins, times in _executed(module):
    part = part_of(module, ins)
    moved = _bytes(ins.shape) + sum(_bytes(module.instr[o].shape) for o in _operands(ins)
                                    if o in module.instr)
    out[part]["bytes"] += times * moved
    out[part]["flops"] += times * sum(dot_flops(module, i) for i in module.fused(ins))
  return dict(out)


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot's operand dtype (numpy's name), shapes and dimension numbers, as
  jax.lax.dot_general takes them."""
  part: str
  dtype: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]

  @property
  def flops(self) -> int:
    shared = math.prod(self.lhs[i] for i in self.contracting[0] + self.batch[0])
    return 2 * math.prod(self.lhs) * math.prod(self.rhs) // shared


def dots(program: "Module | str") -> collections.Counter:
  """{Dot: runs per run of the entry} of every dot the program executes (fused ones too)."""
  module = as_module(program)
  out = collections.Counter()
  dims = lambda key, ins: tuple(int(d) for d in re.search(
      key + r"=\{([\d,]*)\}", ins.rest).group(1).split(",") if d) if key in ins.rest else ()
  for ins, times in _executed(module):
    for dot in (i for i in module.fused(ins) if i.op == "dot"):
      names = _operands(dot)[:2]
      lhs, rhs = (_dims(module, o) for o in names)
      dtype = _SHAPE.findall(module.instr[names[0]].shape)[0][0]
      out[Dot(part_of(module, ins), _NUMPY.get(dtype, dtype), tuple(lhs), tuple(rhs),
              (dims("lhs_contracting_dims", dot), dims("rhs_contracting_dims", dot)),
              (dims("lhs_batch_dims", dot), dims("rhs_batch_dims", dot)))] += times
  return out


def trace_times(trace_dir: str, program: "Module | str"
                ) -> tuple[dict[str, float], dict[int, float]]:
  """({part: busy thread-seconds}, {busy threads: seconds}) of the XLA CPU thunk events in the
  newest jax.profiler trace under trace_dir, for `program` (its Module or HLO text)."""
  import jax  # only here: the static costs need no JAX
  module = as_module(program)
  part = {}  # per instruction: a step runs each many times
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  parts, spans = collections.Counter(), []
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:
        continue
      events = [(e.start_ns, e.end_ns, e.name) for e in line.events
                if e.name in module.instr and module.instr[e.name].op != "while"]
      for s, e, name in events:
        if name not in part:
          part[name] = part_of(module, module.instr[name])
        parts[part[name]] += (e - s) / 1e9
      spans.append(events)
  edges = sorted((t, d) for events in spans for s, e, _ in events for t, d in ((s, 1), (e, -1)))
  busy, level, last = collections.Counter(), 0, edges[0][0] if edges else 0
  for t, d in edges:
    busy[level] += (t - last) / 1e9
    level, last = level + d, t
  return dict(parts), dict(busy)
