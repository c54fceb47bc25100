"""`python -m npgpt.cache`: see and free the disk cache of frozen-prefix activations.

    python -m npgpt.cache ls                      # one line per entry: what it was made from (data
                                                  # file, model), depth, size, last use, in use;
                                                  # and any partial file a killed run left behind
    python -m npgpt.cache clear                   # remove every entry not in use
    python -m npgpt.cache clear --older-than 30   # ... not used for 30 days
    python -m npgpt.cache ls --cache-dir DIR

The folder is `--cache-dir`, else $NPGPT_CACHE_DIR, else ~/.cache/npgpt/prefix (see
`npgpt.prefix_cache`). Removing entries is always safe: a later run recomputes what it needs. A
run keeps the folder under its size cap (`train --cache-max`) by removing the entries used
longest ago; an entry a running job reads from disk is in use and is never removed.
"""
from __future__ import annotations

import time

from .. import prefix_cache
from ..fileio import process_alive
from . import make_parser


def build_parser():
    p = make_parser("python -m npgpt.cache", "List or clear the disk cache of frozen-prefix activations.")
    p.add_argument("command", choices=["ls", "clear"],
                   help="ls: list the entries; clear: remove them (all, or those not used for --older-than days)")
    p.add_argument("--cache-dir", default=None,
                   help="the cache folder (default: $NPGPT_CACHE_DIR or ~/.cache/npgpt/prefix)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="clear: only the entries last used more than DAYS days ago")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.older_than is not None and (args.command != "clear" or not args.older_than >= 0):
        parser.error("--older-than DAYS goes with clear, and DAYS must be a number >= 0")
    folder = prefix_cache.cache_folder(args.cache_dir or prefix_cache.default_dir())
    if args.command == "clear":
        older = None if args.older_than is None else args.older_than * 86400
        n, freed, busy = prefix_cache.clear(folder, older_than=older)
        which = "" if older is None else f" not used for {args.older_than:g} days"
        print(f"removed {_count(n)}{which} ({freed / 2**20:.1f} MiB) from {folder}"
              + (f"; kept {_count(busy)} in use by a running job" if busy else ""))
        return 0
    found = prefix_cache.entries(folder)
    total = sum(e["files_bytes"] for e in found)
    cap = prefix_cache.default_max_bytes(folder)
    print(f"{folder}: {_count(len(found))}, {total / 2**20:.1f} MiB (runs keep it under --cache-max, "
          f"by default {cap / 2**30:.1f} GiB, a tenth of its disk; least recently used go first)")
    for name, pid, size in prefix_cache.leftovers(folder):
        state = "being written by process" if pid is not None and process_alive(pid) else \
            "left by a stopped run (removed by the next run, or by `clear`), process"
        print(f"  {name}  {size / 2**20:.1f} MiB  partial: {state} {pid}")
    for e in reversed(found):                                # the most recently used first
        print("  " + describe(e))
    return 0


def describe(e: dict) -> str:
    """One entry in one line: key, what it was made from, depth, size, last use, in use."""
    if e.get("damaged"):
        return f"{e['key'][:16]}  damaged (removed on next use, or by `clear`)"
    made = e.get("made_from") or {}
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
    return (f"{e['key'][:16]}  data {made.get('data', '?')}  model {made.get('model', '?')}  "
            f"depth {e.get('depth')}  {e.get('rows')} tokens x {e.get('cols')}  "
            f"{e['files_bytes'] / 2**20:.1f} MiB  last used {used}" + ("  IN USE" if e.get("in_use") else ""))


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"
