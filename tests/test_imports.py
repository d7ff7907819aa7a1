"""The package's import graph, read from the source (ast): no circles, even through imports
inside functions, and nothing inside kivfm imports the trainer except the entry points (`main`
runs it, `aot` compiles its step ahead of time)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'kivfm'


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
  """kivfm modules `path` imports anywhere in it; `import a.b.c` also imports packages a.b."""
  name = module_name(path)
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] +
                        ([base] if base else []))
      targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
    else:
      continue
    for target in targets:
      parts = target.split('.')
      for i in range(2, len(parts) + 1):   # the module and every package above it but kivfm
        candidate = '.'.join(parts[:i])
        # A package being imported is never an edge from its own submodules.
        if candidate in modules and candidate != name and not name.startswith(candidate + '.'):
          found.add(candidate)
  return found


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_graph_sees_the_imports():
  graph = import_graph()
  assert 'kivfm.train' in graph['kivfm.main']
  assert {'kivfm.teachers', 'kivfm.teachers.registry'} <= graph['kivfm.config']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_import_circles():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_only_the_entry_points_import_the_trainer():
  importers = sorted(name for name, deps in import_graph().items() if 'kivfm.train' in deps)
  assert importers == ['kivfm.aot', 'kivfm.main']
