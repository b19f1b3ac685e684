"""The data flow of the README, checked on the source: who may import whom.

Models import no data or checkpoint-conversion code, losses nothing of ours, evaluation and the
shared feature extraction no training code, and inference no training data code.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("eees_jax", "data_pipelines", "configs")


def _module_files() -> dict[str, str]:
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          out[module.removesuffix(".__init__")] = path
  return out


MODULES = _module_files()


def _imports(module: str, top_level_only: bool) -> set[str]:
  """Project modules that `module` imports (`from a import b` counts a.b when that is a module)."""
  tree = ast.parse(open(MODULES[module]).read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative import
        parts = module.split(".")
        base = ".".join(parts[:len(parts) - node.level] + [node.module])
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in MODULES:
        name = name.rpartition(".")[0]
      if name and name.split(".")[0] in PACKAGES:
        found.add(name)
        parent = name.rpartition(".")[0]  # importing a.b.c runs a/b/__init__.py too
        while parent:
          if parent in MODULES:
            found.add(parent)
          parent = parent.rpartition(".")[0]
  found.discard(module)
  return found


def _closure(roots, top_level_only: bool) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    module = todo.pop()
    for dep in _imports(module, top_level_only):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def _under(prefix: str) -> list[str]:
  return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


def test_the_graph_sees_real_imports():
  # Oracle: edges that the source plainly has, so a broken parser cannot pass the tests below.
  assert "eees_jax.models.towers" in _imports("eees_jax.models.eees", True)
  assert "eees_jax.weights.readers" in _imports("eees_jax.weights", True)
  assert "data_pipelines.datasets" in _closure(["eees_jax.train"], False)
  assert "eees_jax.weights" in _closure(["eees_jax.experiment"], True)


def test_models_import_no_data_checkpoint_or_training_code():
  deps = _closure(_under("eees_jax.models"), top_level_only=False)
  bad = {d for d in deps if d.startswith(("data_pipelines", "eees_jax.weights", "eees_jax.train",
                                           "eees_jax.experiment", "eees_jax.checkpoints",
                                           "eees_jax.inference", "eees_jax.evaluation"))}
  assert not bad, f"models/ imports {sorted(bad)}"
  assert deps <= set(_under("eees_jax.models")) | {"eees_jax"}


def test_losses_import_nothing_of_ours():
  deps = _closure(["eees_jax.losses"], top_level_only=False)
  assert deps <= {"eees_jax"}, f"losses imports {sorted(deps)}"


def test_evaluation_and_feature_extraction_import_no_training():
  training = {"eees_jax.train", "eees_jax.experiment", "eees_jax.text_features", "eees_jax.optim",
              "data_pipelines.sampler", "data_pipelines.descriptions"}
  for roots in (_under("eees_jax.evaluation"), ["eees_jax.embedding"]):
    deps = _closure(roots, top_level_only=True)
    assert not deps & training, f"{roots} imports {sorted(deps & training)}"


def test_inference_reads_no_training_data():
  deps = _closure(["eees_jax.inference"], top_level_only=True)
  forbidden = {"eees_jax.train", "eees_jax.text_features", "data_pipelines.datasets",
               "data_pipelines.descriptions", "data_pipelines.sampler", "data_pipelines.synthetic",
               "data_pipelines.sysu_mm01", "data_pipelines.regdb", "data_pipelines.llcm"}
  assert not deps & forbidden, f"inference imports {sorted(deps & forbidden)}"
  assert {"eees_jax.experiment", "eees_jax.checkpoints", "eees_jax.embedding"} <= deps


def test_search_serve_and_export_use_no_training_code():
  """They reach the model through inference (imported where a model is loaded), never training."""
  training = {"eees_jax.train", "eees_jax.experiment", "eees_jax.text_features", "eees_jax.optim",
              "data_pipelines.sampler", "data_pipelines.datasets", "data_pipelines.descriptions",
              "data_pipelines.synthetic"}
  for module in ("eees_jax.search", "eees_jax.serve", "eees_jax.export",
                 "eees_jax.evaluation.text_retrieval"):
    deps = _closure([module], top_level_only=True)
    assert not deps & training, f"{module} imports {sorted(deps & training)}"
  # The search kernel runs on a bare accelerator machine (bench/search_latency.py): jax and numpy.
  assert _closure(["eees_jax.exact_search"], top_level_only=False) <= {"eees_jax"}
