"""The docs' commands run as written: every fenced command of README.md, docs/*.md and
benchmarks/README.md is checked by what it runs, every repo path and link they name exists, and
the README stays a front door (at most 200 lines).

- ``python train.py ...`` (also ``-m``, env-var prefixes, ``srun``, ``torchrun``): the config is
  composed with its overrides (``hydra.*`` overrides left out, a sweep ``seed=1,2`` read as its
  first value), so a misspelled key or group option fails;
- ``python -m moe_emergence.data|analyze|inspect ...`` and ``python benchmarks/<x>.py ...``:
  the arguments go through that entry point's own ``parse_args``, so a wrong flag fails;
  ``--help`` commands run for real, in a subprocess;
- ``make <target>``, ``bash <script>``: the target or script exists;
- anything else must be on :data:`ALLOWED` (installs, downloads, shell builtins) or the test
  fails: an unknown command form is never skipped silently. So does a fence without a language
  (tag it ``bash`` for commands, ``text`` for output) and a ``<placeholder>`` in a command,
  which the shell reads as a redirection.

Backticked config keys and overrides in the prose (`data.eval_fraction`,
`data/size=5mb`) are checked against the composed config the same way. Nothing here reaches
the network (tests/conftest.py sets the Hub's offline switches) or trains anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.mirror import SHARED_HUB
from helpers.script import load_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 200

COMMAND_LANGS = {"bash", "sh", "shell", "console"}
OTHER_LANGS = {"text", "python", "yaml", "json"}  # output, code and files: no commands
PYTHONS = {"python", "python3", ".venv/bin/python"}
# (program, its first argument or None for any): commands the test accepts unchecked, because
# they install, download, or only change the shell's state.
ALLOWED = {
    ("pip", "install"),
    ("git", "clone"),
    ("hf", "download"),
    ("export", None),
    ("cd", None),
    (".", None),
    ("source", None),
    ("for", None),
    ("done", None),
}
ALLOWED_MODULES = {"venv", "pytest", "pip"}  # python -m <module> accepted unchecked
ENTRY_POINTS = {
    "moe_emergence.data": "moe_emergence.data.cli",
    "moe_emergence.analyze": "moe_emergence.analysis.analyze",
    "moe_emergence.inspect": "moe_emergence.analysis.inspect",
}
CONTROL = {"&&", "||", ";", "|", "&"}
SHARED_HUB_TEXT = "../shared/hub"  # the docs' local mirror, beside the repo
CONFIG_ROOTS = ("data", "model", "trainer", "callbacks", "logger", "paths")
OVERRIDE_ROOTS = (*CONFIG_ROOTS, "experiment", "condition", "seed", "ckpt_path", "init_from")
PATH_PREFIXES = (
    "conf/",
    "docs/",
    "benchmarks/",
    "moe_emergence/",
    "tests/",
    "notebooks/",
    ".ci/",
    "requirements/",
)


# ---------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Fence:
    doc: Path
    line: int  # of the opening ```
    lang: str
    lines: tuple[tuple[int, str], ...]  # (line number, text)


def split_doc(doc: Path) -> tuple[list[Fence], list[tuple[int, str]]]:
    """(its fenced blocks, its lines outside them)."""
    fences, outside = [], []
    opened: tuple[int, str] | None = None
    body: list[tuple[int, str]] = []
    for number, text in enumerate(doc.read_text().splitlines(), start=1):
        marker = re.match(r"^\s*```(.*)$", text)
        if marker and opened is None:
            opened, body = (number, marker.group(1).strip()), []
        elif marker and opened is not None:
            fences.append(Fence(doc, opened[0], opened[1], tuple(body)))
            opened = None
        elif opened is not None:
            body.append((number, text))
        else:
            outside.append((number, text))
    assert opened is None, f"{doc.name}:{opened[0]}: a fence is never closed"
    return fences, outside


FENCES = [fence for doc in DOCS for fence in split_doc(doc)[0]]


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # variables the block exported before it


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _logical_lines(fence: Fence) -> Iterator[tuple[int, str]]:
    """Lines with their ``\\`` continuations joined; in ``console`` blocks only ``$ `` lines."""
    pending, start = "", 0
    for number, text in fence.lines:
        if fence.lang == "console" and not pending:
            if not text.startswith("$ "):
                continue  # output
            text = text[2:]
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        yield start, pending + text
        pending = ""
    assert not pending, f"{fence.doc.name}:{start}: a continuation line ends the block"


def fence_commands(fence: Fence) -> list[Command]:
    """The simple commands of a command block (split at ``&&``, ``;``, ``|`` ...), with the
    variables exported before each."""
    out, env = [], {}
    for number, line in _logical_lines(fence):
        where = f"{fence.doc.relative_to(ROOT)}:{number}"
        tokens = _tokens(line)
        bad = [t for t in tokens if t in {"<", ">", ">>", "<<", "(", ")"}]
        assert not bad, (
            f"{where}: {line.strip()!r} has {bad[0]!r}, which the shell reads as a redirection "
            f"or subshell: write a concrete example instead of a <placeholder>"
        )
        argv: list[str] = []
        for token in [*tokens, ";"]:
            if token not in CONTROL:
                argv.append(token)
                continue
            if argv and argv[0] == "do":
                argv = argv[1:]
            if argv:
                if argv[0] == "export":
                    env.update(a.split("=", 1) for a in argv[1:] if "=" in a)
                if argv[0] == "for" and len(argv) > 3:  # for NAME in FIRST ...
                    env[argv[1]] = argv[3]
                out.append(Command(where, tuple(argv), tuple(env.items())))
            argv = []
    return out


COMMANDS = [c for f in FENCES if f.lang in COMMAND_LANGS for c in fence_commands(f)]


def command_id(command: Command) -> str:
    return f"{command.where}:{' '.join(command.argv)[:60]}"


# ---------------------------------------------------------------------- checking a command


@pytest.fixture
def shared_hub(tmp_path) -> Path:
    """The docs' ``../shared/hub`` where it exists, else a stand-in folder (with ``gpt2/``) so
    that checks of a mirror being a folder pass."""
    if SHARED_HUB.is_dir():
        return SHARED_HUB
    (tmp_path / "hub" / "gpt2").mkdir(parents=True)
    return tmp_path / "hub"


def expand(command: Command, argv: list[str], hub: Path) -> list[str]:
    """``$NAME`` / ``${NAME}`` from the block's exports (an unset one fails), and the docs'
    ``../shared/hub`` as :func:`shared_hub`."""
    env = dict(command.env)

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"{command.where}: ${name} is not set in the block (export it first)"
        return env[name]

    out = []
    for arg in argv:
        arg = re.sub(r"\$\{(\w+)\}|\$(\w+)", value, arg)
        out.append(arg.replace(SHARED_HUB_TEXT, str(hub)))
    return out


def strip_env(argv: list[str]) -> list[str]:
    """``HF_HUB_OFFLINE=1 python ...`` -> ``python ...``."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def train_overrides(where: str, args: list[str]) -> list[str]:
    """train.py's arguments as composable overrides: ``-m``/``--multirun`` and ``hydra``
    overrides dropped, a sweep's first value kept. Any other flag fails."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, kept = OverridesParser.create(), []
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        assert not arg.startswith("-"), f"{where}: train.py flag {arg!r} is not checked here"
        override = parser.parse_override(arg)
        if override.is_hydra_override():
            continue
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            arg = f"{override.get_key_element()}={first}"
        kept.append(arg)
    return kept


def check_train(where: str, args: list[str]) -> None:
    from moe_emergence.config import compose_config

    overrides = train_overrides(where, args)
    try:
        compose_config(overrides)
    except Exception as exc:  # the composition error names the key or option
        pytest.fail(f"{where}: python train.py {' '.join(args)}: {type(exc).__name__}: {exc}")


def parse_with(where: str, parse_args, args: list[str], capsys) -> None:
    try:
        parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{where}: {' '.join(args)}: {capsys.readouterr().err.strip()}")


def run_help(where: str, argv: list[str]) -> None:
    """A ``--help`` command, run as written from the repo root (cheap: it loads nothing)."""
    exe = [sys.executable, *argv[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(exe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where}: {' '.join(argv)} failed:\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout, f"{where}: {' '.join(argv)} printed no usage"


def check_python(where: str, argv: list[str], monkeypatch, capsys) -> None:
    args = argv[1:]
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module in ALLOWED_MODULES:
            return
        assert module in ENTRY_POINTS, f"{where}: python -m {module} is not a known entry point"
        parse_with(where, importlib.import_module(ENTRY_POINTS[module]).parse_args, rest, capsys)
    elif args and args[0] == "train.py":
        check_train(where, args[1:])
        return
    elif args and args[0].startswith("benchmarks/") and args[0].endswith(".py"):
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        module = load_script(script, monkeypatch, f"docs_{script.stem}")
        if "--device" in args and any(a.startswith("cuda") for a in args):
            # parse as on a GPU machine: the flags are what is checked, not this machine
            monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
        parse_with(where, module.parse_args, args[1:], capsys)
    else:
        pytest.fail(f"{where}: python {' '.join(args)}: an unknown command form (add a check)")
    if "--help" in args or "-h" in args:
        run_help(where, argv)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def check_command(command: Command, hub: Path, monkeypatch, capsys) -> None:
    where = command.where
    argv = strip_env(expand(command, list(command.argv), hub))
    assert argv, f"{where}: only variable assignments"
    program = argv[0]
    if program == "srun":
        argv, program = argv[1:], argv[1]
    if program == "torchrun":
        scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
        assert scripts, f"{where}: torchrun without a script"
        argv, program = ["python", *argv[scripts[0] :]], "python"
    if program in PYTHONS:
        check_python(where, argv, monkeypatch, capsys)
    elif program == "make":
        targets = [a for a in argv[1:] if "=" not in a]
        unknown = set(targets) - makefile_targets()
        assert targets and not unknown, f"{where}: make {' '.join(argv[1:])}: no such target"
    elif program == "bash":
        assert (ROOT / argv[1]).is_file(), f"{where}: bash {argv[1]}: no such script"
    elif program in ("jupyter", ".venv/bin/jupyter") and argv[1:2] == ["nbconvert"]:
        notebooks = [a for a in argv if a.endswith(".ipynb")]
        assert notebooks and all((ROOT / n).is_file() for n in notebooks), f"{where}: no notebook"
        assert importlib.util.find_spec("nbconvert"), f"{where}: nbconvert is not installed"
    else:
        allowed = (program, None) in ALLOWED or (program, (argv[1:] or [""])[0]) in ALLOWED
        assert allowed, (
            f"{where}: {' '.join(argv)}: an unknown command form; check it in tests/test_docs.py "
            "or add it to ALLOWED"
        )


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_fenced_command_runs_as_written(command, shared_hub, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the docs' commands run from the repo root
    check_command(command, shared_hub, monkeypatch, capsys)


def test_the_docs_have_commands_of_every_checked_form():
    """The extraction finds what the docs hold (not an empty list that passes)."""
    programs = {strip_env(list(c.argv))[0] for c in COMMANDS}
    assert {"make", "python", "bash"} <= programs
    joined = [" ".join(c.argv) for c in COMMANDS]
    for form in ["train.py", "moe_emergence.data", "moe_emergence.analyze"]:
        assert any(form in j for j in joined), form
    assert any("moe_emergence.inspect" in j for j in joined)
    assert any("benchmarks/bench_moe.py" in j for j in joined)
    assert any("benchmarks/bench_prepare.py" in j for j in joined)


@pytest.mark.parametrize("fence", FENCES, ids=lambda f: f"{f.doc.relative_to(ROOT)}:{f.line}")
def test_every_fence_says_what_it_holds(fence):
    assert fence.lang in COMMAND_LANGS | OTHER_LANGS, (
        f"{fence.doc.relative_to(ROOT)}:{fence.line}: fence language {fence.lang!r}: tag it "
        f"with one of {sorted(COMMAND_LANGS | OTHER_LANGS)} (bash for commands, text for output)"
    )


# ---------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    "line",
    [
        "python train.py data.blok_size=128",
        "python train.py model=gpt3",
        "python -m moe_emergence.data --size-mb 1 --no-such-flag",
        "python -m moe_emergence.analyze outputs/multirun/<date>/<time>",
        "python -m moe_emergence.data --source hub|sample",
        "python benchmarks/bench_moe.py --experts-count 8",
        "python -m moe_emergence.nothing",
        "make deploy",
        "rm -rf outputs",
        "python train.py data.hub_mirror=$UNSET",
    ],
)
def test_the_checker_fails_on_a_wrong_command(line, shared_hub, monkeypatch, capsys):
    fence = Fence(ROOT / "README.md", 1, "bash", ((2, line),))
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        for command in fence_commands(fence):
            check_command(command, shared_hub, monkeypatch, capsys)


def test_the_checker_reads_sweeps_env_prefixes_and_exports(shared_hub, monkeypatch, capsys):
    lines = (
        (1, "export MIRROR=/data/hub"),
        (2, "HF_HUB_OFFLINE=1 python train.py -m seed=1,2 data.hub_mirror=$MIRROR \\"),
        (3, "    condition=top1,dense hydra.run.dir=x  # a comment"),
        (4, "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]'"),
    )
    commands = fence_commands(Fence(ROOT / "README.md", 1, "bash", lines))
    assert [c.argv[0] for c in commands] == ["export", "HF_HUB_OFFLINE=1", "python3", ".", "pip"]
    assert train_overrides("x", list(commands[1].argv[3:])) == [
        "seed=1",
        "data.hub_mirror=$MIRROR",
        "condition=top1",
    ]
    for command in commands:
        check_command(command, shared_hub, monkeypatch, capsys)


# ---------------------------------------------------------------------- keys, paths, links


def _spans(doc: Path) -> Iterator[tuple[int, str]]:
    """Backticked spans outside the fences."""
    for number, text in split_doc(doc)[1]:
        for span in re.findall(r"`([^`]+)`", text):
            yield number, span


def _links(doc: Path) -> Iterator[tuple[int, str]]:
    for number, text in split_doc(doc)[1]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            yield number, target


def _composed_keys() -> set[str]:
    """Every dotted key of the config composed with the defaults and with the options that add
    keys (the demo's, global LB's)."""
    from omegaconf import OmegaConf

    from moe_emergence.config import compose_config

    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                keys.add(prefix + str(key))
                walk(value, f"{prefix}{key}.")

    for overrides in ([], ["experiment=demo"], ["condition=global_lb"]):
        walk(OmegaConf.to_container(compose_config(overrides), resolve=False), "")
    return keys


def key_problems(doc: Path, keys: set[str]) -> list[str]:
    """Backticked config keys of ``doc`` missing from ``keys``, and backticked overrides (or a
    group's key, ``condition=top1,experiment=study_cpu``) that do not compose."""
    from moe_emergence.config import compose_config

    problems = []
    key_re = re.compile(rf"(?:{'|'.join(CONFIG_ROOTS)})(?:\.\w+)+")
    override_re = re.compile(rf"[+~]?(?:{'|'.join(OVERRIDE_ROOTS)})(?:[./]\w+)*(?:=\S+)?")
    for number, span in _spans(doc):
        where = f"{doc.name}:{number}"
        if key_re.fullmatch(span):
            if span not in keys:
                problems.append(f"{where}: config key {span!r} does not exist")
            continue
        items = span.split()
        pieces = span.split(",")
        if len(items) == 1 and len(pieces) > 1 and all("=" in p for p in pieces):
            items = pieces
        if all(override_re.fullmatch(p) for p in items) and ("=" in span or span[0] == "~"):
            try:
                compose_config(train_overrides(where, items))
            except Exception as exc:
                problems.append(f"{where}: {span!r}: {type(exc).__name__}: {exc}")
    return problems


def test_config_keys_and_overrides_named_in_the_docs_exist():
    keys = _composed_keys()
    problems = [p for doc in DOCS for p in key_problems(doc, keys)]
    assert not problems, "\n".join(problems)


def github_anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc`` (lower case, punctuation dropped, spaces
    to hyphens, ``-1``, ``-2`` ... on repeats)."""
    counts: dict[str, int] = {}
    anchors = set()
    for _, text in split_doc(doc)[1]:
        heading = re.match(r"^#{1,6}\s+(.*)$", text)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def path_problems(doc: Path) -> list[str]:
    """Backticked repo paths (:data:`PATH_PREFIXES`) and relative links of ``doc`` that do not
    exist, and links to a heading that is not there."""
    problems = []
    for number, span in _spans(doc):
        path = span.split()[0] if span.split() else span
        if path.startswith(PATH_PREFIXES) and re.fullmatch(r"[\w./*-]+", path):
            found = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
            if not found or not all(p.exists() for p in found):
                problems.append(f"{doc.name}:{number}: `{span}` does not exist")
    for number, target in _links(doc):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        where = f"{doc.name}:{number}: link {target!r}"
        if not path.exists():
            problems.append(f"{where}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
            problems.append(f"{where}: no such heading in {path.name}")
    return problems


def test_paths_and_links_in_the_docs_exist():
    problems = [p for doc in DOCS for p in path_problems(doc)]
    assert not problems, "\n".join(problems)


def test_the_key_path_and_link_checks_fail_on_mistakes(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# A heading\n\n"
        "`data.blok_size`, `data/size=2mb`, `model.moe.n_expert=4`, `~callbacks.nothing`, "
        "`data.block_size`, `condition=top2,experiment=study_cpu`\n"
        "`conf/no_such.yaml`, `moe_emergence/train.py`, [a](#a-heading), [b](#b-heading), "
        f"[c]({ROOT / 'docs' / 'nope.md'}), [d]({ROOT / 'README.md'}#the-demo)\n"
        "```bash\n`conf/inside_a_fence.yaml`\n```\n"
    )
    keys = key_problems(doc, _composed_keys())
    assert [p.split("'")[1] for p in keys] == [
        "data.blok_size",
        "data/size=2mb",
        "model.moe.n_expert=4",
        "~callbacks.nothing",
    ]
    paths = path_problems(doc)
    assert len(paths) == 3, paths
    assert "conf/no_such.yaml" in paths[0] and "#b-heading" in paths[1] and "nope.md" in paths[2]


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    text = README.read_text()
    for command in ("make demo", "make test", "ruff check . && python -m pytest"):
        assert command in text
    for entry in (
        "python train.py",
        "python -m moe_emergence.data",
        "python -m moe_emergence.analyze",
        "python -m moe_emergence.inspect",
    ):
        assert entry in text, entry
    for page in DOCS[1:]:
        assert str(page.relative_to(ROOT)) in text, f"the README's index misses {page.name}"


def test_tables_name_conditions_as_people_say_them():
    """No table row of the docs names a condition by its override string."""
    problems = [
        f"{doc.relative_to(ROOT)}:{number}"
        for doc in DOCS
        for number, text in split_doc(doc)[1]
        if text.startswith("|") and re.search(r"\|\s*condition=\w+,experiment=", text)
    ]
    assert not problems, problems


def test_download_hints_name_the_hf_cli():
    """The locked huggingface_hub ships the ``hf`` command only: no message, docstring or doc
    tells people to run ``huggingface-cli`` (#29 item 7)."""
    files = [*DOCS, *sorted((ROOT / "moe_emergence").rglob("*.py")), *(ROOT / "conf").rglob("*")]
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    stale = [
        str(path.relative_to(ROOT))
        for path in files
        if path.is_file() and "huggingface-cli" in path.read_text()
    ]
    assert not stale, stale
