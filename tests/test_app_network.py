"""Nothing goes out: the app, started and answering a query, opens no connection and resolves no name outside loopback
(Gradio's usage analytics are off). Runs the server in a subprocess whose socket layer records every target, and asks
it one query over HTTP with the standard library."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import ipaddress, json, socket, sys, time
from pathlib import Path

targets = []
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def loopback(host):
    host = str(host)
    if host in ("localhost", "") or host.startswith("/"):          # unix sockets
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def record(address):
    host = address[0] if isinstance(address, tuple) else address
    targets.append(str(host))
    if not loopback(host):
        raise OSError(f"blocked by the test: connection to {host}")


def connect(self, address):
    record(address)
    return _connect(self, address)


def connect_ex(self, address):
    record(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *a, **k):
    if host is not None:
        record((host if isinstance(host, str) else host.decode(),))
    return _getaddrinfo(host, *a, **k)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
if sys.argv[1] == "analytics-on":          # the check's own check: Gradio's analytics, when on, are recorded
    import gradio
    demo = gradio.Blocks(analytics_enabled=True)
    time.sleep(3)
    print(json.dumps(targets))
    sys.exit(0)

root = Path(sys.argv[2])
sys.path.insert(0, str(root))
import urllib.request, uuid
from app import callbacks as cb
from app.models import ModelRegistry
from app.ui import build_demo, launch_kwargs
from xvlm import Grounder

F = root / "tests" / "fixtures" / "official-xvlm-small"
g = Grounder.from_official(F / "checkpoint.pth", config=F / "Grounding_bbox.yaml", tokenizer=F / "vocab.txt",
                           device="cpu", name="fixture")
demo = build_demo(ModelRegistry(grounders={"fixture": g}), assets_dir=F, out_dir=Path(sys.argv[3]))
demo.queue(default_concurrency_limit=cb.QUEUE_CONCURRENCY, max_size=cb.QUEUE_MAX_SIZE)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
# a query through Gradio's HTTP API with the standard library (gradio_client would add its own traffic): upload, call,
# read the result stream
api = f"http://127.0.0.1:{port}/gradio_api"
boundary = uuid.uuid4().hex
head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"img_a.png\"\r\n"
        "Content-Type: image/png\r\n\r\n")
body = head.encode() + (F / "img_a.png").read_bytes() + f"\r\n--{boundary}--\r\n".encode()
upload = urllib.request.Request(api + "/upload", data=body,
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
(path,) = json.loads(urllib.request.urlopen(upload, timeout=60).read())
call = urllib.request.Request(api + "/call/ground", headers={"Content-Type": "application/json"}, data=json.dumps(
    {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, "the red circle"]}).encode())
event = json.loads(urllib.request.urlopen(call, timeout=60).read())["event_id"]
stream = urllib.request.urlopen(f"{api}/call/ground/{event}", timeout=120).read().decode()
assert "event: complete" in stream and '"box_xyxy"' in stream, stream[:500]
time.sleep(3)                              # analytics are sent from background threads
demo.close()
print(json.dumps(targets))
'''


def _run(tmp_path, mode: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(ROOT), str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_app_opens_no_connection_outside_loopback(tmp_path):
    targets = _run(tmp_path, "app")
    assert targets, "the recorder saw no connection at all: the query did not go through the socket layer"
    outside = sorted({t for t in targets if t not in ("127.0.0.1", "localhost", "::1")})
    assert outside == [], f"the app contacted {outside}"


def test_the_recorder_sees_gradio_analytics_when_they_are_on(tmp_path):
    """Without this, an empty record could mean a blind recorder."""
    targets = _run(tmp_path, "analytics-on")
    if not targets:
        pytest.fail("Gradio with analytics on contacted nothing the recorder saw")
    assert any("gradio" in t for t in targets), targets
