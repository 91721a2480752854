"""The documentation cannot drift from the code or point at nothing: the settings tables are the
ones generated from Hyperparameters, every relative link resolves (anchors included), and every
file under logs/ that the pages name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import settings_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
LOG_NAME = re.compile(r"(?<![\w/.-])(?:\.\./)?(logs/[A-Za-z0-9_.{},*-]+)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (commands there may name files a run would write)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def expand(name: str) -> list[str]:
    """`a{1,2}.{txt,json}` -> a1.txt, a1.json, a2.txt, a2.json (shell brace expansion)."""
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in expand(name[:m.start()] + part + name[m.end():])]


def test_settings_tables_are_the_generated_ones():
    """README.md and docs/settings.md hold exactly what `python settings_table.py --write` writes."""
    assert settings_table.main(["--check"]) == 0


def test_settings_table_covers_every_setting_and_marks_switches():
    import train_gpt

    table = settings_table.tables()
    for name, _, _ in train_gpt.HPARAMS:
        assert f"| `{name.upper()}` |" in table["all"]
    assert "| `FUSED_CE` | `0` | switch |" in table["switches"]
    assert "choice: `brotli`, `lzma`" in table["switches"]
    assert "| `NUM_LAYERS` |" not in table["switches"]  # a record setting, not a switch


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_log_file_exists(page):
    missing = []
    for mention in LOG_NAME.findall(prose(page.read_text(encoding="utf-8"))):
        mention = mention.rstrip(".,;:)")
        if "NAME" in mention or "*" in mention or mention.endswith(("/", "_")):
            continue  # a pattern, not a file
        missing += [name for name in expand(mention) if not (ROOT / name).is_file()]
    assert not missing, f"{page.name} names files that are not in the repository: {sorted(set(missing))}"


def test_slug_matches_githubs_rule():
    assert slug("Real text on CPU: stages, speed, and two A/Bs") == "real-text-on-cpu-stages-speed-and-two-abs"
    assert slug("Triton kernels (`FUSED_CE`, `FUSED_MLP`)") == "triton-kernels-fused_ce-fused_mlp"
    assert expand("logs/a_seed{1,2}.{txt,json}") == ["logs/a_seed1.txt", "logs/a_seed1.json", "logs/a_seed2.txt",
                                                     "logs/a_seed2.json"]


def test_bench_curves_reads_every_logged_loss(tmp_path):
    """bench.py curves: the points of the committed plots are the logs' own train/val lines."""
    import bench

    curves = bench.loss_curves(ROOT / "logs" / "cpu_small_seed1.txt")
    assert curves["train"][0] == (1, 8.9711) and curves["train"][-1][0] == 300 and len(curves["train"]) == 16
    assert [s for s, _ in curves["val"]] == [0, 150, 300]
    pytest.importorskip("matplotlib")  # a benchmark-only dependency (requirements-bench.txt)
    out = tmp_path / "curves.png"
    assert bench.main(["curves", str(out), str(ROOT / "logs" / "cpu_wide_seed1.txt"), "--from-step", "10"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
