"""Hostile configuration files through the real command line (issue 9, defect 2).

Every file below is refused by `sockscope check-config FILE` (and, for web config files,
by `sockscope run --web.config.file FILE` at start) run as a subprocess: exit status 2,
the key concerned (or the file rule that was broken) named, no traceback, under 2 s, and
a peak RSS under 150 MiB. Before the loader limits, these files crashed with a traceback
(exit 1), froze for 37 s and 2.2 GB (an alias bomb), hung on a FIFO or read /dev/zero
until memory ran out.

The cases are generated from a fixed seed (reproducible; the id names each one): the
issue's own cases, then per key of the schema a constructor error under a random tag, a
mapping, a non-finite and a 61-digit number, then deep nesting mixes, alias and merge
bombs, huge strings, binary, byte order marks, duplicate and odd keys, syntax errors and
special files. A child's memory is also capped (RLIMIT_AS 1 GiB) so that a regression
fails here instead of taking the machine's memory. Two children run at a time, with
OPENBLAS_NUM_THREADS=1: the command line imports numpy, whose OpenBLAS otherwise starts a
thread per core in every child (0.36 s of CPU per run instead of 0.2 s, measured here).
"""

from __future__ import annotations

import os
import random
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sockscope import config
from support.daemon import free_port

SEED = 9
MAX_SECONDS = 2.0
MAX_RSS_KIB = 150 * 1024
AS_LIMIT = 1 << 30  # bytes of address space per child: a safety net, far above its ~35 MiB
KILL_AFTER = 15.0  # seconds; a hung child is killed and the case fails

KEYS = config.KEY_PATHS


@dataclass(frozen=True)
class Case:
    name: str
    content: bytes | None  # None: `make` builds the path (special files)
    expect: str  # a fragment of the output: the key path, or the rule the file broke
    make: str | None = None  # "fifo", "dev_zero", "directory", ...


def yaml_at(key: str, value: str) -> str:
    """A document setting the key path `section.key` to the YAML text `value`."""
    section, name = key.split(".")
    return f"{section}:\n  {name}: {value}\n"


def _bomb(levels: int, width: int, word: str = "lol") -> str:
    lines = [f"  b0: &b0 [{', '.join([word] * width)}]"]
    lines += [f"  b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, levels)]
    return "anchors:\n" + "\n".join(lines) + "\n"


def _nesting(rng: random.Random, depth: int) -> str:
    opening, closing = [], []
    for _ in range(depth):
        if rng.random() < 0.5:
            opening.append(rng.choice(["[", "[ ", "[x, "]))
            closing.append("]")
        else:
            opening.append(rng.choice(["{a: ", "{k: ", "{? "]))
            closing.append("}")
    return "".join(opening) + "1" + "".join(reversed(closing))


TAGGED_BAD = [  # each fails while YAML constructs the value, whatever the key
    "!!bool maybe", "!!bool 2", "!!int abc", "!!int 1.5", "!!float x", "!!float 1e", "!!binary 'zz!'",
    "!!timestamp nope", "!!timestamp 2020-13-45", "!!set [a, b]", "!!omap {a: 1}", "!!omap [a]",
    "!!pairs x", "!!python/tuple [1]", "!!python/object/apply:os.system ['true']", "!foo bar",
    "!<tag:example.com,2000:x> y", "!!map [1]", "!!seq {a: 1}", "!!str [1]",
    "!!int " + "9" * 5000, "!!int 1" + ":1" * 3000, "!!float " + "1" * 200 + ".5",
]


def generate() -> list[Case]:
    rng = random.Random(SEED)
    cases: list[Case] = []
    seen: set[bytes] = set()

    def add(name: str, text: str | bytes, expect: str) -> None:
        content = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        if content not in seen:  # random choices may repeat a file
            seen.add(content)
            cases.append(Case(name, content, expect))

    # -- the issue's own cases
    add("issue-bool-maybe", yaml_at("poll.kernel_stats", "!!bool 'maybe'"), "poll.kernel_stats: line 2")
    add("issue-int-abc", yaml_at("poll.dump_retries", "!!int 'abc'"), "poll.dump_retries: line 2")
    add("issue-5000-digits", yaml_at("poll.dump_retries", "9" * 5000), "poll.dump_retries: line 2")
    add("issue-1000-brackets", yaml_at("poll.families", "[" * 1000 + "]" * 1000), "maximum nesting depth")
    add("issue-alias-bomb-as-value", _bomb(9, 9) + "poll:\n  netns: *b8\n", "expands to more than 20,000 nodes")
    add("issue-netns-surrogate", yaml_at("poll.netns", '"\\ud800"'), "line 2")
    add("issue-netns-newline", yaml_at("poll.netns", '"blue\\n"'), "poll.netns: ")
    add("issue-interval-1ms", yaml_at("poll.interval", "1ms"), "poll.interval: '1ms' is too short")
    add("issue-stale-400-digits", yaml_at("poll.stale_after", "9" * 400 + "s"), "poll.stale_after: ")
    add("issue-arabic-digit", yaml_at("poll.interval", "\u0665s"), "poll.interval: ")
    add("issue-bcrypt-in-wrong-file", "basic_auth_users:\n  u: $2b$99$x\n", "basic_auth_users: unknown key")

    # -- per key: a constructor error under a random tag, a mapping, inf, a 61-digit number
    for key in KEYS:
        tagged = rng.choice(TAGGED_BAD)
        add(f"tag-{key}-{tagged.split()[0]}", yaml_at(key, tagged), f"{key}: line 2")
        add(f"mapping-{key}", yaml_at(key, "{a: 1}"), f"{key}: expected")
        add(f"inf-{key}", yaml_at(key, rng.choice([".inf", "-.inf", ".nan", "1.0e+400"])), f"{key}: ")
        if rng.random() < 0.5:
            add(f"huge-int-{key}", yaml_at(key, str(10 ** 60 + rng.randrange(10 ** 59))), f"{key}: ")

    # -- deep nesting mixes (flow and block), just past the limit and far past it
    for i in range(12):
        depth = rng.choice([33, 40, 100, 500, 3000])
        key = rng.choice(KEYS)
        add(f"deep-flow-{i}-{depth}", yaml_at(key, _nesting(rng, depth)), "deep")
    for i in range(4):
        depth = rng.choice([33, 60, 200])
        text = "poll:\n" + "".join("  " * (level + 1) + f"k{level}:\n" for level in range(depth)) + "  " * depth + "  x\n"
        add(f"deep-block-{i}-{depth}", text, "nested more than 32 levels deep")
    add("deep-anchored", "a: &a " + "[" * 31 + "1" + "]" * 31 + "\npoll: {netns: [*a]}\n", "nested more than 32 levels")

    # -- alias and merge bombs of several shapes, under random keys
    for i in range(10):
        levels, width = rng.choice([(9, 9), (6, 20), (4, 200), (3, 2000), (20, 2), (15, 3)])
        key = rng.choice(KEYS)
        add(f"bomb-{i}-{levels}x{width}", _bomb(levels, width) + yaml_at(key, f"*b{levels - 1}"),
            "expands to more than 20,000 nodes")
    merge = "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n"
    merge += "".join(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 8)}]}}\n" for i in range(1, 9))
    add("merge-bomb", merge + "poll: {<<: *m8}\n", "expands to more than 20,000 nodes")
    add("recursive-alias", "poll: &a {netns: *a}\n", "poll.netns: line 1")
    add("recursive-list", "ports: {local: &l [1, [2, *l]]}\n", "ports.local[1][1]: line 1")
    add("undefined-alias", "poll: {netns: *nope}\n", "found undefined alias")
    add("many-aliases", "a: &a x\nports:\n  local: [" + ", ".join(["*a"] * 30000) + "]\n",
        "expands to more than 20,000 nodes")
    add("merge-scalar", "poll:\n  <<: 5\n", "poll: line 2")
    add("merge-list-of-scalars", "poll:\n  <<: [1, 2]\n", "poll: line 2")
    add("merge-brings-unknown", "x: &x {intervall: 1s}\npoll:\n  <<: *x\n", "poll.intervall: unknown key")
    add("many-keys", "poll:\n" + "".join(f"  k{i}: {i}\n" for i in range(25000)), "expands to more than")

    # -- huge strings and numbers
    for i in range(10):
        key = rng.choice(KEYS)
        size = rng.choice([10_000, 300_000, 1_000_000])
        char = rng.choice(["a", "9", "\u00e9", " x", "."])
        add(f"huge-string-{i}-{key}-{size}", yaml_at(key, '"' + char * (size // len(char.encode())) + '"'), f"{key}: ")
    add("huge-plain-scalar", yaml_at("poll.netns", "n" * 1_000_000), "poll.netns: ")
    add("sexagesimal-int", yaml_at("poll.interval", "1" + ":1" * 400_000), "poll.interval: line 2")
    add("long-key", "poll:\n  " + "k" * 1000 + ": 1\n", "poll.'kkkk")
    add("too-long-key", "poll:\n  " + "k" * 500_000 + ": 1\n", "YAML syntax error")  # 1,024 at most in YAML
    add("big-file", "# padding\n" * 120_000, "larger than the limit")

    # -- not UTF-8 text: binary, byte order marks of other encodings
    for i in range(8):
        garbage = bytes(rng.randrange(256) for _ in range(rng.choice([16, 1000, 100_000])))
        add(f"binary-{i}", b"\xff" + garbage, "not UTF-8 text")
    body = "poll:\n  interval: 5s\n"
    for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        add(f"bom-{codec}", body.encode(codec) if codec in ("utf-16", "utf-32") else b"\xff\xfe" + body.encode(codec),
            "not UTF-8 text")
    add("bom-utf8-bad-key", b"\xef\xbb\xbfpoll:\n  intervall: 5s\n", "poll.intervall: unknown key")
    add("nul-byte", b"poll:\n  netns: a\x00b\n", "invalid YAML")
    add("control-char", b"log:\n  level: \x07\n", "invalid YAML")

    # -- keys: duplicates, odd types, odd characters
    add("dup-top", "poll: {}\npoll: {}\n", "poll: line 2")
    add("dup-section", "poll:\n  interval: 5s\n  interval: 1s\n", "poll.interval: line 3")
    add("dup-in-flow", "poll: {interval: 5s, interval: 5s}\n", "poll.interval: line 1")
    add("key-list", "poll:\n  ? [a]\n  : 1\n", "poll: line 2")
    add("key-map", "poll:\n  ? {a: 1}\n  : 1\n", "poll: line 2")
    add("key-int", "poll:\n  5: 1\n", "poll.5: unknown key")
    add("key-null", "poll:\n  ~: 1\n", "poll.null: unknown key")
    add("key-newline", 'poll:\n  "a\\nb": 1\n', "poll.'a\\nb': unknown key")
    add("key-bool-section", "true: 1\n", "true: unknown key")
    add("top-level-list", "- poll\n", "top level: expected a mapping")
    add("top-level-scalar", "just text\n", "top level: expected a mapping")

    # -- syntax errors
    for name, text in [("tab-indent", "poll:\n\tinterval: 5s\n"), ("unclosed-flow", "poll: {interval: 5s\n"),
                       ("unclosed-quote", 'poll:\n  netns: "abc\n'), ("two-documents", "poll: {}\n---\nlog: {}\n"),
                       ("bad-indent", "poll:\n  interval: 5s\n   timeout: 1s\n"), ("colon-only", ":\n"),
                       ("bad-escape", yaml_at("poll.netns", '"\\q"')), ("anchor-twice", "a: &x 1\nb: &x 2\n"),
                       ("directive", "%YAML 9.9\n---\npoll: {}\n"), ("truncated", "poll:\n  families: [ipv4,")]:
        add(f"syntax-{name}", text, "YAML")

    # -- special files (made in the case's directory)
    for make, expect in [("fifo", "a FIFO, not a regular file"), ("dev_zero", "a character device, not a regular file"),
                         ("dev_null", "a character device, not a regular file"),
                         ("directory", "a directory, not a regular file"), ("socket", "cannot read file: "),
                         ("missing", "cannot read file: No such file or directory"),
                         ("dangling", "cannot read file: No such file or directory"),
                         ("sparse_2g", "larger than the limit")]:
        cases.append(Case(f"special-{make}", None, expect, make))
    return cases


CASES = generate()


def _make(case: Case, directory: Path, holders: list) -> Path:
    path = directory / (re.sub(r"[^A-Za-z0-9._-]", "_", case.name)[:80] + ".yaml")
    if case.make is None:
        path.write_bytes(case.content)
    elif case.make == "fifo":
        os.mkfifo(path)
    elif case.make == "dev_zero":
        path.symlink_to("/dev/zero")
    elif case.make == "dev_null":
        path = Path("/dev/null")
    elif case.make == "directory":
        path.mkdir()
    elif case.make == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        holders.append(listener)
    elif case.make == "missing":
        pass
    elif case.make == "dangling":
        path.symlink_to(directory / "nowhere")
    elif case.make == "sparse_2g":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    return path


@dataclass
class Outcome:
    status: int
    output: str
    seconds: float
    max_rss_kib: int


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_cli(*argv: str) -> Outcome:
    """`python -m sockscope ARGV` with its wall time and peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "sockscope", *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_limit_memory,
                                env=os.environ | {"OPENBLAS_NUM_THREADS": "1"})
        killer = threading.Timer(KILL_AFTER, proc.kill)
        started = time.monotonic()
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        return Outcome(proc.returncode, out.read().decode("utf-8", "replace"), seconds, usage.ru_maxrss)


def _check(case: Case, what: str, outcome: Outcome) -> list[str]:
    problems = []
    if outcome.status != 2:
        problems.append(f"exit status {outcome.status}")
    if "Traceback" in outcome.output:
        problems.append("a traceback")
    if case.expect not in outcome.output:
        problems.append(f"{case.expect!r} not named")
    if outcome.seconds >= MAX_SECONDS:
        problems.append(f"took {outcome.seconds:.2f}s")
    if outcome.max_rss_kib >= MAX_RSS_KIB:
        problems.append(f"peak RSS {outcome.max_rss_kib // 1024} MiB")
    if case.name.startswith("issue-") and len(outcome.output.strip().splitlines()) != 2:
        problems.append("not exactly one problem line")
    if problems:
        return [f"{case.name} ({what}): {', '.join(problems)}\n    {outcome.output[:400]!r}"]
    return []


def test_there_are_enough_cases():
    assert len(CASES) >= 200
    assert len({re.sub(r"[^A-Za-z0-9._-]", "_", c.name)[:80] for c in CASES}) == len(CASES)


def test_every_hostile_config_file_is_refused_by_check_config(tmp_path):
    holders: list = []
    paths = [_make(case, tmp_path, holders) for case in CASES]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda p: run_cli("check-config", str(p)), paths))
    took = time.monotonic() - started
    for listener in holders:
        listener.close()
    failures = [f for case, outcome in zip(CASES, outcomes) for f in _check(case, "check-config", outcome)]
    seconds = sorted(o.seconds for o in outcomes)
    rss = sorted(o.max_rss_kib for o in outcomes)
    print(f"\n{len(CASES)} files in {took:.1f}s; per file median {seconds[len(seconds) // 2]:.2f}s, "
          f"max {seconds[-1]:.2f}s; peak RSS median {rss[len(rss) // 2] // 1024} MiB, max {rss[-1] // 1024} MiB")
    assert not failures, f"{len(failures)} of {len(CASES)} files:\n" + "\n".join(failures)


WEB_CASES = [
    Case("web-bool-maybe", b"tls_server_config: !!bool maybe\n", "tls_server_config: line 1"),
    Case("web-binary-hash", b"basic_auth_users:\n  u: !!binary 'zz!'\n", "basic_auth_users.u: line 2"),
    Case("web-cost-99", b"basic_auth_users:\n  u: $2b$99$" + b"a" * 53 + b"\n", "basic_auth_users.u: bcrypt cost 99"),
    Case("web-short-hash", b"basic_auth_users:\n  u: $2b$10$abc\n", "basic_auth_users.u: not a bcrypt hash"),
    Case("web-alias-bomb", (_bomb(9, 9) + "basic_auth_users: *b8\n").encode(), "expands to more than 20,000 nodes"),
    Case("web-deep", ("basic_auth_users: " + "[" * 1000 + "]" * 1000 + "\n").encode(), "maximum nesting depth"),
    Case("web-cert-fifo", b"tls_server_config:\n  cert_file: cert.fifo\n  key_file: cert.fifo\n",
         "tls_server_config.cert_file: "),
    Case("web-cert-dev-zero", b"tls_server_config:\n  cert_file: /dev/zero\n  key_file: /dev/zero\n",
         "a character device, not a regular file"),
    Case("web-binary", b"\xff\xfe\x00garbage", "not UTF-8 text"),
    Case("web-fifo", None, "a FIFO, not a regular file", "fifo"),
    Case("web-dev-zero", None, "a character device, not a regular file", "dev_zero"),
    Case("web-huge", b"#" * ((1 << 20) + 10), "larger than the limit"),
]


def test_hostile_web_config_files_stop_the_daemon_at_start(tmp_path):
    os.mkfifo(tmp_path / "cert.fifo")
    good = tmp_path / "sockscope.yaml"
    good.write_text(f"poll:\n  interval: 1s\nprometheus:\n  listen_address: 127.0.0.1:{free_port()}\n")
    holders: list = []
    paths = [_make(case, tmp_path, holders) for case in WEB_CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(
            lambda p: run_cli("run", "--config.file", str(good), "--web.config.file", str(p)), paths))
    failures = [f for case, outcome in zip(WEB_CASES, outcomes) for f in _check(case, "run", outcome)]
    assert not failures, "\n".join(failures)
