"""Start ``apps/compare.py`` once per test session (shared by test_app.py and test_app_browser.py).

The app runs in a subprocess on 127.0.0.1 with a free port and pre-made adapters (random non-zero
factors, saved in a temporary folder): two SDXL adapters in the DreamBooth layout and one LLaVA
adapter, so it trains nothing at start-up; plus one unreadable adapter folder, which it must survive. Stopped (by
its pid) when the session ends.

``COMPARE_ADAPTERS=runs`` uses the real DreamBooth outputs ``runs/dreambooth-sdxl-{lora,moslora}`` (the headline
command's) instead of random SDXL adapters: that is how docs/compare.png is taken.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SDXL_NAMES = ("lora", "moslora")
LLAVA_NAMES = ("lora",)
START_TIMEOUT = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapters(root: Path) -> None:
    """Save the test adapters into ``root`` (a subprocess, so the test process stays light)."""
    real = os.environ.get("COMPARE_ADAPTERS")
    sdxl_code = (
        "sd = SDXLAdapters.from_pretrained()\n"
        "make_demo_sdxl_adapter(sd, root / 'dreambooth-sdxl-lora', 'lora', steps=0, init_weights=False)\n"
        "make_demo_sdxl_adapter(sd, root / 'dreambooth-sdxl-moslora', 'moslora', steps=0, init_weights=False,"
        " train_text_encoder=True, seed=1)\n"
    )
    if real:
        sdxl_code = ""
        for name in SDXL_NAMES:
            source = Path(real) / f"dreambooth-sdxl-{name}"
            if not (source / "unet" / "adapter_config.json").is_file():
                raise FileNotFoundError(f"COMPARE_ADAPTERS={real}: {source} has no unet adapter; run "
                                        f"`accelerate launch training/dreambooth_sdxl.py --adapter {name}` first")
            root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, root / source.name, ignore=shutil.ignore_patterns("checkpoint-*", "training_state", "class_images"))
    code = (
        "import sys; from pathlib import Path; root = Path(sys.argv[1])\n"
        "from mm_subspace.pipelines import SDXLAdapters, LlavaAdapters\n"
        "from mm_subspace.training.demo_adapters import make_demo_sdxl_adapter, make_demo_llava_adapter\n"
        + sdxl_code +
        "ll = LlavaAdapters.from_pretrained()\n"
        "make_demo_llava_adapter(ll, root / 'llava-lora', 'lora', steps=0, init_weights=False)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=REPO, timeout=START_TIMEOUT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    # an unreadable adapter: the app must list it with the reason and start anyway
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")


@functools.cache
def app_url() -> str:
    """URL of the running app (started on first call); raises with the app's log if it does not come up."""
    root = Path(tempfile.mkdtemp(prefix="compare-app-"))
    make_adapters(root / "runs")
    return launch(root)


@functools.cache
def fresh_app_url() -> str:
    """URL of an app started on an empty adapters folder, as on a fresh install (it serves the shipped demo adapters)."""
    root = Path(tempfile.mkdtemp(prefix="compare-app-fresh-"))
    (root / "runs").mkdir()
    return launch(root)


def launch(root: Path) -> str:
    """Start the app on ``root/runs`` in a subprocess (stopped at exit); its URL once it answers."""
    port = free_port()
    log = open(root / "app.log", "w")
    # one intra-op thread: the tiny models run faster so on a loaded 2-core machine
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "apps" / "compare.py"), "--adapters", str(root / "runs"),
         "--server_name", "127.0.0.1", "--server_port", str(port)],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"compare.py exited with {proc.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"compare.py did not answer on {url} in {START_TIMEOUT} s:\n{(root / 'app.log').read_text()[-3000:]}")
