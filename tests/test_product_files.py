"""What a newcomer reads holds no traces of one person's machine or tracker, and every command the
docs show runs from a clone.

Product files: every text file of the repository (tracked, or new and not ignored), except
  * docs/lab/, the dated records of studies, which may quote their history;
  * this file, which spells out the patterns it looks for.
Code (*.py, notebooks, Makefile, Dockerfile, .ci/run), the README, docs/ and pretrained/ are all
product files under this rule; so are the tests.

1. No home-directory path: `~/`, `$HOME` (or `${HOME}`), `/root/`, `/home/<user>`,
   `/Users/<user>`. Figures and commands name `$OUT`-style placeholders instead. Allowed, because
   they are documented defaults of a program rather than where someone's files live:
   `~/.cache` (the XDG cache directory: this project's MNIST cache defaults to
   `~/.cache/capsnet_tfx/mnist`), `~/.apache_beam/` (Beam's download cache, which the project
   keeps Beam from using) and `~/tfx/vertex` (the TFX CLI's default `$VERTEX_HOME`).
2. No issue number of a tracker: `issue 33`, `issue #33`, `PR 12`, `GH-33`, a bare `#33`, or an
   `issues/33` / `pull/33` that is not part of a URL naming its repository. A product file names
   the target itself, not the ticket that asked for it. Allowed: another project's issue, named
   with its repository, `owner/repo#N` (e.g. `kubeflow/pipelines#13476`) or
   `github.com/owner/repo/issues/N`, because a reader can follow it; a `#` that starts a Markdown
   heading or a colour (`"#336699"`) is not an issue number.

3. Every command in a fenced shell block of README.md and docs/ (outside docs/lab/) runs from a
   clone: a `python -m MODULE` or `python FILE.py` names a module or file of the repository, and
   every `--flag` it passes appears in that entry point's `--help` (a value given to a flag with
   choices is one of them); a `make TARGET` names a target of the Makefile, and the flags in its
   `ARGS="..."` are those of the script the target runs. Each entry point's `--help` runs once, in
   a subprocess.
"""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), REPO)

SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "outputs", "node_modules"}

# Documented default-config locations (rule 1): `~/` followed by one of these is allowed.
DEFAULT_CONFIG_PATHS = ("~/.cache", "~/.apache_beam/", "~/tfx/vertex")

HOME_PATH = re.compile(
    r"(?<![\w~])~/"                        # ~/...
    r"|\$\{?HOME\}?(?![\w])"               # $HOME, ${HOME}
    r"|(?<![\w.\-/])/root/"                # /root/... (not gs://b/root/, /a/root/)
    r"|(?<![\w.\-/])/(?:home|Users)/\w")   # /home/<user>, /Users/<user>

ISSUE_NUMBER = re.compile(
    r"\b(?:issue|issues|ticket|bug)\s*#?\s*\d+\b"   # issue 33, issue #33
    r"|\bPR\s*#?\s*\d+\b|\bpull request\s*#?\s*\d+\b"
    r"|\bGH-\d+\b"
    r"|(?<![\w&#/\"'])#\d+\b"            # a bare #33: not owner/repo#33, &#33; or "#333"
    r"|\b(?:issues|pull)/\d+\b",          # issues/33 (allowed in a repository's URL, below)
    re.IGNORECASE)
# `issues/N` and `pull/N` are allowed inside a URL that names the repository.
REPO_URL_ISSUE = re.compile(r"github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+")


def repository_files():
    """Paths (relative to REPO) of the repository's files: git's tracked and untracked-but-not-
    ignored files where git answers, else every file outside SKIP_DIRS."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            paths += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    return sorted(p for p in set(paths) if os.path.isfile(os.path.join(REPO, p)))


def read_text(path):
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    with open(os.path.join(REPO, path), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_product_file(path):
    return not path.startswith("docs/lab/") and path != THIS


@functools.lru_cache(maxsize=None)
def product_texts():
    """{path: text} of every product file that is text."""
    texts = {}
    for path in repository_files():
        if is_product_file(path):
            text = read_text(path)
            if text is not None:
                texts[path] = text
    return texts


def home_paths(path, text):
    """'path:line: text' for each home-directory path in text that no rule or exception allows."""
    found = []
    allowed = DEFAULT_CONFIG_PATHS
    for number, line in enumerate(text.splitlines(), 1):
        for match in HOME_PATH.finditer(line):
            if not line[match.start():].startswith(allowed):
                found.append(f"{path}:{number}: {line.strip()}")
    return found


def issue_numbers(path, text):
    """'path:line: text' for each issue number in text that names no other repository."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        urls = [m.span() for m in REPO_URL_ISSUE.finditer(line)]
        for match in ISSUE_NUMBER.finditer(line):
            if not any(start <= match.start() < end for start, end in urls):
                found.append(f"{path}:{number}: {line.strip()}")
    return found


# ------------------------------------------------------------------------------ rules 1 and 2
def test_the_patterns_catch_what_they_should_and_nothing_else():
    bad_paths = ["--output-dir ~/capsnet-runs/a", "$HOME/capsnet-final-s1", "${HOME}/x",
                 "cd $HOME", '"/root/bench/sitting.md"', "/home/alice/runs", "/Users/bob/x"]
    good_paths = ["~/.cache/capsnet_tfx/mnist", "($XDG_CACHE_HOME or ~/.cache)/capsnet_tfx",
                  "~/.apache_beam/cache/prism/", "~/tfx/vertex/capsnet-mnist/",
                  "gs://bucket/root/Trainer", "/a/root/Evaluator", "$OUT/final-s1",
                  "with `HOME` in a temp dir", "$CAPSNET_HOME_DIR"]
    assert all(home_paths("x.md", line) for line in bad_paths)
    assert not [line for line in good_paths if home_paths("x.md", line)]

    bad_refs = ["see issue 33", "Issue #33", "fixes #33", "(#7)", "issues/33", "PR 12", "GH-33",
                "the CPU issue 2", "https://tracker.example/issues/33"]
    good_refs = ["## 1. Put MNIST where the pods can read it", "# Results", 'color="#336699"',
                 "kubeflow/pipelines#13476", "tensorflow/model-analysis#112",
                 "https://github.com/tensorflow/model-analysis/issues/112", "&#33;",
                 "an issue of the stack", "`#` comments", "step 3 of 50"]
    assert all(issue_numbers("x.md", line) for line in bad_refs)
    assert not [line for line in good_refs if issue_numbers("x.md", line)]


def test_product_files_name_no_home_directory():
    texts = product_texts()
    assert "README.md" in texts and "docs/results.md" in texts
    found = [hit for path, text in texts.items() for hit in home_paths(path, text)]
    assert not found, "home-directory paths (name $OUT or the like instead):\n" + "\n".join(found)


def test_product_files_name_no_issue_number():
    found = [hit for path, text in product_texts().items() for hit in issue_numbers(path, text)]
    assert not found, "issue numbers (name the target itself):\n" + "\n".join(found)


# ------------------------------------------------------------------------------------- rule 3
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_WORDS = {"do", "done", "then", "else", "fi", "esac", "{", "}", "time", "exec", "nohup",
               "env"}
# $((arithmetic)) and $(command substitution) stand for one word of unknown value.
SUBSTITUTIONS = (re.compile(r"\$\(\([^()]*\)\)"), re.compile(r"\$\([^()]*\)"))


def doc_files():
    return [p for p in repository_files()
            if p.endswith(".md") and is_product_file(p)
            and (p == "README.md" or p.startswith("docs/"))]


def shell_blocks(text):
    """(first line number, [lines]) of every fenced block in a shell language."""
    blocks, fence, lang, start, lines = [], None, None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, lang, start, lines = match.group(2), match.group(3).lower(), number, []
        elif match and match.group(2).startswith(fence) and not match.group(3):
            if lang in SHELL_LANGS:
                blocks.append((start + 1, lines))
            fence = None
        else:
            lines.append(line)
    return blocks


def shell_commands(lines, first_line):
    """(line number, [words]) of each simple command: continuations joined, comments dropped,
    split at ; && || | & and at the shell's keywords, with leading VAR=value assignments off."""
    commands, pending, pending_start = [], "", None
    for offset, line in enumerate(lines):
        if pending_start is None:
            pending_start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        for substitution in SUBSTITUTIONS:
            text = substitution.sub("$VALUE", text)
        text = re.sub(r"(^|\s)#.*$", "", text)  # a comment starts a word, as in the shell
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        try:
            words = list(lexer)
        except ValueError as error:
            raise AssertionError(f"line {pending_start}: cannot parse {text!r}: {error}")
        command = []
        for word in words + [";"]:
            if word and set(word) <= set(";&|()<>"):
                while command and (command[0] in SHELL_WORDS
                                   or re.match(r"^[A-Za-z_]\w*=", command[0])):
                    command.pop(0)
                if command and command[0] not in ("for", "while", "if", "case"):
                    commands.append((pending_start, command))
                command = []
            else:
                command.append(word.strip("[]"))
        pending_start = None
    return commands


def module_path(module):
    """The repository file `python -m module` runs, or None."""
    base = os.path.join(REPO, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__main__.py")):
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def help_text(entry):
    """`--help` of an entry point: ('-m', module) or ('file', path relative to REPO)."""
    kind, name = entry
    argv = [sys.executable, "-m", name] if kind == "-m" else [sys.executable, name]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(argv + ["--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def help_flags(entry):
    """({flag}, {flag: (choice, ...)}) from an entry point's --help."""
    text = help_text(entry)
    flags = set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", text))
    choices = {flag: tuple(c.strip() for c in values.split(","))
               for flag, values in re.findall(r"(--[A-Za-z0-9][\w-]*)[ =]\{([^}]*)\}", text)}
    return flags, choices


def check_flags(entry, words, where):
    """Problems with the --flags in words, against entry's --help."""
    if "usage:" not in help_text(entry).lower():
        return [f"{where}: {entry[1]} --help prints no usage: it is not a command"]
    flags, choices = help_flags(entry)
    problems = []
    for i, word in enumerate(words):
        if not word.startswith("--") or word == "--":
            continue
        flag, _, value = word.partition("=")
        if flag not in flags:
            problems.append(f"{where}: {flag} is not a flag of {entry[1]} (--help)")
            continue
        if not value and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value = words[i + 1]
        if flag in choices and value and "$" not in value and not value.isupper() \
                and value not in choices[flag]:
            problems.append(f"{where}: {flag} {value}: not one of {choices[flag]}")
    return problems


@functools.lru_cache(maxsize=None)
def make_targets():
    """{target: the entry point its $(ARGS) go to, or None} from the Makefile."""
    with open(os.path.join(REPO, "Makefile")) as f:
        text = f.read()
    targets, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^([\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)", line)
        if match:
            current = match.group(1).split()
            for target in current:
                targets.setdefault(target, None)
        elif line.startswith("\t") and current and "$(ARGS)" in line:
            entry = re.search(r"-m\s+([\w.]+)\s+\$\(ARGS\)", line)
            script = re.search(r"([\w/.-]+\.py)\s+\$\(ARGS\)", line)
            for target in current:
                targets[target] = (("-m", entry.group(1)) if entry else
                                   ("file", script.group(1)) if script else None)
        elif not line.startswith("\t"):
            current = None
    return targets


def command_problems(words, where):
    """What keeps one documented command from running from a clone."""
    program = words[0]
    if program == "make":
        problems, targets = [], make_targets()
        for word in words[1:]:
            if word.startswith("-") or "=" in word:
                continue
            if word not in targets:
                problems.append(f"{where}: make {word}: no such target in the Makefile")
        for word in words[1:]:
            if word.startswith("ARGS="):
                named = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
                default = next((t for t in targets if not t.startswith(".")), None)
                entry = targets.get(named[0] if named else default)
                if entry is None:
                    problems.append(f"{where}: ARGS given to a target that takes none")
                else:
                    problems += check_flags(entry, shlex.split(word[len("ARGS="):]), where)
        return problems
    if not (os.path.basename(program) in ("python", "python3", "python3.10")):
        return []  # another program (docker, gsutil, jupyter, ...): not this repository's
    args = words[1:]
    if args[:1] == ["-m"] and len(args) > 1:
        if module_path(args[1]) is None:
            return [f"{where}: python -m {args[1]}: no such module in the repository"]
        return check_flags(("-m", args[1]), args[2:], where)
    if args and args[0].endswith(".py"):
        if not os.path.isfile(os.path.join(REPO, args[0])):
            return [f"{where}: python {args[0]}: no such file in the repository"]
        return check_flags(("file", args[0]), args[1:], where)
    return []  # python -c, or an interactive python


def documented_commands():
    found = []
    for path in doc_files():
        text = read_text(path) or ""
        for first, lines in shell_blocks(text):
            for number, words in shell_commands(lines, first):
                if words[0] == "make" or os.path.basename(words[0]).startswith("python"):
                    found.append(pytest.param(words, f"{path}:{number}",
                                              id=f"{path}:{number}"))
    return found


def test_the_docs_show_commands():
    where = {param.values[1].split(":")[0] for param in documented_commands()}
    assert {"README.md", "docs/results.md", "docs/usage.md"} <= where


def test_the_command_parser_reads_loops_continuations_and_make_args():
    lines = ["for B in 1 10; do for P in a b; do",
             "  python -m bench.train_throughput --mode serve --batch $B \\",
             "      --serving-precision $P  # a comment",
             "done; done",
             'KERAS_BACKEND=jax python -m models.train --output-dir $OUT/x [--seed 1]',
             'make run ARGS="--preset full --seed 1" && echo done']
    assert shell_commands(lines, 1) == [
        (2, ["python", "-m", "bench.train_throughput", "--mode", "serve", "--batch", "$B",
             "--serving-precision", "$P"]),
        (5, ["python", "-m", "models.train", "--output-dir", "$OUT/x", "--seed", "1"]),
        (6, ["make", "run", "ARGS=--preset full --seed 1"]),
        (6, ["echo", "done"])]


@pytest.mark.parametrize("words, where", documented_commands())
def test_every_documented_command_runs_from_a_clone(words, where):
    problems = command_problems(words, where)
    assert not problems, "\n".join(problems)
