#!/usr/bin/env python3
"""Builds tally from what the Dockerfile's build stage would see, without a Docker engine.

The image's build has failed before because a compile-time input (web/static/, embedded by
rust-embed) was never copied into the build stage. This check makes that impossible to miss:

1. the build context is the files git tracks, minus what .dockerignore excludes (Docker's
   rules: Go's filepath.Match patterns plus `**`, a pattern that names a folder excludes
   everything below it, `!` re-includes, the last matching line wins);
2. an empty folder receives only what the build stage's COPY instructions take from that
   context (COPY --from=... is another stage and is skipped);
3. `cargo check --locked --bin tally` runs in that folder (the same compile-time inputs as
   the stage's `cargo build --release`: include_str!, rust-embed's folder, the targets
   Cargo.toml names), with the repository's target folder for the dependencies.

Usage: .ci/context_build.py [--keep]   (exit status is cargo's; --keep leaves the folder)
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_stage_copies(dockerfile):
    """(sources, dest) of each COPY in the first stage, and the stage's WORKDIR."""
    text = open(dockerfile).read().replace("\\\n", " ")
    copies, workdir, stage = [], "/", 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
            if stage > 1:
                break
        elif word == "WORKDIR":
            workdir = os.path.join(workdir, rest.strip())
        elif word in ("COPY", "ADD"):
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            *srcs, dest = args
            copies.append((srcs, os.path.join(workdir, dest)))
    return copies, workdir


def pattern_regex(pat):
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**", i):
            i += 2
            if pat.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pat.index("]", i)
            out += "[" + pat[i + 1 : j].replace("!", "^", 1) + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def ignore_rules(path):
    rules = []
    if not os.path.exists(path):
        return rules
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, pattern_regex(pat)))
    return rules


def excluded(rel, rules):
    """Whether the context leaves `rel` out: a rule matches the path or a folder above it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not negate
    return out


def main():
    keep = "--keep" in sys.argv
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    rules = ignore_rules(os.path.join(ROOT, ".dockerignore"))
    context = [f for f in files if f and not excluded(f, rules)]
    copies, workdir = build_stage_copies(os.path.join(ROOT, "Dockerfile"))

    stage = tempfile.mkdtemp(prefix="tally-context-")
    copied = 0
    for srcs, dest in copies:
        into_dir = dest.endswith("/") or len(srcs) > 1
        for src in srcs:
            src = os.path.normpath(src)
            for f in context:
                if src == "." or f.startswith(src + "/"):
                    # A folder: its contents go into dest.
                    target = os.path.join(dest, f if src == "." else f[len(src) + 1 :])
                elif f == src or pattern_regex(src).match(f):
                    # A file (or a glob's match): into dest/, or as dest itself.
                    glob = f != src
                    target = os.path.join(dest, os.path.basename(f)) if into_dir or glob else dest
                else:
                    continue
                out = os.path.join(stage, os.path.relpath(target, "/"))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, f), out)
                copied += 1
    build_dir = os.path.join(stage, os.path.relpath(workdir, "/"))
    print(f"context build: {copied} files of {len(context)} in the context, in {build_dir}")

    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    rc = subprocess.run(
        ["cargo", "check", "--locked", "--bin", "tally", "--quiet"], cwd=build_dir, env=env
    ).returncode
    if rc != 0:
        print(
            "context build FAILED: the Dockerfile's build stage lacks a compile-time input "
            "(a COPY line, or .dockerignore leaves it out)",
            file=sys.stderr,
        )
    if keep:
        print(f"kept {stage}")
    else:
        shutil.rmtree(stage, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
