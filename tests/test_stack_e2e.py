"""End to end: ./start.sh brings up the local stack (the real RabbitMQ, Triton from the
nvidia-pytriton wheel with the tiny demo repository, two adapters, the Gradio frontend),
headless Chromium drives the page like a user, ./stop.sh leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import openpyxl
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from stack_support import (
    PROJECT_ROOT,
    delete_topology,
    wait_for,
    zip_directory,
)

from services.broker.connection import connect
from services.broker.schemas import QueueTopology
from services.core.config import RabbitMQSettings
from services.core.schemas import REPORT_COLUMNS
from services.frontend.service import frontend_instance_id
from services.triton.local_server import free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = Path("/tmp/cts_stack_e2e.png")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (this test's own paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


def consumer_count(settings: RabbitMQSettings) -> int:
    connection = connect(settings, name="e2e probe", give_up_after_s=10)
    try:
        channel = connection.channel()
        return channel.queue_declare(
            QueueTopology.from_settings(settings).task_queue, passive=True
        ).method.consumer_count
    finally:
        connection.close()


def table_text(page: Page, element_id: str) -> str:
    return page.locator(f"#{element_id}").inner_text()


def process_groups(group_ids: set[int]) -> set[int]:
    """Processes (not zombies) whose process group is one of ``group_ids``."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) in group_ids:
            members.add(int(entry.name))
    return members


def test_stack_from_start_to_stop(
    tmp_path: Path, fixtures_dir: Path, tiny_model_repository: Path
) -> None:
    repository = tiny_model_repository
    storage = tmp_path / "storage"
    chest = zip_directory(
        fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "upload" / "chest.zip"
    )
    head = zip_directory(fixtures_dir / "head_ct_gantry_tilt", tmp_path / "upload" / "head.zip")
    frontend_port, http_port, grpc_port, metrics_port = free_local_ports(4)
    prefix = f"test-e2e-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQSettings(queue_prefix=prefix)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CTS__")}

    start = subprocess.run(
        [
            "bash",
            str(PROJECT_ROOT / "start.sh"),
            "--local",
            "--adapters",
            "2",
            "--model-repository",
            str(repository),
            "--storage",
            str(storage),
            "--queue-prefix",
            prefix,
            "--frontend-port",
            str(frontend_port),
            "--triton-http-port",
            str(http_port),
            "--triton-grpc-port",
            str(grpc_port),
            "--triton-metrics-port",
            str(metrics_port),
        ],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_dir = storage / "run"
    pid_files = sorted(run_dir.glob("*.pid"))
    pids = {path.stem: int(path.read_text()) for path in pid_files}
    # Every service runs in its own process group (setsid): tritonserver and its python
    # backend stubs are in Triton's group.
    started_processes = process_groups(set(pids.values()))
    stopped = False
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"http://127.0.0.1:{frontend_port}" in start.stdout
        assert set(pids) == {"triton", "adapter-1", "adapter-2", "frontend"}
        assert consumer_count(broker) == 2  # both adapters consume the task queue

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(
                viewport={"width": 1400, "height": 1000}, accept_downloads=True
            )
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{frontend_port}/")
            expect(page.locator("#demo-banner")).to_contain_text("DEMO WEIGHTS")

            page.locator("#uploads input[type=file]").set_input_files([str(chest), str(head)])
            # The files must be on the server before the button sends their paths.
            expect(page.locator("#uploads table tr")).to_have_count(2, timeout=30_000)
            page.locator("#submit").click()
            expect(page.locator("#upload-message")).to_contain_text(
                "Queued 2 studies", timeout=30_000
            )

            wait_for(
                lambda: table_text(page, "status-table").count("done") == 2,
                120,
                "both studies done in the status table",
                interval_s=0.5,
            )
            results = table_text(page, "results-table")
            for column in (*REPORT_COLUMNS, "most_dangerous_pathology_type"):
                assert column in results, column
            rows = [line for line in results.splitlines() if line.strip()]
            assert any("chest.zip" in line for line in rows)
            assert "Success" in results and "Failure" in results

            # The xlsx of the session, downloaded like a user does.
            page.locator("#session-xlsx-button").click()
            link = page.locator("#session-xlsx a").first
            expect(link).to_be_visible(timeout=30_000)
            with page.expect_download() as download_info:
                link.click()
            xlsx = tmp_path / "downloaded.xlsx"
            download_info.value.save_as(xlsx)

            # A reload (same browser) shows the session's studies again.
            page.reload()
            wait_for(
                lambda: table_text(page, "status-table").count("done") == 2,
                30,
                "the studies after a reload",
                interval_s=0.5,
            )
            # The detail of the non-chest study tells why it failed.
            page.locator("#study-select input").click()
            page.get_by_role("option", name=re.compile(r"head\.zip")).click()
            expect(page.locator("#study-detail")).to_contain_text("not a chest CT", timeout=15_000)
            page.locator("#study-select input").click()
            page.get_by_role("option", name=re.compile(r"chest\.zip")).click()
            expect(page.locator("#study-detail")).to_contain_text("Success", timeout=15_000)
            expect(page.locator("#previews img").first).to_be_visible(timeout=15_000)
            time.sleep(1.5)  # let the chart finish drawing before the picture
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()

        # The xlsx: the customer's columns first, one row per study, values as stored.
        sheet = openpyxl.load_workbook(xlsx).active
        header = [cell.value for cell in sheet[1]]
        assert header[:8] == [*REPORT_COLUMNS, "most_dangerous_pathology_type"]
        rows = {
            row[0]: dict(zip(header, row, strict=True))
            for row in sheet.iter_rows(min_row=2, values_only=True)
        }
        assert set(rows) == {"chest.zip", "head.zip"}
        assert rows["chest.zip"]["processing_status"] == "Success"
        assert rows["head.zip"]["processing_status"] == "Failure"
        stored = {}
        for path in (storage / "results").glob("*.json"):
            result = json.loads(path.read_text())
            stored[result["original_filename"]] = result["reports"][0]
        assert rows["chest.zip"]["probability_of_pathology"] == pytest.approx(
            stored["chest.zip"]["probability_of_pathology"], abs=1e-9
        )
        assert rows["chest.zip"]["study_uid"] == stored["chest.zip"]["study_uid"]
        # The session is on disk: a frontend restart would show the same studies.
        sessions = list((storage / "sessions").glob("*.json"))
        assert len(sessions) == 1
        assert len(json.loads(sessions[0].read_text())["tasks"]) == 2
    finally:
        stop = subprocess.run(
            ["bash", str(PROJECT_ROOT / "stop.sh"), "--storage", str(storage)],
            cwd=PROJECT_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        stopped = stop.returncode == 0
        delete_topology(
            broker,
            [
                QueueTopology(prefix=prefix).reply_queue(
                    frontend_instance_id("127.0.0.1", frontend_port)
                )
            ],
        )
    assert stopped, stop.stdout + stop.stderr
    # Nothing of the stack is left: no process of the services' groups (tritonserver and
    # its python backend stubs included), no process naming this test's storage.
    assert len(started_processes) > len(pids)  # the services' children were seen too
    assert process_groups(set(pids.values())) == set()
    assert processes_mentioning(str(storage)) == []
    assert list(run_dir.glob("*.pid")) == []
    # The system RabbitMQ was running before, so it keeps running.
    connection = connect(broker, name="e2e after stop", give_up_after_s=10)
    connection.close()
    assert SCREENSHOT.is_file()
