"""JAX against PyTorch on the same network, side by side in one process: embedding, train step, memory.

  python -m bench.vs_torch                      # RN50 at 288x144 (make bench-torch), BENCHMARKS.md
  python -m bench.vs_torch --sizes=2x4 --embed_batch=16 --dtypes=float32 --rounds=2 --no_write
  python -m bench.vs_torch --model=tiny --height=32 --width=16 --embed_batch=4 --sizes=2x2 \
      --rounds=1 --dtypes=float32 --no_memory --no_write         # seconds: what the test runs

The PyTorch side (bench/torch_peer.py) is OpenAI's clip/model.py ModifiedResNet with EEES's
changes (second stem for infrared, last stride 1, resized positional embedding), the GeM + BNNeck
and attention-pool heads, identity + WRT triplet losses and torch.optim.Adam: what a PyTorch VI-ReID
code base runs. The JAX side is the project's model through its one construction path
(eees_jax.experiment) and the trainer's own step (`train.train_step`, description terms off, donated
state) and test-time feature (`embedding.test_feature_fn`). Both hold the same random weights: the
peer's state dict goes through the project's converter (eees_jax.weights). Before timing, the two
must compute the same function: test-time features of the same images (eval mode) within
--tolerance, and the first train step's loss on the same batch.

Cases: the test-time feature with the mirrored copy (--embed_batch images, half of them infrared)
and the train step at each --sizes P x K (3PK images: V, Vc and R), in each of --dtypes (bfloat16:
the project's compute dtype option in JAX, CPU/CUDA autocast in PyTorch). Per case both are built,
warmed up once, then timed for --rounds rounds, the frameworks alternating (the first one swaps each
round), so both see the same load; medians are reported. Peak memory of each framework is measured
in child processes that do one thing each (build, warm up, one timed call): the peak resident set on
a CPU (by default for the embedding in float32 and the first --sizes step in each dtype); on a GPU,
each framework's peak device memory in the timing process.

PyTorch's allocator (CPU): "shipped" is glibc malloc, what `pip install torch` gives. "jemalloc"
preloads libjemalloc (LD_PRELOAD) with the settings of PyTorch's CPU performance guide; an allocator
is chosen when a process starts, so those runs (by default the first --sizes step in each dtype)
are child processes started once per round in the same alternation (their time is their own timed
call, after their own warm-up). Without libjemalloc
the column says so (Debian/Ubuntu: `apt install libjemalloc2`).
"""
from __future__ import annotations

import argparse
import copy
import ctypes.util
import glob
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

MODELS = {  # ModifiedResNet sizes: CLIP RN50 and a tiny one for tests
    "rn50": dict(layers=(3, 4, 6, 3), width=64, output_dim=1024, pos_grid=7),
    "tiny": dict(layers=(1, 1, 1, 1), width=16, output_dim=64, pos_grid=2),
}
NUM_CLASSES = 395  # SYSU-MM01's training identities
# PyTorch's CPU performance tuning guide: jemalloc keeping freed pages for reuse.
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000")


# ---------------------------------------------------------------------------------------------
# Set-up shared by the parent and the child processes.
# ---------------------------------------------------------------------------------------------

def device_kind() -> str:
  """'gpu' when JAX runs on a GPU (then PyTorch runs on CUDA too), else 'cpu'."""
  import jax  # pylint: disable=g-import-not-at-top
  return "gpu" if jax.default_backend() == "gpu" else "cpu"


def torch_device() -> str:
  import torch  # pylint: disable=g-import-not-at-top
  if device_kind() == "gpu":
    if not torch.cuda.is_available():
      raise SystemExit("JAX runs on a GPU but this PyTorch has no CUDA: install a CUDA build of "
                       "torch, or run both on the CPU (JAX_PLATFORMS=cpu)")
    # JAX's default float32 precision on GPUs is TF32 for matmuls and convolutions; PyTorch's
    # default is TF32 for convolutions only. Same arithmetic for both.
    torch.backends.cuda.matmul.allow_tf32 = True
    # XLA autotunes its convolutions while compiling; cuDNN's counterpart (first calls of a
    # shape, inside the warm-up).
    torch.backends.cudnn.benchmark = True
    return "cuda"
  return "cpu"


def build_peer(model: str, seed: int = 0):
  """(PyTorch peer with random weights, Flax vision config, Flax EEES variables of the same weights)."""
  from bench import torch_peer  # pylint: disable=g-import-not-at-top
  size = MODELS[model]
  peer = torch_peer.TorchEEES(heads=32 * size["width"] // 64, last_stride=1,
                              num_classes=NUM_CLASSES, **size)
  torch_peer.randomize_(peer, seed)
  vision, variables = torch_peer.to_flax_variables(peer)
  return peer, vision, variables


def jax_config(vision: dict, height: int, width: int, P: int, K: int, dtype: str,
               remat: tuple[str, ...] | None):
  """The project's base config (RN50 recipe) with the peer's tower, identity + triplet only."""
  from configs import common  # pylint: disable=g-import-not-at-top
  cfg = common.base_config()
  for key in ("layers", "width", "output_dim", "heads", "pos_grid"):
    cfg.model.vision[key] = tuple(vision[key]) if key == "layers" else vision[key]
  if remat is not None:
    cfg.model.vision.remat = tuple(remat)
  cfg.model.text.embed_dim = vision["output_dim"]  # the description features' width
  cfg.model.dtype = dtype
  cfg.input.update(height=height, width=width, P=P, K=K)
  cfg.optim.warmup_epochs = 0  # the peer's Adam runs at the constant base learning rate
  for term in ("ese", "cvsc", "cmsp"):
    cfg.loss[term].enabled = False
  return cfg


def _images(n: int, height: int, width: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


class _Case:
  """One timed task of one framework: warmup() -> its first result, run() -> one timed call."""
  images: int

  def warmup(self):
    return self.run()


class JaxEmbed(_Case):
  def __init__(self, vision, variables, args, batch: int, dtype: str):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from eees_jax import embedding, experiment, xla_cpu  # pylint: disable=g-import-not-at-top
    cfg = jax_config(vision, args.height, args.width, 1, 1, dtype, args.remat)
    model = experiment.build_model(experiment.model_spec(cfg, NUM_CLASSES, pretrained=None))
    self._vars = jax.device_put(jax.tree.map(jnp.asarray, variables))
    self._x = jax.device_put(_images(batch, args.height, args.width, 1))
    self._m = jax.device_put(np.arange(batch, dtype=np.int32) % 2)
    t = time.perf_counter()
    fn = embedding.test_feature_fn(model.eees, flip=True,  # as evaluation and inference run it
                                   compiler_options=xla_cpu.compiler_options())
    self._fn = self.compiled = fn.lower(
        self._vars, self._x, self._m).compile()
    self.compile_s = time.perf_counter() - t
    self.images = batch

  def run(self):
    return self._fn(self._vars, self._x, self._m).block_until_ready()


class TorchEmbed(_Case):
  def __init__(self, peer, args, batch: int, dtype: str):
    import torch  # pylint: disable=g-import-not-at-top
    from bench import torch_peer  # pylint: disable=g-import-not-at-top
    self._dev = torch_device()
    self._peer = peer.to(self._dev).eval()
    self._bf16 = dtype == "bfloat16"
    self._x = torch.from_numpy(_images(batch, args.height, args.width, 1)).to(self._dev)
    self._m = torch.from_numpy(np.arange(batch) % 2).to(self._dev)
    self._norm = torch_peer.normalize
    self.images = batch

  def run(self):
    import torch  # pylint: disable=g-import-not-at-top
    with torch.inference_mode(), torch.autocast(self._dev, dtype=torch.bfloat16,
                                                enabled=self._bf16):
      out = self._peer.embed(self._norm(self._x), self._m).float()
    if self._dev == "cuda":
      torch.cuda.synchronize()
    return out


class JaxStep(_Case):
  def __init__(self, vision, variables, args, P: int, K: int, dtype: str):
    import jax  # pylint: disable=g-import-not-at-top
    from bench import train_step  # pylint: disable=g-import-not-at-top
    cfg = jax_config(vision, args.height, args.width, P, K, dtype, args.remat)
    donate = not getattr(args, "no_donate", False)
    self._step, self._state, self._batch, self._text, self.compile_s = train_step.build_step(
        cfg, P, K, NUM_CLASSES, variables=variables, donate=donate)
    self.compiled = self._step
    self._batch = dict(self._batch, images=jax.device_put(_step_images(P, K, args)))
    self.images = 3 * P * K

  def run(self):
    self._state, metrics = self._step(self._state, self._batch, self._text)
    self.grad_norm = float(metrics["grad_norm"])
    return float(metrics["loss/total"])


class TorchStep(_Case):
  def __init__(self, peer, args, P: int, K: int, dtype: str):
    import torch  # pylint: disable=g-import-not-at-top
    from bench import torch_peer  # pylint: disable=g-import-not-at-top
    self._dev = torch_device()
    from configs import common  # pylint: disable=g-import-not-at-top
    cfg = common.base_config()  # the JAX side's optimiser and loss weights (jax_config)
    self._peer = copy.deepcopy(peer).to(self._dev)
    self._step = torch_peer.TrainStep(
        self._peer, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        wrt_weight=cfg.loss.wrt.weight, bf16=dtype == "bfloat16", autocast_device=self._dev)
    labels = np.tile(np.repeat(np.arange(P), K), 3)
    self._x = torch.from_numpy(_step_images(P, K, args)).to(self._dev)
    self._y = torch.from_numpy(labels).long().to(self._dev)
    self._m = torch.from_numpy(np.repeat([0, 0, 1], P * K)).long().to(self._dev)
    self.images = 3 * P * K

  def run(self):
    return self._step(self._x, self._y, self._m)  # float(loss) waits for the step


def _step_images(P: int, K: int, args) -> np.ndarray:
  return _images(3 * P * K, args.height, args.width, 2)


def make_case(framework: str, task: tuple, dtype: str, args, peer, vision, variables) -> _Case:
  """task: ('embed', batch) or ('step', P, K)."""
  if task[0] == "embed":
    return (JaxEmbed(vision, variables, args, task[1], dtype) if framework == "jax"
            else TorchEmbed(peer, args, task[1], dtype))
  return (JaxStep(vision, variables, args, task[1], task[2], dtype) if framework == "jax"
          else TorchStep(peer, args, task[1], task[2], dtype))


def peak_memory_gib() -> float:
  """Peak device memory on a GPU (both frameworks' counters, the larger), else the process's peak
  resident set: VmHWM, the high-water mark of this address space, which is ru_maxrss without what
  Linux carries over from the parent's address space at exec (a child of a large parent would
  report at least the parent's size)."""
  if device_kind() == "gpu":
    import jax  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    stats = jax.devices()[0].memory_stats() or {}
    return max(stats.get("peak_bytes_in_use", 0), torch.cuda.max_memory_allocated()) / 2 ** 30
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 2 ** 20  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ---------------------------------------------------------------------------------------------
# Child processes: one framework, one case; peak memory (and the time of its timed call).
# ---------------------------------------------------------------------------------------------

def run_child(args) -> None:
  """--child: one framework, the tasks of --child_task (comma-separated) one after the other; prints
  a JSON list, per task: its timed calls' seconds, the process's peak memory so far, the first
  call's loss (train step); with --child_save, each task's first output goes to
  <child_save>_<task>.npy (features, or the first step's loss and gradient norm)."""
  peer, vision, variables = build_peer(args.model)
  results = []
  for name in args.child_task.split(","):
    task = _parse_task(name)
    case = make_case(args.child, task, args.child_dtype, args, peer, vision, variables)
    outputs = [case.warmup()]
    grad_norm = getattr(case, "grad_norm", float("nan"))  # of the first step (JAX)
    times = []
    for _ in range(args.calls):
      t = time.perf_counter()
      outputs.append(case.run())
      times.append(time.perf_counter() - t)
    if args.child_save:
      keep = (np.asarray([outputs[0], grad_norm]) if task[0] == "step"
              else np.asarray(outputs[0], np.float32))
      np.save(f"{args.child_save}_{name}.npy", keep)
    results.append({"task": name, "seconds": times, "peak_gib": peak_memory_gib(),
                    "compile_s": getattr(case, "compile_s", None),
                    "hlo_sha1": _hlo_sha1(case),
                    "first_loss": outputs[0] if task[0] == "step" else None})
    del case, outputs
  print(json.dumps(results))


def _hlo_sha1(case: _Case) -> str | None:
  """Hash of a JAX case's optimised HLO (module name left out): equal hashes, same program."""
  compiled = getattr(case, "compiled", None)
  if compiled is None:
    return None
  import hashlib  # pylint: disable=g-import-not-at-top
  text = re.sub(r"^HloModule \S+", "", compiled.as_text(), flags=re.M)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def jemalloc_path() -> str | None:
  """libjemalloc's path, or None when it is not installed."""
  name = ctypes.util.find_library("jemalloc")
  candidates = ([name] if name and os.path.isabs(name) else []) + sorted(
      glob.glob("/usr/lib/*/libjemalloc.so*") + glob.glob("/usr/lib/libjemalloc.so*")
      + glob.glob("/usr/local/lib/libjemalloc.so*"))
  return candidates[0] if candidates else None


def child_env(allocator: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  if allocator == "jemalloc":
    path = jemalloc_path()
    if path is None:
      raise RuntimeError("libjemalloc is not installed")
    env.update(LD_PRELOAD=path, MALLOC_CONF=JEMALLOC_CONF)
  return env


def spawn(framework: str, tasks: str, dtype: str, args, allocator: str = "shipped",
          env: dict[str, str] | None = None, remat: list[str] | None = None,
          save: str | None = None) -> list[dict]:
  """Runs a --child process (tasks: comma-separated task names) and returns its JSON list. env
  adds variables (e.g. XLA_FLAGS); remat overrides --remat."""
  remat = args.remat if remat is None else remat
  cmd = [sys.executable, "-m", "bench.vs_torch", f"--child={framework}", f"--child_task={tasks}",
         f"--child_dtype={dtype}", f"--model={args.model}", f"--height={args.height}",
         f"--width={args.width}", f"--calls={getattr(args, 'child_calls', 1)}"]
  if remat is not None:
    cmd.append(f"--remat={','.join(remat)}")
  if getattr(args, "no_donate", False):
    cmd.append("--no_donate")
  if save:
    cmd.append(f"--child_save={save}")
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        env={**child_env(allocator), **(env or {})},
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The parent: parity, alternating timings, memory children, the report.
# ---------------------------------------------------------------------------------------------

def _parse_task(name: str) -> tuple:
  m = re.fullmatch(r"embed(\d+)|step(\d+)x(\d+)", name)
  if m is None:
    raise ValueError(f"task {name!r}: expected embed<B> or step<P>x<K>")
  return ("embed", int(m.group(1))) if m.group(1) else ("step", int(m.group(2)), int(m.group(3)))


def _task_name(task: tuple) -> str:
  return f"embed{task[1]}" if task[0] == "embed" else f"step{task[1]}x{task[2]}"


def _task_label(task: tuple) -> str:
  if task[0] == "embed":
    return f"embedding, batch {task[1]} + mirrored copy"
  return f"train step P={task[1]} K={task[2]} ({3 * task[1] * task[2]} images)"


def parity_jax_case(vision, variables, args) -> _Case:
  """The JAX side of check_parity: float32 features of 4 images, compiled at full float32
  precision (no TF32 on a GPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("float32"):
    return JaxEmbed(vision, variables, args, 4, "float32")


def check_parity(peer, vision, variables, args,
                 jax_case: _Case | None = None) -> tuple[float, float]:
  """(max |difference| of both frameworks' test-time features of the same 4 images, eval mode,
  full float32 arithmetic (no TF32 on a GPU); max |difference| between two images' features, the
  scale the first must be far below). Raises when the first is over --tolerance."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_case = TorchEmbed(peer, args, 4, "float32")  # sets the GPU's TF32 defaults
  tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    jax_case = jax_case or parity_jax_case(vision, variables, args)
    a = np.asarray(jax_case.run(), np.float64)
    b = torch_case.run().cpu().numpy().astype(np.float64)
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
  if a.shape != b.shape:
    raise SystemExit(f"feature shapes differ: JAX {a.shape}, PyTorch {b.shape}")
  diff = float(np.abs(a - b).max())
  spread = float(np.abs(a[:, None, :] - a[None, :, :]).max())
  if not diff <= args.tolerance:
    raise SystemExit(f"the two models do not compute the same function: test-time features "
                     f"differ by up to {diff:.3g} (> --tolerance={args.tolerance:g})")
  return diff, spread


def time_case(task: tuple, dtype: str, args, peer, vision, variables, tuned: bool,
              jax_case: _Case | None = None) -> dict:
  """Builds both (or takes the JAX side prebuilt), warms up, then --rounds alternating rounds; per
  round also one jemalloc child when `tuned`. Returns the case's figures; on a GPU with each
  framework's device memory: PyTorch's peak over the timed calls (after the warm-up, whose cuDNN
  autotuning tries large workspaces), JAX's the compiled program's arguments, outputs and
  temporaries (XLA's allocator keeps one process-wide peak, autotuning included)."""
  gpu = device_kind() == "gpu"
  cases = {"jax": jax_case or make_case("jax", task, dtype, args, peer, vision, variables),
           "torch": make_case("torch", task, dtype, args, peer, vision, variables)}
  first = {name: case.warmup() for name, case in cases.items()}
  if gpu:
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.reset_peak_memory_stats()
  times = {name: [] for name in cases}
  tuned_runs = []
  for r in range(args.rounds):
    order = list(cases) if r % 2 == 0 else list(reversed(list(cases)))
    for name in order:
      for _ in range(args.calls):
        t = time.perf_counter()
        cases[name].run()
        times[name].append(time.perf_counter() - t)
    if tuned:
      tuned_runs.append(spawn("torch", _task_name(task), dtype, args, "jemalloc")[0])
    print(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3g} s" for n in cases)
          + (f", torch+jemalloc {tuned_runs[-1]['seconds'][-1]:.3g} s" if tuned else ""),
          flush=True)
  n = cases["jax"].images
  out = {"task": task, "dtype": dtype, "images": n,
         "jax_s": statistics.median(times["jax"]), "torch_s": statistics.median(times["torch"]),
         "jax_times": times["jax"], "torch_times": times["torch"]}
  if task[0] == "step":
    out["loss_jax"], out["loss_torch"] = first["jax"], first["torch"]
  if tuned:
    out["tuned_s"] = statistics.median(r["seconds"][-1] for r in tuned_runs)
    out["tuned_peak_gib"] = max(r["peak_gib"] for r in tuned_runs)
  out["jax_compile_s"] = getattr(cases["jax"], "compile_s", None)
  if gpu:
    ma = cases["jax"].compiled.memory_analysis()
    out["jax_peak_gib"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                           - ma.alias_size_in_bytes + ma.temp_size_in_bytes) / 2 ** 30
    out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
  del cases
  return out


def precompile(keys: list[tuple], args, vision, variables) -> dict:
  """The JAX side of every (task, dtype), and under the key "parity" check_parity's, compiled in
  parallel threads (XLA releases the GIL)."""
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  with ThreadPoolExecutor(max_workers=len(keys) + 1) as pool:
    futures = {k: pool.submit(make_case, "jax", k[0], k[1], args, None, vision, variables)
               for k in keys}
    futures["parity"] = pool.submit(parity_jax_case, vision, variables, args)
    built = {k: f.result() for k, f in futures.items()}
  print(f"compiled {len(keys)} JAX programs in {time.perf_counter() - t:.0f} s", flush=True)
  return built


def _xla_options() -> str:
  from eees_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  opts = xla_cpu.compiler_options()
  return json.dumps(opts) if opts else "none (jaxlib's defaults)"


def _load(values) -> str:
  return " ".join(f"{v:.2f}" for v in values)


def _fmt(x: float | None, spec: str = ".3g") -> str:
  return "-" if x is None else format(x, spec)


def machine_line() -> str:
  from bench._report import machine_description  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  extra = f"jax {jax.__version__}, torch {torch.__version__}"
  if device_kind() == "cpu":
    extra += f" ({torch.get_num_threads()} intra-op threads)"
  return f"{machine_description()}; {extra}; Python {platform.python_version()}"


def report(args, rows: list[dict], memory: dict, parity: tuple, load: tuple, allocator: str,
           command: str) -> str:
  gpu = device_kind() == "gpu"
  has_tuned = any("tuned_s" in r for r in rows)
  lines = [f"## JAX against PyTorch{' (GPU)' if gpu else ''}: RN50 model of EEES, side by side"
           if args.model == "rn50" else f"## JAX against PyTorch: {args.model} model", "",
           f"Command: `{command}`  ",
           f"Machine: {machine_line()}  ",
           f"Load average (1, 5, 15 min) before: {_load(load[0])}; after: {_load(load[1])}"
           + ("" if gpu else f" ({os.cpu_count()} cores, shared with other jobs when above 0)")
           + "  ",
           f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '') or '(none)'}`; the project's XLA:CPU "
           f"compile options (eees_jax/xla_cpu.py): `{_xla_options()}`; JAX remat: "
           f"{','.join(args.remat) if args.remat else 'off'}; donated train state: "
           f"{'no' if getattr(args, 'no_donate', False) else 'yes'}", "",
           f"Same random weights in both (the PyTorch state dict through eees_jax.weights); "
           f"input {args.height}x{args.width}; test-time features of the same 4 images agree to "
           f"{parity[0]:.2g} (max abs difference, float32, eval mode; features of two different "
           f"images differ by up to {parity[1]:.2g}). Each case: built, warmed up, "
           f"then {args.rounds} rounds of {args.calls} call(s) per framework, alternating; "
           "median seconds per call. Ratio = JAX images/s over PyTorch images/s (above 1: JAX "
           "faster). Train step: identity + WRT triplet on f and v, Adam, 3PK images (V, Vc, R); "
           "first-step losses on the same batch shown as JAX / PyTorch.", ""]
  cols = ["case", "dtype", "JAX images/s", "PyTorch images/s", "ratio"]
  if has_tuned:
    cols += ["PyTorch+jemalloc images/s", "ratio"]
  cols += ["first-step loss"]
  lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    jax_ips, torch_ips = r["images"] / r["jax_s"], r["images"] / r["torch_s"]
    cells = [_task_label(r["task"]), r["dtype"], f"{jax_ips:.3g}", f"{torch_ips:.3g}",
             f"{jax_ips / torch_ips:.2f}"]
    if has_tuned:
      tuned = r["images"] / r["tuned_s"] if "tuned_s" in r else None
      cells += [_fmt(tuned), _fmt(jax_ips / tuned if tuned else None, ".2f")]
    cells.append(f"{r['loss_jax']:.5g} / {r['loss_torch']:.5g}" if "loss_jax" in r else "-")
    lines.append("| " + " | ".join(cells) + " |")
  if gpu:
    memory = {(_task_name(r["task"]), r["dtype"]): {"jax": r["jax_peak_gib"],
                                                    "torch": r["torch_peak_gib"]}
              for r in rows if "jax_peak_gib" in r}
  if memory or has_tuned:
    if gpu:
      what = ("Memory: GPU memory of each case (GiB), in the timing process: PyTorch's peak "
              "over the timed calls (torch.cuda.max_memory_allocated, reset after the warm-up, "
              "whose cuDNN autotuning tries large workspaces); JAX's compiled program's "
              "arguments, outputs and temporaries (memory_analysis; XLA's allocator keeps only a "
              "process-wide peak, its autotuning included).")
    else:
      what = ("Memory: peak resident set (VmHWM, GiB) of a child process that builds one "
              "framework's case (both frameworks are imported in each: the weights come from the "
              "PyTorch peer), warms up and makes one timed call"
              + ("; PyTorch+jemalloc: the largest of its per-round children." if has_tuned
                 else "."))
    lines += ["", what, ""]
    mcols = ["case", "dtype", "JAX", "PyTorch", "JAX / PyTorch"]
    if has_tuned:
      mcols += ["PyTorch+jemalloc", "JAX / PyTorch+jemalloc"]
    lines += ["| " + " | ".join(mcols) + " |", "|" + "---|" * len(mcols)]
    for r in rows:
      m = memory.get((_task_name(r["task"]), r["dtype"]), {})
      if not m and "tuned_peak_gib" not in r:
        continue
      j, t, tu = m.get("jax"), m.get("torch"), r.get("tuned_peak_gib")
      cells = [_task_label(r["task"]), r["dtype"], _fmt(j, ".2f"), _fmt(t, ".2f"),
               _fmt(j / t if j and t else None, ".2f")]
      if has_tuned:
        cells += [_fmt(tu, ".2f"), _fmt(j / tu if j and tu else None, ".2f")]
      lines.append("| " + " | ".join(cells) + " |")
  if allocator:
    lines += ["", allocator]
  return "\n".join(lines)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    m = re.fullmatch(r"(\d+)x(\d+)", item)
    if m is None or int(m.group(1)) < 2 or int(m.group(2)) < 1:
      raise argparse.ArgumentTypeError(f"--sizes entries are PxK like 8x4 with P >= 2 (the "
                                       f"triplet needs negatives), got {item!r}")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def _parse_list(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=sorted(MODELS), default="rn50")
  p.add_argument("--height", type=int, default=288)
  p.add_argument("--width", type=int, default=144)
  p.add_argument("--embed_batch", type=int, default=64, help="0 skips the embedding case")
  p.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes("8x4,2x4"),
                 help="train-step batches P x K, comma-separated ('' skips the train step)")
  p.add_argument("--dtypes", type=_parse_list, default=["float32", "bfloat16"])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--calls", type=int, default=1, help="timed calls per framework per round")
  p.add_argument("--allocators", type=_parse_list, default=None,
                 help="PyTorch allocators on a CPU: shipped (always) and jemalloc (default: "
                      "when libjemalloc is installed)")
  p.add_argument("--jemalloc_cases", type=_parse_list, default=None,
                 help="<task>:<dtype> entries timed with PyTorch+jemalloc too (default: the first "
                      "--sizes step in every dtype)")
  p.add_argument("--no_memory", action="store_true", help="skip the peak-memory child processes")
  p.add_argument("--memory_cases", type=_parse_list, default=None,
                 help="<task>:<dtype> entries (embed64:float32, step8x4:bfloat16) to measure the "
                      "peak memory of (default: the embedding in float32 and the first --sizes "
                      "step in every dtype)")
  p.add_argument("--remat", type=_parse_list, default=None,
                 help="JAX: model.vision.remat stages (stem,layer1,...,layer4; default: the config's)")
  p.add_argument("--no_donate", action="store_true",
                 help="JAX: keep the old train state's buffers (the trainer donates them)")
  p.add_argument("--tolerance", type=float, default=1e-3,
                 help="largest allowed |difference| of the two models' test-time features")
  p.add_argument("--no_write", action="store_true", help="print only, leave BENCHMARKS.md alone")
  p.add_argument("--out", default=os.environ.get("OUT", ""),
                 help="also write the section's markdown to <out>/vs_torch_<device>.md (default: "
                      "$OUT when set)")
  p.add_argument("--section", default=None, help="BENCHMARKS.md section name (default: vs_torch, "
                                                 "vs_torch_gpu on a GPU)")
  p.add_argument("--child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--child_task", default=None, help=argparse.SUPPRESS)
  p.add_argument("--child_dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--child_save", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    run_child(args)
    return
  load_before = os.getloadavg()
  command = "python -m bench.vs_torch " + " ".join(sys.argv[1:] if argv is None else argv)
  gpu = device_kind() == "gpu"
  allocators = args.allocators
  if allocators is None:
    allocators = ["shipped"] + (["jemalloc"] if not gpu and jemalloc_path() else [])
  unknown = set(allocators) - {"shipped", "jemalloc"}
  if unknown:
    raise SystemExit(f"--allocators: unknown {sorted(unknown)}; choose from shipped, jemalloc")
  tuned = "jemalloc" in allocators and not gpu
  if tuned and jemalloc_path() is None:
    raise SystemExit("--allocators=jemalloc: libjemalloc is not installed (Debian/Ubuntu: "
                     "`apt install libjemalloc2`)")
  if gpu:
    note = "PyTorch on CUDA with its caching allocator; TF32 allowed in both (JAX's default)."
  elif tuned:
    note = (f"PyTorch+jemalloc: `LD_PRELOAD={jemalloc_path()} MALLOC_CONF={JEMALLOC_CONF}` (PyTorch's "
            "CPU tuning guide); the other PyTorch column uses glibc malloc as shipped.")
  else:
    note = ("PyTorch with glibc malloc as shipped; the jemalloc column was "
            + ("not asked for." if "jemalloc" not in allocators else "skipped: libjemalloc is not "
               "installed (`apt install libjemalloc2`)."))
  tasks = ([("embed", args.embed_batch)] if args.embed_batch else []) + [
      ("step", P, K) for P, K in args.sizes]
  peer, vision, variables = build_peer(args.model)
  prebuilt = {}
  if gpu:  # XLA's GPU compiles (autotuning included) take a minute or more one after the other
    prebuilt = precompile([(t, d) for d in args.dtypes for t in tasks], args, vision, variables)
  parity = check_parity(peer, vision, variables, args, prebuilt.pop("parity", None))
  print(f"test-time features agree to {parity[0]:.3g} (max abs difference; between images: "
        f"{parity[1]:.3g})", flush=True)
  rows, memory = [], {}
  first_step = ([f"step{args.sizes[0][0]}x{args.sizes[0][1]}:{d}" for d in args.dtypes]
                if args.sizes else [])
  want_memory = args.memory_cases
  if want_memory is None:
    want_memory = ([f"embed{args.embed_batch}:float32"] if args.embed_batch else []) + first_step
  want_memory = set(want_memory)
  want_tuned = set(first_step if args.jemalloc_cases is None else args.jemalloc_cases)

  def emit() -> str:
    md = report(args, rows, memory, parity, (load_before, os.getloadavg()), note, command)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, f"vs_torch_{'gpu' if gpu else 'cpu'}.md"), "w") as f:
        f.write(md + "\n")
    return md

  for dtype in args.dtypes:
    for task in tasks:
      print(f"{_task_label(task)}, {dtype}", flush=True)
      rows.append(time_case(task, dtype, args, peer, vision, variables,
                            tuned and f"{_task_name(task)}:{dtype}" in want_tuned,
                            jax_case=prebuilt.pop((task, dtype), None)))
      emit()  # partial results survive an interrupted run
  if not args.no_memory and not gpu:  # on a GPU each framework's peak is measured in-process
    for dtype in args.dtypes:
      for task in tasks:
        key = (_task_name(task), dtype)
        if f"{key[0]}:{key[1]}" not in want_memory:
          continue
        memory[key] = {fw: spawn(fw, key[0], dtype, args)[0]["peak_gib"] for fw in ("jax", "torch")}
        print(f"memory {key}: {memory[key]}", flush=True)
        emit()
  md = emit()
  print(md)
  if not args.no_write:
    from bench._report import write_section  # pylint: disable=g-import-not-at-top
    write_section(args.section or ("vs_torch_gpu" if gpu else "vs_torch"), md)


if __name__ == "__main__":
  main()
