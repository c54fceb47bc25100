"""The downloader against a local HTTP server on 127.0.0.1 (started here, in a thread): plain,
interrupted-and-resumed, 404, truncated, mirror fallback, and the whole `download 124M` flow with
the tiny TensorFlow checkpoint served in place of OpenAI's files, and `--source hf` with the real
tokenizer served as Hugging Face's vocab.json and merges.txt."""
import http.server
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from npgpt.download import check_sha256, download_file, sha256_file
from npgpt.errors import FormatError, NpgptError
from npgpt.params import load_params
from npgpt.tfcheckpoint import load_gpt2_tf
from npgpt.tokenizer import find_bpe_dir, get_tokenizer
from npgpt.weights import OPENAI_FILES, TOKENIZER_SHA256, download

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_tf_checkpoint"
FAST = dict(timeout=5, retry_wait=0, progress=False)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}. server.modes {path: mode} changes how:
    'drop_once'  first response announces the full length, sends half, closes; Range honoured after
    'truncate'   every response announces the full length and sends half (Range ignored)
    'no_range'   Range ignored: always 200 with the whole file
    'from_zero'  a Range request is answered 206 with the whole file and Content-Range 0-"""

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            count = sum(1 for p, _ in srv.requests if p == path)
        body = srv.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        mode = srv.modes.get(path, "normal")
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and mode == "from_zero":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
        elif m and mode in ("normal", "drop_once"):
            start = int(m.group(1))
            if start >= len(body):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if mode == "truncate" or (mode == "drop_once" and count == 1):
            payload = payload[:len(payload) // 2]          # then the connection closes
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.modes, srv.requests, srv.lock = {}, {}, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/file.bin"


def payload(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_plain_download(server, tmp_path):
    server.files["/f.bin"] = data = payload()
    dest = tmp_path / "sub" / "f.bin"
    assert download_file(server.url + "/f.bin", dest, expected_size=len(data), **FAST) == str(dest)
    assert dest.read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    assert server.requests == [("/f.bin", None)]


def test_existing_file_is_skipped(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"already here")
    download_file(server.url + "/f.bin", dest, **FAST)
    assert server.requests == [] and dest.read_bytes() == b"already here"
    server.files["/f.bin"] = b"the real file"
    download_file(server.url + "/f.bin", dest, expected_size=13, **FAST)     # wrong size: fetched again
    assert dest.read_bytes() == b"the real file"


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["/f.bin"] = data = payload()
    server.modes["/f.bin"] = "drop_once"
    dest = tmp_path / "f.bin"
    download_file(server.url + "/f.bin", dest, **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(data) // 2}-")]


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    server.files["/f.bin"] = data = payload()
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:1000])
    download_file(server.url + "/f.bin", dest, **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=1000-")]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/f.bin"] = data = payload()
    server.modes["/f.bin"] = "no_range"
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"garbage that is not a prefix")
    download_file(server.url + "/f.bin", dest, **FAST)
    assert dest.read_bytes() == data


def test_resume_answered_from_the_start_restarts_cleanly(server, tmp_path):
    # a 206 whose Content-Range does not start where the part file ends must not be appended
    server.files["/f.bin"] = data = payload()
    server.modes["/f.bin"] = "from_zero"
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:1000])
    download_file(server.url + "/f.bin", dest, **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=1000-"), ("/f.bin", None)]


def test_part_longer_than_the_file_restarts(server, tmp_path):
    server.files["/f.bin"] = data = payload(1000)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(bytes(5000))
    download_file(server.url + "/f.bin", dest, **FAST)                    # 416, then from scratch
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=5000-"), ("/f.bin", None)]


def test_404_is_one_clear_error_and_no_file(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(NpgptError) as e:
        download_file(server.url + "/missing.bin", dest, hint="put it in X by hand", **FAST)
    msg = str(e.value)
    assert "\n" not in msg
    assert server.url + "/missing.bin" in msg and "HTTP 404" in msg and msg.endswith("put it in X by hand")
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
    assert len(server.requests) == 1                                       # a 404 is not retried


def test_truncated_body_is_an_error_and_nothing_looks_complete(server, tmp_path):
    server.files["/f.bin"] = data = payload()
    server.modes["/f.bin"] = "truncate"
    dest = tmp_path / "f.bin"
    with pytest.raises(NpgptError, match=rf"connection closed after {len(data) // 2} of {len(data)} bytes"):
        download_file(server.url + "/f.bin", dest, attempts=3, **FAST)
    assert not dest.exists()
    assert len(server.requests) == 3 + 1        # the first try got further, then 3 tries without progress
    assert (tmp_path / "f.bin.part").stat().st_size < len(data)


def test_announced_size_differs_from_expected(server, tmp_path):
    server.files["/f.bin"] = payload(100)
    with pytest.raises(NpgptError, match="announces 100 bytes, expected 99"):
        download_file(server.url + "/f.bin", tmp_path / "f.bin", expected_size=99, **FAST)
    assert not (tmp_path / "f.bin").exists()


def test_mirror_fallback(server, tmp_path):
    server.files["/mirror/f.bin"] = data = payload(5000)
    urls = [server.url + "/main/f.bin", closed_port_url(), "ftp://example.invalid/f.bin",
            server.url + "/mirror/f.bin"]
    download_file(urls, tmp_path / "f.bin", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    with pytest.raises(NpgptError) as e:
        download_file(urls[:3], tmp_path / "g.bin", **FAST)
    for url in urls[:3]:
        assert url in str(e.value)


def test_sha256_check_removes_a_wrong_file(tmp_path):
    p = tmp_path / "encoder.json"
    p.write_bytes(b"{}")
    assert sha256_file(p) == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    check_sha256(p, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")
    with pytest.raises(FormatError, match="encoder.json: sha256 .* does not match"):
        check_sha256(p, TOKENIZER_SHA256["encoder.json"])
    assert not p.exists()


# ----------------------------------------------------------------------------- the whole flow

def serve_openai_layout(server, shared_data, size="124M", prefix=""):
    """OpenAI's seven files for one size: the tiny checkpoint, the real tokenizer files."""
    for name in OPENAI_FILES:
        src = shared_data / "gpt2_bpe" / name if name in TOKENIZER_SHA256 else FIXTURE / name
        server.files[f"{prefix}/{size}/{name}"] = src.read_bytes()


def test_download_124m_flow_ends_in_a_loadable_h5(server, shared_data, tmp_path):
    serve_openai_layout(server, shared_data)
    server.modes["/124M/model.ckpt.data-00000-of-00001"] = "drop_once"
    out = download("124M", weights_dir=tmp_path / "weights", base_url=server.url, **FAST)
    assert out == str(tmp_path / "weights" / "gpt2-124M.h5")
    for name in OPENAI_FILES:
        assert (tmp_path / "weights" / "124M" / name).read_bytes() == server.files[f"/124M/{name}"]
    params, config, meta = load_params(out)
    ref, ref_config = load_gpt2_tf(FIXTURE)
    assert config == ref_config and meta["source"] == "openai-tf"
    for name in ref:
        np.testing.assert_array_equal(params[name], ref[name], err_msg=name)
    n = len(server.requests)
    download("124M", weights_dir=tmp_path / "weights", base_url=server.url, **FAST)
    assert len(server.requests) == n                                   # every file already complete


def test_download_flow_rejects_a_wrong_tokenizer_file(server, shared_data, tmp_path):
    serve_openai_layout(server, shared_data)
    server.files["/124M/vocab.bpe"] = b"#version: 0.2\n"
    with pytest.raises(FormatError, match="vocab.bpe: sha256"):
        download("124M", weights_dir=tmp_path, base_url=server.url, **FAST)
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert not (tmp_path / "gpt2-124M.h5").exists()


HF_BASE_PATH = "/openai-community/gpt2-medium/resolve/main"
SENTENCE = "Hugging Face's merges.txt, made into OpenAI's vocab.bpe: the same ranks \u00e9\u4e2d!"


def serve_hf_tokenizer(server, bpe_dir, merges_txt=None):
    """GPT-2's tokenizer as Hugging Face's vocab.json and merges.txt, written differently from
    OpenAI's encoder.json and vocab.bpe: the JSON compact, UTF-8, its keys in reverse id order;
    the merges with CRLF line ends and no newline at the end."""
    encoder = json.loads((pathlib.Path(bpe_dir) / "encoder.json").read_bytes())
    vocab = dict(reversed(list(encoder.items())))
    server.files[HF_BASE_PATH + "/vocab.json"] = json.dumps(vocab, separators=(",", ":"),
                                                            ensure_ascii=False).encode()
    merges = (pathlib.Path(bpe_dir) / "vocab.bpe").read_bytes().rstrip(b"\n").replace(b"\n", b"\r\n")
    server.files[HF_BASE_PATH + "/merges.txt"] = merges if merges_txt is None else merges_txt(merges)


def serve_hf_model(server, tmp_path):
    """A tiny random GPT-2 as Hugging Face's model.safetensors and config.json; its npgpt params."""
    from safetensors.numpy import save_file
    from test_safetensors import hf_gpt2_arrays
    hf, ours = hf_gpt2_arrays(prefix="transformer.")
    save_file(hf, str(tmp_path / "src.safetensors"))
    server.files[HF_BASE_PATH + "/model.safetensors"] = (tmp_path / "src.safetensors").read_bytes()
    server.files[HF_BASE_PATH + "/config.json"] = b'{"n_head": 4, "n_embd": 64}'
    return ours


def test_download_hf_flow(server, tmp_path, bpe_dir, tok, monkeypatch):
    from test_safetensors import CONFIG
    ours = serve_hf_model(server, tmp_path)
    serve_hf_tokenizer(server, bpe_dir)
    assert server.files[HF_BASE_PATH + "/merges.txt"] != (pathlib.Path(bpe_dir) / "vocab.bpe").read_bytes()
    out = download("355M", source="hf", weights_dir=tmp_path / "w", base_url=closed_port_url()[:-9],
                   mirror=server.url, **FAST)
    params, config, meta = load_params(out)
    assert out.endswith("gpt2-355M.h5") and config == CONFIG and meta["source"] == "hf-safetensors"
    for name in ours:
        np.testing.assert_array_equal(params[name], ours[name], err_msg=name)
    # the tokenizer: OpenAI's two files byte for byte, where every run looks for them
    folder = tmp_path / "w" / "355M"
    for name in TOKENIZER_SHA256:
        assert (folder / name).read_bytes() == (pathlib.Path(bpe_dir) / name).read_bytes(), name
    monkeypatch.delenv("NPGPT_BPE_DIR", raising=False)
    assert find_bpe_dir(weights_dir=tmp_path / "w") == str(folder)
    ids = get_tokenizer(folder).encode(SENTENCE)
    assert ids == tok.encode(SENTENCE) and len(ids) > 10
    # a rerun with OpenAI's files in place fetches no tokenizer file, even when HF's are gone
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    n = len(server.requests)
    download("355M", source="hf", weights_dir=tmp_path / "w", base_url=server.url, force=True, **FAST)
    assert server.requests[n:] == []
    # converted to an .h5 elsewhere (--out), the tokenizer goes beside it too
    elsewhere = download("355M", source="hf", weights_dir=tmp_path / "w", out=tmp_path / "other" / "gpt2.h5",
                         base_url=server.url, **FAST)
    for name in TOKENIZER_SHA256:
        assert (pathlib.Path(elsewhere).parent / name).read_bytes() == (pathlib.Path(bpe_dir) / name).read_bytes()


def test_download_hf_rejects_a_changed_merge(server, tmp_path, bpe_dir):
    """One merge of merges.txt changed: one line naming the file and what to do; no encoder.json
    or vocab.bpe written (not even the correct encoder.json), no .h5, the bad file removed."""
    serve_hf_model(server, tmp_path)
    serve_hf_tokenizer(server, bpe_dir, merges_txt=lambda m: m.replace("\r\n\u0120t he\r\n".encode(),
                                                                      "\r\n\u0120th e\r\n".encode(), 1))
    assert "\u0120th e".encode() in server.files[HF_BASE_PATH + "/merges.txt"]
    folder = tmp_path / "w" / "355M"
    with pytest.raises(FormatError) as e:
        download("355M", source="hf", weights_dir=tmp_path / "w", base_url=server.url, **FAST)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{folder / 'merges.txt'}: not GPT-2's tokenizer")
    assert TOKENIZER_SHA256["vocab.bpe"] in msg and f"put OpenAI's vocab.bpe in {folder}/" in msg
    assert sorted(os.listdir(folder)) == ["config.json", "vocab.json"]
    assert not (tmp_path / "w" / "gpt2-355M.h5").exists()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "npgpt.weights", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


def test_cli_download_with_mirror_from_env(server, shared_data, tmp_path):
    serve_openai_layout(server, shared_data, prefix="/m")
    r = run_cli("download", "124M", "--dir", str(tmp_path), "--base-url", closed_port_url()[:-9],
                "--no-progress", env={"NPGPT_MIRROR": server.url + "/m"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "gpt2-124M.h5")
    assert load_params(tmp_path / "gpt2-124M.h5")[1].vocab_size == 97


def test_cli_download_failure_is_one_line(server, tmp_path):
    r = run_cli("download", "124M", "--dir", str(tmp_path), "--base-url", server.url, "--no-progress")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download checkpoint")
    assert f"{server.url}/124M/checkpoint" in lines[0]
    assert "python -m npgpt.weights convert" in lines[0]


def test_cli_help_convert_and_bad_path(tmp_path):
    r = run_cli("--help")
    assert r.returncode == 0 and "download" in r.stdout and "convert" in r.stdout
    out = tmp_path / "tiny.h5"
    r = run_cli("convert", str(FIXTURE), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert load_params(out)[1].n_layer == 2
    r = run_cli("convert", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such file or directory"]
    r = run_cli("download", "125M")
    assert r.returncode == 2
