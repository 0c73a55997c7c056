"""README.md tells a new user what works: the install command from a checkout, the op's whole
signature, which loss takes which K, and a short benchmark section (the detail: benchmarks/README.md)."""
import inspect
import re
from pathlib import Path

from mio_kernels import fused_mio_loss
from mio_kernels.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    nxt = re.search(r"^## ", text[start + len(heading):], flags=re.M)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def test_install_command_works_from_a_checkout():
    assert "pip install mio-kernels" not in README
    assert 'pip install -e ".[trl]"' in README


def test_signature_block_has_every_keyword():
    block = README[README.index("out = fused_mio_loss("):]
    block = block[:block.index("\n)")]
    for name in inspect.signature(fused_mio_loss).parameters:
        assert re.search(rf"\b{name}\b", block), name


def test_every_loss_is_in_the_k_table():
    table = README[README.index("| `loss_type` | TRL's name"):]
    table = table[:table.index("\n\n")]
    for name in LOSSES:
        assert f"`{name}`" in table, name


def test_benchmark_section_is_short_and_points_at_the_detail():
    bench = section(README, "## Benchmarks")
    assert len(bench) < 4000 and "](benchmarks/README.md)" in bench
    assert "### " not in bench  # the sub-sections live in benchmarks/README.md
    detail = (ROOT / "benchmarks" / "README.md").read_text()
    for heading in ("## CPU results", "## Interleaved: ours against the peers", "## Padding-free training"):
        assert heading in detail
    for link in re.findall(r"\]\(([^)#]+)\)", detail):
        if not link.startswith("http"):
            assert (ROOT / "benchmarks" / link).exists(), link
