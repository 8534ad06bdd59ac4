"""One import root: flux_parallel lives beside Hugging Face's `kernels` (a dependency of transformers 5),
transformers, diffusers and BFL's `flux`, from the repository root and from any other folder; and the
layering inside it runs one way (flux -> parallel -> vae / weights / kernels)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flux_parallel"

# Run in a fresh interpreter: everything a researcher's environment holds, imported in one process.
BESIDE = r'''
import sys
from pathlib import Path

import kernels, flux, torch, transformers, diffusers

assert getattr(flux, "STAND_IN_FOR_BFL", False), f"flux is not BFL's stand-in: {flux.__file__}"
assert hasattr(kernels, "get_kernel"), f"kernels is not Hugging Face's: {kernels.__file__}"
assert "flux_parallel" not in kernels.__file__, kernels.__file__
torch.manual_seed(0)
ids = torch.randint(0, 99, (1, 5))
clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                  num_hidden_layers=2, num_attention_heads=4, projection_dim=32))
t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4))
assert torch.isfinite(clip(input_ids=ids).pooler_output).all() and torch.isfinite(t5(input_ids=ids)[0]).all()
dit = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])
out = dit(hidden_states=torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 32),
          pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
          txt_ids=torch.zeros(3, 3)).sample
assert out.shape == (1, 4, 16)

import flux_parallel
from flux_parallel import FluxPipeline, ParallelContext
from flux_parallel.flux import FluxPipeline as same
from flux_parallel.parallel import ParallelContext as same_context, parallelize_flux
from flux_parallel.vae import AutoEncoder, load_autoencoder
from flux_parallel.weights import seeded_init

assert FluxPipeline is same and ParallelContext is same_context
assert Path(flux_parallel.__file__).parent == Path(sys.argv[1]), flux_parallel.__file__
image = FluxPipeline.tiny()("a red circle on a blue background", height=64, width=64, num_steps=2, output_type="pt")
assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
assert sys.modules["flux"] is flux and sys.modules["kernels"] is kernels  # ours did not replace theirs
print("beside: ok")
'''


@pytest.fixture
def bfl_flux(tmp_path) -> Path:
    """A folder holding a stand-in for BFL's `flux` package (their repository is not on the package registry)."""
    package = tmp_path / "bfl" / "flux"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("STAND_IN_FOR_BFL = True\n")
    (package / "model.py").write_text("class Flux: ...\n")
    return package.parent


def run_beside(cwd: Path, bfl: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(bfl), "HOME": str(bfl)}  # the stand-in first on sys.path
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_everything_imports_beside_each_other(where, bfl_flux, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    done = run_beside(cwd, bfl_flux, "-c", BESIDE, str(PACKAGE))
    assert done.returncode == 0 and "beside: ok" in done.stdout, done.stderr[-3000:]


def test_generate_runs_from_another_folder(bfl_flux, tmp_path):
    done = run_beside(tmp_path, bfl_flux, str(ROOT / "tools" / "generate.py"), "--model", "tiny", "--prompt",
                      "a red circle on a blue background", "--steps", "2", "--output", "out.png")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def imported_modules(file: Path) -> list[tuple[str, bool]]:
    """(module, inside a function body) for every import in `file`; relative imports resolved to flux_parallel."""
    tree, found = ast.parse(file.read_text()), []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:  # relative: from the file's own package
                    parts = file.relative_to(ROOT).parent.parts
                    module = ".".join([*parts[: len(parts) - child.level + 1], module]).rstrip(".")
                found.extend((f"{module}.{a.name}", inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def package_files(sub: str) -> list[Path]:
    files = sorted((PACKAGE / sub).rglob("*.py"))
    assert files, f"no Python files under flux_parallel/{sub}"  # a moved folder must not make the checks vacuous
    return files


@pytest.mark.parametrize("sub, forbidden", [
    ("parallel", ("flux_parallel.flux",)),
    ("vae", ("flux_parallel.flux", "flux_parallel.parallel")),
    ("weights", ("flux_parallel.flux", "flux_parallel.parallel", "flux_parallel.vae")),
    ("kernels", ("flux_parallel.flux", "flux_parallel.parallel", "flux_parallel.vae", "flux_parallel.weights")),
])
def test_imports_run_one_way(sub, forbidden):
    """flux -> parallel -> vae / weights / kernels, never back."""
    for file in package_files(sub):
        back = [m for m, _ in imported_modules(file) if m.startswith(forbidden)]
        assert not back, f"{file.relative_to(ROOT)} imports {back}"


def test_no_project_import_hides_in_a_function_body():
    for file in package_files(""):
        hidden = [m for m, inner in imported_modules(file) if inner and m.startswith("flux_parallel")]
        assert not hidden, f"{file.relative_to(ROOT)} imports {hidden} inside a function"


def test_nothing_else_at_the_top_level():
    """No generic top-level package remains to shadow (or be shadowed by) another distribution's."""
    for name in ("flux", "parallel", "vae", "kernels", "weights"):
        assert not (ROOT / name).exists(), f"{name}/ is still at the repository root"
    setup = (ROOT / "setup.py").read_text()
    assert 'find_packages(include=["flux_parallel", "flux_parallel.*"])' in setup


def test_tools_hold_entry_points_only():
    scripts = sorted(p.name for p in (ROOT / "tools").glob("*.py"))
    assert {"generate.py", "serve.py", "benchmark.py", "plan.py", "train_tiny.py"} <= set(scripts)
    assert len(scripts) <= 8, scripts
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests"}
    for file in sorted((ROOT / "tools").rglob("*.py")):
        from_tests = [m for m, _ in imported_modules(file) if m.split(".")[0] in test_modules]
        assert not from_tests, f"{file.relative_to(ROOT)} imports {from_tests} from tests/"


def test_readme_is_short_and_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's command
