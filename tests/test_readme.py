"""Every command and code block of the README runs, at tiny size, as written.

Blocks are read from README.md by their `<!-- readme:NAME -->` markers (tests/readme_blocks.py), so the README
cannot drift from what is tested. Shell commands run in a scratch folder with the checkout on PYTHONPATH;
`torchrun` is spelled `python -m torch.distributed.run` (the same program). The quick start is run in
tests/test_eagle_hf.py; the two README commands are CI's own (`.ci/run`) and the demo trainer's run below.
"""
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.distributed import cpu_only_env
from tests.readme_blocks import README, readme_block, readme_commands

REPO = README.parent


def _shell(command: str, cwd: Path, env=None, timeout=900) -> subprocess.CompletedProcess:
    command = command.replace("torchrun ", f"{shlex.quote(sys.executable)} -m torch.distributed.run ", 1)
    command = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1) if command.startswith("python ") \
        else command
    processes = int(command.split("--nproc-per-node ")[1].split()[0]) if "--nproc-per-node" in command else 1
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **cpu_only_env(processes),
                       **(env or {}))
    result = subprocess.run(command, shell=True, cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{(result.stdout + result.stderr)[-4000:]}"
    return result


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme:test-command" in ci
    assert readme_commands("test-command") == ["bash install.sh && python -m pytest -n 2 -q"]
    assert readme_commands("main-command") == ["bash install.sh && python -m longvl.eagle.train --config demo"]


def test_kernels_block():
    scope = {}
    exec(compile(readme_block("kernels"), "README kernels block", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and 0 <= float(scope["accuracy"]) <= 1


def test_parallel_block_on_two_processes_equals_one_process(tmp_path):
    check = textwrap.dedent("""
        from longvl.parallel import attention_forward
        if dist.is_initialized() is False:
            cu = torch.tensor([0] + doc_lengths).cumsum(0).to(torch.int32).to(device)
            want, _, _ = attention_forward(q.float(), k.float(), v.float(), causal=True, cu_seqlens_q=cu,
                                           cu_seqlens_k=cu, backend="reference")
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            assert (full.float() - want).abs().max() < tol, (full.float() - want).abs().max()
            print("EXACT", full.shape)
    """)
    script = tmp_path / "cp_example.py"
    script.write_text(readme_block("parallel") + check)
    result = _shell(f"torchrun --standalone --nproc-per-node 2 {script}", tmp_path, timeout=300)
    assert result.stdout.count("EXACT torch.Size([1, 1337, 8, 64])") == 2


def test_training_commands(tmp_path):
    commands = readme_commands("train-cli")
    help_text = _shell(commands[0], tmp_path).stdout
    assert "--stages.N.lr" in help_text and "--kernels.enabled" in help_text
    for command in commands[1:]:
        _shell(command, tmp_path)
    assert (tmp_path / "outputs" / "demo" / "metrics" / "metrics.jsonl").is_file()
    assert (tmp_path / "DATA" / "mixture.yaml").is_file()
    assert list((tmp_path / "DATA").glob(".longvl-index/*L32768*"))


def test_multinode_command_is_a_valid_launch(tmp_path):
    """The 8B multi-node launch, checked with --check (validation only) as its 16 processes would see it, on a
    tiny checkpoint folder in the released layout."""
    from longvl.eagle.configuration_eagle import tiny_eagle_config
    from longvl.eagle.export import write_hf_metadata
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
    from longvl.eagle.processing.tokenizer import IMG_CONTEXT, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_eagle_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    checkpoint = tmp_path / "Eagle2.5-8B"
    EagleForConditionalGeneration(config).save_pretrained(checkpoint)
    write_hf_metadata(checkpoint, config, tokenizer=tokenizer)
    (command,) = readme_commands("train-multinode")
    nodes = int(command.split("--nnodes ")[1].split()[0]) * int(command.split("--nproc-per-node ")[1].split()[0])
    launch = command.split(" -m ", 1)[1].replace("/ckpt/Eagle2.5-8B", str(checkpoint))
    launch = launch.replace("/data/mix", str(tmp_path))
    result = _shell(f"python -m {launch} --check", tmp_path, env={"WORLD_SIZE": str(nodes)})
    assert f"config valid for {nodes} process(es)" in result.stdout and "128k" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite would measure for real (minutes)")
def test_benchmark_commands(tmp_path):
    """The suite (one benchmark file, quick), the report (which must reproduce the committed README table)
    and the regression guard."""
    before = README.read_text()
    run, report, compare = readme_commands("bench")
    _shell(f"{run} -k bench_rms_norm", tmp_path)
    assert list((tmp_path / "OUT").glob("bench_*.json"))
    _shell(report, REPO)
    assert README.read_text() == before, "README's table is not what bench/results/*.json generate"
    _shell(compare, tmp_path)
