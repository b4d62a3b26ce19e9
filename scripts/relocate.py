"""Rewrite OLD to NEW in every file and symlink under ROOT (`make install`, scripts/install.sh).

A venv names its own path in the scripts' shebangs, pyvenv.cfg and the activate scripts;
a venv built at a staging path (DESTDIR) must name its final path instead. Byte-code is
removed before this runs and compiled afterwards, so a binary file (a NUL byte) that
still names OLD is an error, not something to patch.

usage: python relocate.py ROOT OLD NEW
"""

import os
import sys


def relocate(root: str, old: str, new: str) -> list[str]:
    """Rewrites in place (mode kept); returns the binary files that name `old`."""
    old_b, new_b = os.fsencode(old), os.fsencode(new)
    binary = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                target = os.readlink(path)
                if old in target:
                    os.unlink(path)
                    os.symlink(target.replace(old, new), path)
                continue
            if name in dirnames:
                continue
            with open(path, "rb") as f:
                data = f.read()
            if old_b not in data:
                continue
            if b"\0" in data:
                binary.append(path)
                continue
            with open(path, "r+b") as f:
                f.write(data.replace(old_b, new_b))
                f.truncate()
    return binary


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    binary = relocate(argv[1], argv[2], argv[3])
    for path in binary:
        print(f"relocate: binary file names {argv[2]}: {path}", file=sys.stderr)
    return 1 if binary else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
