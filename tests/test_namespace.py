"""Our packages live under `longvl` and coexist with Hugging Face's `kernels` package, which transformers imports.

A top-level `kernels` (or `parallel`, `eagle`) of ours would either break transformers' start-up (it imports
HF's `kernels` and finds ours) or be hidden by theirs. Each check runs in a fresh interpreter, once with the
repository root as the working directory and once from elsewhere, since what `import kernels` finds depends on it.
"""
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import longvl

REPO = Path(__file__).resolve().parent.parent
RESERVED = ("kernels", "parallel", "eagle")

IMPORT_EVERYTHING_AND_PATCH = textwrap.dedent("""
    import importlib, pkgutil, sys
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import longvl
    names = [m.name for m in pkgutil.walk_packages(longvl.__path__, "longvl.")]
    for name in names:
        importlib.import_module(name)
    from longvl import kernels
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels.rms_norm(torch.randn(3, 32, device=device), torch.ones(32, device=device))   # calls tl.sum
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = kernels.apply_kernels(Qwen2ForCausalLM(config).to(device))
    ids = torch.randint(0, 64, (1, 9), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss), loss
    hub = importlib.import_module("kernels")
    print("HUB", hub.__file__)
    print("MODULES", len(names))
""")


def _run(cwd):
    # A user's process: transformers (and with it triton) imported before longvl, TRITON_INTERPRET not preset.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING_AND_PATCH], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def test_no_reserved_top_level_name_in_the_repository_or_the_package():
    for name in RESERVED:   # any Python source there would be importable as a top-level package
        assert not list((REPO / name).rglob("*.py")) and not (REPO / f"{name}.py").exists(), \
            f"a top-level {name} in the repository shadows or is shadowed by PyPI's"
    top_level = {m.name for m in pkgutil.iter_modules([str(Path(longvl.__file__).parent.parent)])}
    assert "longvl" in top_level


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_everything_imports_and_patches_next_to_hub_kernels(where, tmp_path):
    try:
        importlib.metadata.distribution("kernels")   # Hugging Face's package installed (not a folder found)
    except importlib.metadata.PackageNotFoundError:
        from packaging.version import Version
        import transformers

        if Version(transformers.__version__) >= Version("5.25"):
            pytest.fail("Hugging Face's kernels package is missing: install the test extras (pip install -e .[test])")
        pytest.skip(f"transformers {transformers.__version__} does not use Hugging Face's kernels package")
    result = _run(REPO if where == "repo_root" else tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hub_file = next(line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("HUB "))
    assert not Path(hub_file).resolve().is_relative_to(REPO), f"`import kernels` found ours: {hub_file}"
    modules = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("MODULES")))
    assert modules > 40, modules
