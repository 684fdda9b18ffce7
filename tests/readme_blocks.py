"""The README's code blocks, found by the `<!-- readme:NAME -->` marker on the line before each."""
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    """The text of the fenced block that follows `<!-- readme:NAME -->` (without the fences)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"<!-- readme:{name} -->") + 1
    if not lines[start].startswith("```"):
        raise ValueError(f"no code block right after the readme:{name} marker")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1:end]) + "\n"


def readme_commands(name: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    commands, current = [], ""
    for line in readme_block(name).splitlines():
        current += line.split("  #")[0].rstrip() if not line.rstrip().endswith("\\") else line.rstrip()[:-1] + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                commands.append(" ".join(current.split()))
            current = ""
    return commands
