"""Images from the command line and the API (SPEC §11): `sandbox pull`,
`images`, `rmi`, `run --image`, and `serve`'s /images endpoints and `image`
in create."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse

import pytest

import imagekit as ik

pytestmark = pytest.mark.timeout(120)
SANDBOX = [sys.executable, "-c", "import sys; from sandbox.cli import main; main(sys.argv[1:])"]


@pytest.fixture(scope="module")
def registry():
    reg = ik.Registry()
    reg.push("team/app", "1", ik.build(
        [ik.busybox_layer(), [{"name": "hello.txt", "data": b"hello\n"}]],
        {"Cmd": ["cat", "/hello.txt"], "Env": ["MODE=image"]}))
    yield reg
    reg.stop()


@pytest.fixture
def state():
    d = tempfile.mkdtemp(prefix="sbx-img-cli-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sb(state, *args, timeout=60):
    return subprocess.run([*SANDBOX, "--state-dir", state, *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_pull_images_run_rmi(registry, state):
    ref = f"{registry.host}/team/app:1"
    r = sb(state, "pull", ref)                       # HTTPS to a plain-HTTP registry
    assert r.returncode == 125 and "insecure" in r.stderr and "Traceback" not in r.stderr
    r = sb(state, "pull", "--insecure-registry", registry.host, ref)
    assert r.returncode == 0, r.stderr
    assert ref in r.stdout and "2 layers" in r.stdout
    r = sb(state, "images")
    assert r.stdout.split("\n")[0].split() == ["REFERENCE", "DIGEST", "LAYERS", "SIZE"]
    assert ref in r.stdout
    r = sb(state, "run", "--image", ref)             # the image's Cmd
    assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    r = sb(state, "run", "--image", ref, "--", "sh", "-c", "echo $MODE; exit 4")
    assert (r.returncode, r.stdout) == (4, "image\n"), r.stderr
    r = sb(state, "run", "--image", ref, "--", "nope")
    assert r.returncode == 127
    r = sb(state, "run", "--image", ref, "--rootfs", state, "--", "true")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = sb(state, "run", "--insecure-registry", registry.host, "--image",
           f"{registry.host}/team/app:missing")
    assert r.returncode == 125 and "not found" in r.stderr
    r = sb(state, "pull", "Not A Ref")
    assert r.returncode == 2
    r = sb(state, "rmi", ref)
    assert r.returncode == 0 and f"removed {ref}" in r.stdout
    assert ref not in sb(state, "images").stdout
    r = sb(state, "rmi", ref)
    assert r.returncode == 125 and "no such image" in r.stderr


def test_serve_image_endpoints(registry, state):
    sock = f"{state}/s.sock"
    proc = subprocess.Popen([*SANDBOX, "--state-dir", state, "serve", "--socket", sock,
                             "--insecure-registry", registry.host], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == f"ready {sock}\n".encode()

        def curl(method, path, body=None):
            args = ["curl", "-sS", "--unix-socket", sock, "-X", method, "-w", "\n%{http_code}",
                    f"http://localhost{path}"]
            if body is not None:
                args += ["--data-binary", json.dumps(body)]
            r = subprocess.run(args, capture_output=True, timeout=60)
            out, _, code = r.stdout.rpartition(b"\n")
            return int(code), json.loads(out)

        ref = f"{registry.host}/team/app:1"
        assert curl("POST", "/images", {"ref": f"{registry.host}/team/nope:1"})[0] == 404
        assert curl("POST", "/images", {"ref": "Bad Ref"})[0] == 400
        status, img = curl("POST", "/images", {"ref": ref})
        assert status == 200 and img["ref"] == ref and len(img["layers"]) == 2
        assert img["config"]["Cmd"] == ["cat", "/hello.txt"]
        status, lst = curl("GET", "/images")
        assert [i["ref"] for i in lst] == [ref]
        status, box = curl("POST", "/sandboxes", {"name": "web", "image": ref,
                                                   "entrypoint": ["sleep", "1000"]})
        assert status == 201, box
        q = urllib.parse.quote(ref, safe="")
        status, err = curl("DELETE", f"/images/{q}")
        assert status == 409 and err["kind"] == "in-use"
        status, err = curl("POST", "/sandboxes", {"name": "bad", "image": f"{registry.host}/x/y:1"})
        assert status == 404 and err["kind"] == "not-found"
        assert curl("DELETE", "/sandboxes/web")[0] == 200
        assert curl("DELETE", f"/images/{q}") == (200, {"removed": [ref]})
        assert curl("POST", "/images/prune") == (200, {"removed": []})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
