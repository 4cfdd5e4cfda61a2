"""The README's examples run as written (its tour and its new operations), in one namespace."""

import re
from pathlib import Path

import fastconv as fc

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text, title):
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_tour_and_the_new_operations_run():
    text = README.read_text()
    code = "\n".join(block for title in ("A tour", "More operations")
                     for block in re.findall(r"```python\n(.*?)```", _section(text, title),
                                             re.S))
    ns: dict = {}
    threads = fc.get_num_threads()
    try:  # the tour sets the thread count
        exec(compile(code, str(README), "exec"), ns)
    finally:
        fc.set_num_threads(threads)
    assert ns["y"].shape == (8, 3, 16, 16) and ns["feats"].shape == (8, 3, 1, 1)
    assert ns["z"].shape == (8, 8, 64, 64) and ns["yk"].shape == (8, 28, 28, 32)
    assert ns["pk"].shape == (8, 14, 14, 32) and ns["up"].dW.shape == ns["up_w"].shape
