"""Download files over HTTP(S) with urllib alone: progress bar, resume, size checks, atomic rename.

    dest.part   the bytes received so far; a later call resumes from its size (HTTP Range)
    dest        appears (by rename) only once every byte the server announced has arrived

So an interrupted or failed download never leaves a file that looks complete. Each URL is tried
in order (the first is the main source, the rest mirrors); within one URL, a dropped connection
is retried from where it stopped.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request

from .errors import FormatError, NpgptError
from .fileio import replace_durably, sha256_file
from .progress import bar

CHUNK = 1 << 20
USER_AGENT = "npgpt (python urllib)"


class _Failed(Exception):
    """This URL did not work; `retry` tells whether trying it again may help."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


def _content_range(value: str | None):
    """'bytes 100-199/1000' -> (100, 199, 1000); total None for '*'."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def _fetch_once(url: str, part: str, expected_size, progress: bool, timeout: float) -> int:
    """One HTTP request: append to (or restart) `part`. Returns the bytes written by this request;
    raises _Failed unless `part` is then complete."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:       # the part file is not a prefix of this file: start over
            os.remove(part)
            raise _Failed("the partial file did not match (HTTP 416); restarting", retry=True) from None
        raise _Failed(f"HTTP {e.code} {e.reason}", retry=e.code >= 500 or e.code == 429) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        # no such host, or nothing listening: trying again at once will not help, a mirror may
        unreachable = isinstance(reason, (socket.gaierror, ConnectionRefusedError))
        raise _Failed(f"{type(reason).__name__}: {reason}", retry=not unreachable) from None

    with resp:
        start, total = _where_it_starts(resp, part, have, expected_size)
        written = 0
        with open(part, "ab" if start else "wb") as f, \
                bar(enabled=progress, total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=os.path.basename(part[:-len(".part")])) as shown:
            try:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    written += len(chunk)
                    shown.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise _Failed(f"connection lost after {start + written} bytes ({type(e).__name__}: {e})",
                              retry=True) from None
            finally:
                f.flush()
                os.fsync(f.fileno())
    size = start + written
    if total is not None and size != total:
        raise _Failed(f"connection closed after {size} of {total} bytes", retry=True)
    if expected_size is not None and size != expected_size:
        os.remove(part)
        raise _Failed(f"received {size} bytes, expected {expected_size}", retry=False)
    return written


def _where_it_starts(resp, part, have, expected_size):
    """(the byte the response's body starts at, the file's whole size or None) from a response to
    a request for the bytes from `have` on; _Failed for an answer that does not fit."""
    if resp.status == 206 and have:
        cr = _content_range(resp.headers.get("Content-Range"))
        if cr is None or cr[0] != have:
            os.remove(part)
            raise _Failed(f"server answered a resume with Content-Range {resp.headers.get('Content-Range')!r}; "
                          "restarting", retry=True)
        start, total = have, cr[2]
    elif resp.status == 200:
        start = 0                        # a server that ignores Range sends the whole file again
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    else:
        raise _Failed(f"unexpected HTTP status {resp.status}", retry=False)
    if total is not None and expected_size is not None and total != expected_size:
        raise _Failed(f"server announces {total} bytes, expected {expected_size}", retry=False)
    return start, total


def download_file(urls, dest, expected_size: int | None = None, progress: bool = True, *,
                  timeout: float = 60.0, attempts: int = 3, retry_wait: float = 1.0,
                  hint: str | None = None) -> str:
    """Download the first URL of `urls` (one URL or a list) that works to `dest`; return dest.

    A dest that already exists (with expected_size, if given) is taken as complete: files only
    get their final name once complete. Bytes go to `dest.part` first and are checked against the
    size the server announced (Content-Length, or Content-Range when resuming) and expected_size.
    A dropped connection is resumed with an HTTP Range request (up to `attempts` tries in a row
    without progress); a server that does not honour Range restarts the file cleanly.
    Failure raises NpgptError naming each URL and the reason, plus `hint` (what to do instead)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = os.fspath(dest)
    if os.path.isfile(dest):
        if expected_size is None or os.path.getsize(dest) == expected_size:
            return dest
        os.remove(dest)                  # the wrong size: not the file we want
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    failures = []
    for url in urls:
        if not re.match(r"https?://", url):
            failures.append(f"{url}: not an http(s) URL")
            continue
        tries = stalled = 0
        while True:
            before = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                _fetch_once(url, part, expected_size, progress, timeout)
                replace_durably(part, dest)
                return dest
            except _Failed as e:
                reason, retry = str(e), e.retry
            except OSError as e:                             # writing failed (disk full, permissions)
                raise NpgptError(f"cannot write {part}: {e}") from None
            after = os.path.getsize(part) if os.path.exists(part) else 0
            tries += 1
            stalled = 0 if after > before else stalled + 1   # a try that got further does not count
            if not retry or stalled >= attempts or tries >= 100 * attempts:
                failures.append(f"{url}: {reason}")
                break
            time.sleep(retry_wait)
    hint = hint or f"download it by other means and save it as {dest}"
    raise NpgptError(f"could not download {os.path.basename(dest)} ({'; '.join(failures)}); {hint}")


def check_sha256(path, expected: str, remove: bool = True) -> None:
    """Raise FormatError if the file's sha256 differs (removing the file, so a rerun fetches it again)."""
    actual = sha256_file(path)
    if actual != expected:
        if remove:
            os.remove(path)
        raise FormatError(f"{path}: sha256 {actual} does not match the published {expected}"
                          + ("; removed it, run again to download it afresh" if remove else ""))
