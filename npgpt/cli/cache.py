"""`python -m npgpt.cache`: see and free the disk cache of frozen-prefix activations.

    python -m npgpt.cache ls              # one line per entry: key, depth, tokens, size, date;
                                          # and any partial file a killed run left behind
    python -m npgpt.cache clear           # remove every entry
    python -m npgpt.cache ls --cache-dir DIR

The folder is `--cache-dir`, else $NPGPT_CACHE_DIR, else ~/.cache/npgpt/prefix (see
`npgpt.prefix_cache`). Removing entries is always safe: a later run recomputes what it needs.
"""
from __future__ import annotations

from .. import prefix_cache
from ..fileio import process_alive
from . import make_parser


def build_parser():
    p = make_parser("python -m npgpt.cache", "List or clear the disk cache of frozen-prefix activations.")
    p.add_argument("command", choices=["ls", "clear"], help="ls: list the entries; clear: remove them all")
    p.add_argument("--cache-dir", default=None,
                   help="the cache folder (default: $NPGPT_CACHE_DIR or ~/.cache/npgpt/prefix)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    folder = prefix_cache.cache_folder(args.cache_dir or prefix_cache.default_dir())
    if args.command == "clear":
        n, freed = prefix_cache.clear(folder)
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} ({freed / 2**20:.1f} MiB) from {folder}")
        return 0
    found = prefix_cache.entries(folder)
    total = sum(e["files_bytes"] for e in found)
    print(f"{folder}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}, {total / 2**20:.1f} MiB")
    for name, pid, size in prefix_cache.leftovers(folder):
        state = "being written by process" if pid is not None and process_alive(pid) else \
            "left by a stopped run (removed by the next run, or by `clear`), process"
        print(f"  {name}  {size / 2**20:.1f} MiB  partial: {state} {pid}")
    for e in found:
        if e.get("damaged"):
            print(f"  {e['key'][:16]}  damaged (removed on next use, or by `clear`)")
            continue
        print(f"  {e['key'][:16]}  depth {e.get('depth')}  {e.get('mode')}  {e.get('sequences')} sequences  "
              f"{e.get('rows')} tokens x {e.get('cols')}  {e['files_bytes'] / 2**20:.1f} MiB  {e.get('created')}")
    return 0

