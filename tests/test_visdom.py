"""Live monitoring against a real visdom server on 127.0.0.1, and the page in headless Chromium.

The server needs its browser assets (``python visdom_assets.py``, which .ci/run runs). Outside
CI a machine without them skips these tests with that reason; in CI they must run.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

import monitor
from conftest import records
from run import main
from visdom_assets import assets_installed

pytestmark = pytest.mark.slow  # a real visdom server, a browser, training runs beside them

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--hide-scrollbars"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, env_path):
    if not assets_installed():
        reason = "visdom's browser assets are not installed: run python visdom_assets.py"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    process = subprocess.Popen([sys.executable, "-m", "visdom.server", "-port", str(port),
                                "--hostname", "127.0.0.1", "-env_path", str(env_path),
                                "-logging_level", "WARNING"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).status == 200:
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("visdom server did not answer within 30 s")


def stop_server(process):
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    process = start_server(port, tmp_path / "visdom-envs")
    yield port
    stop_server(process)


def client(port):
    import visdom
    return visdom.Visdom(server="http://127.0.0.1", port=port, raise_exceptions=True,
                         use_incoming_socket=False)


def window(vis, env, win):
    data = json.loads(vis.get_window_data(win, env))
    return data["content"]["data"][0]["x"], data["content"]["data"][0]["y"]


def train(tmp_path, name, port, *flags):
    return main(["--grid", "reduced", "--batch_size", "16", "--no-cuda", "--nb-test", "4",
                 "--output_dir", str(tmp_path), "--run-name", name, "--data-dir", str(tmp_path),
                 "--gt-interval", "1000", "--eval-metrics", "none", "--viz_on", "True",
                 "--viz_port", str(port), "--eval-sample", "100", *flags])


@pytest.mark.parametrize("metric, terms", [("Test_gt", ["recon", "kl", "syn", "total"]),
                                           ("Factor", ["recon", "kl", "syn", "tc", "d_loss"])])
def test_plotted_series_equal_metrics_jsonl(tmp_path, server, metric, terms, caplog):
    with caplog.at_level("INFO"):
        assert train(tmp_path, "live", server, "--metric", metric, "--steps", "12",
                     "--log-interval", "2", "--viz_il_iter", "2", "--viz_la_iter", "4",
                     "--save-interval", "6") == 0
    url = f"http://localhost:{server}/env/live"  # printed once connected, the page to open
    assert any(url in r.getMessage() for r in caplog.records)
    assert urllib.request.urlopen(url, timeout=5).status == 200
    rows = records(tmp_path / "live")
    vis = client(server)
    for term in terms:
        x, y = window(vis, "live", term)
        assert x == [r["step"] for r in rows]
        assert y == [r[term] for r in rows], term
    for j in range(10):
        x, y = window(vis, "live_latents", f"z{j}")
        assert x == [r["step"] for r in rows]
        assert y == pytest.approx([100 * r["best_freq"][j] for r in rows], abs=1e-3)
    assert vis.win_exists("traversal", "live")


def test_server_dying_mid_run_costs_one_warning(tmp_path, at_step):
    port = free_port()
    process = start_server(port, tmp_path / "envs")
    at_step(5, lambda solver: stop_server(process))
    with pytest.warns(UserWarning) as caught:
        code = train(tmp_path, "dies", port, "--steps", "20", "--log-interval", "2",
                     "--viz_il_iter", "2", "--viz_la_iter", "4", "--save-interval", "10")
    assert code == 0
    visdom_warnings = [w for w in caught if "visdom" in str(w.message)]
    assert len(visdom_warnings) == 1 and "stopped answering" in str(visdom_warnings[0].message)
    assert [r["step"] for r in records(tmp_path / "dies")] == list(range(2, 21, 2))


def test_server_started_late_receives_everything_gathered(tmp_path, monkeypatch, at_step):
    port = free_port()
    monkeypatch.setattr(monitor.VisdomMonitor, "RETRY_SECONDS", 0.0)
    started = []
    at_step(6, lambda solver: started.append(start_server(port, tmp_path / "envs")))
    try:
        with pytest.warns(UserWarning, match="not reachable"):
            code = train(tmp_path, "late", port, "--steps", "16", "--log-interval", "2",
                         "--viz_il_iter", "2", "--viz_la_iter", "4", "--save-interval", "100")
        assert code == 0
        x, y = window(client(port), "late", "recon")
        rows = records(tmp_path / "late")
        assert x == [r["step"] for r in rows]  # the points gathered while down came too
        assert y == [r["recon"] for r in rows]
    finally:
        for process in started:
            stop_server(process)


def chromium():
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")
    return path


def render_page(url, *extra):
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 "--virtual-time-budget=10000", *extra, url],
                                capture_output=True, text=True, timeout=120)
    return result.stdout


def test_page_shows_the_loss_plots_in_a_real_browser(tmp_path, server):
    """Headless Chromium loads the run's env while it trains; the rendered page must hold the
    recon, kl and syn plots with drawn lines."""
    chromium()
    run = threading.Thread(target=train, args=(tmp_path, "browser", server, "--steps", "60",
                                               "--log-interval", "10", "--viz_il_iter", "2",
                                               "--viz_la_iter", "10", "--save-interval", "30"))
    run.start()
    try:
        vis = client(server)
        deadline = time.monotonic() + 120
        while not vis.win_exists("syn", "browser") and time.monotonic() < deadline:
            time.sleep(0.2)
        dom = render_page(f"http://127.0.0.1:{server}/env/browser", "--dump-dom")
    finally:
        run.join()
    for title in ("recon", "kl", "syn"):
        assert f">{title}<" in dom, f"no {title} window in the page"
    assert dom.count('class="js-line"') >= 3  # plotly drew a line in each loss window
    screenshot = tmp_path / "visdom.png"
    render_page(f"http://127.0.0.1:{server}/env/browser", "--window-size=1400,1000",
                f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
