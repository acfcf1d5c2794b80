"""End to end: ./start.sh brings up the local stack (the real RabbitMQ, Triton from the
nvidia-pytriton wheel with the tiny demo repository, two adapters, the Gradio frontend),
headless Chromium at 1280x800 drives the worklist like a radiologist (chest, head, MR, a
broken zip, the chest again; badges, reasons, the duplicate, the slice viewer, a reload, a
removal, the xlsx), ./stop.sh leaves no process behind. Screenshots of the worklist and of a
study view are kept in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import openpyxl
import pydicom
import pytest
from fault_support import process_groups
from playwright.sync_api import Browser, Dialog, Page, ViewportSize, expect, sync_playwright
from stack_support import (
    PROJECT_ROOT,
    delete_topology,
    wait_for,
    zip_directory,
)
from test_quality_flags import gapped_chest
from triage_page import (
    SIZES,
    notifications,
    pathology_arrives,
    record_notifications,
    review,
    screenshot,
    show_study,
    turn_alerts_on,
)
from web_support import add_account, sign_in_page
from webhook_support import Receiver, serving
from worklist_page import (
    CHROMIUM,
    CHROMIUM_ARGS,
    download_all,
    finished_rows,
    upload,
    worklist_rows,
)

from services.broker.connection import connect
from services.broker.schemas import PREPARE_STAGE, QueueTopology
from services.core.access import Role
from services.core.config import RabbitMQSettings, Settings, load_settings
from services.core.schemas import REPORT_COLUMNS
from services.registry import Door, Registry, StudyFilter
from services.registry.audit import AuditAction, AuditQuery
from services.registry.database import database_url
from services.triton.local_server import free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.browser, pytest.mark.slow]

LAPTOP: ViewportSize = {"width": 1280, "height": 800}
HOSTILE = "<img src=x onerror=alert(1)>"
WEBHOOK_SECRET = "the pager's shared secret"
FAILED_RED = "rgb(176, 0, 32)"  # the Failed badge (services/frontend/static/badges.css)
NOT_ANALYSED_GREY = "rgb(84, 110, 122)"  # the Not analysed badge: out of scope, never red


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
        # The lanes are read with basic.get: each adapter's stages consume a presence queue.
        return channel.queue_declare(
            QueueTopology.from_settings(settings).presence_queue(PREPARE_STAGE), passive=True
        ).method.consumer_count
    finally:
        connection.close()


def hostile_copy(source: Path, target: Path) -> Path:
    """The series with a StudyDescription that would run script if shown as HTML."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyDescription = HOSTILE
        dataset.save_as(target / path.name)
    return target


def canvas_pixels(page: Page) -> str:
    return page.locator("#study-view .vw-canvas").evaluate("canvas => canvas.toDataURL()")


def viewer_state(page: Page) -> dict[str, str]:
    return page.locator("#study-view .vw").evaluate("node => ({...node.dataset})")


def shift_at_size(
    browser: Browser,
    url: str,
    registry: Registry,
    storage: Path,
    folder: Path,
    size: ViewportSize,
    *,
    chest: str,
    head: str,
    first: bool,
    gapped: Path,
) -> None:
    """One screen size of the shift: identity, the list's height, an alert, screenshots; the
    first size also records the review."""
    context = browser.new_context(viewport=size)
    record_notifications(context, url)
    page = context.new_page()
    sign_in_page(page, url, "reader-a")
    wait_for(lambda: len(worklist_rows(page)) >= 3, 30, "the worklist")
    row = page.locator(f'#worklist tr[data-key="{chest}"]')
    # Identity for a radiologist (the fixture's PatientName, family part upper case).
    expect(row.locator(".c-patient")).to_contain_text("LUNG_DX-A0002")
    expect(row.locator(".c-patient")).to_contain_text("53 y F")
    # The list fills the window: its bottom edge is the window's.
    bottom = page.locator("#worklist .wl-scroll").evaluate(
        "node => node.getBoundingClientRect().bottom"
    )
    assert size["height"] - 40 < bottom <= size["height"], bottom
    turn_alerts_on(page)
    arrival = f"alert{uuid.uuid4().hex[:12]}"
    pathology_arrives(registry, storage, arrival)
    wait_for(lambda: bool(notifications(page)), 30, "a notification of the new PATHOLOGY")
    assert notifications(page)[0]["title"] == "New PATHOLOGY result"
    assert "Arrival" not in notifications(page)[0]["body"]  # no identity on a lock screen
    assert re.match(r"\(\d+\) Chest CT screening", page.title()), page.title()
    if first:
        # Before the first pictures: a STAT study with interpolated slices and a review, so
        # that both sizes show the list as a shift has it.
        interpolated_slices_are_marked(page, gapped, chest)
        row.click()
        # The gapped chest is the same patient: wait for this study, not just the name.
        expect(page.locator("#study-view .sv-title")).to_have_text("chest.zip")
        # Disagree with the model's call, whichever the demo weights made: the row says the
        # reader's call.
        model_call = row.get_attribute("data-badge")
        call = "false" if model_call == "pathology" else "true"
        review(page, agrees=False, call=call, finding="Lung nodule", comment="see S4")
        said = f"disagreed: {'PATHOLOGY' if call == 'true' else 'NORMAL'} · reader-a"
        expect(row.locator(".c-review")).to_contain_text(said)
        expect(page.locator("#study-view .sv-reviews")).to_contain_text(said.split(" · ")[0])
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    screenshot(page, folder, "worklist")
    row.click()
    expect(page.locator("#study-view .sv-title")).to_have_text("chest.zip")
    expect(page.locator("#study-view .sv-patient")).to_contain_text("LUNG_DX-A0002")
    expect(page.locator("#study-view .vw")).to_have_attribute("data-ready", "1", timeout=15_000)
    show_study(page)
    screenshot(page, folder, "study")
    page.locator(f'#worklist tr[data-key="{head}"]').click()
    expect(page.locator("#study-view .sv-call")).to_contain_text("Not analysed")
    expect(page.locator("#study-view .vw")).to_have_attribute("data-ready", "1", timeout=15_000)
    page.locator("#study-view [data-preset=brain]").click()
    show_study(page)
    screenshot(page, folder, "refused-study")
    context.close()


def interpolated_slices_are_marked(page: Page, gapped: Path, chest: str) -> None:
    """The chest without two slices, sent as STAT: a chip in its row, the slices marked in
    the viewer; the study view lists the same patient's chest CT, which its link opens."""
    page.locator("#stat input").check()
    upload(page, [gapped], "STAT: Queued 1 study")
    expect(page.locator("#stat input")).not_to_be_checked()  # the next upload is routine
    wait_for(lambda: finished_rows(page, {"gapped.zip"}) == 1, 120, "the gapped chest screened")
    (listed,) = worklist_rows(page, {"gapped.zip"})
    assert "interpolated" in str(listed["quality"]), listed
    expect(page.locator(f'#worklist tr[data-key="{listed["key"]}"]')).to_have_class(
        re.compile(r"\bstat\b")
    )
    page.locator(f'#worklist tr[data-key="{listed["key"]}"]').click()
    viewer = page.locator("#study-view .vw")
    expect(viewer).to_have_attribute("data-ready", "1", timeout=15_000)
    expect(viewer).to_have_attribute("data-interpolated", "2")
    ticks = page.locator("#study-view .vw-tick")
    expect(ticks).to_have_count(2)
    first_filled = int(str(ticks.first.get_attribute("title")).split()[1].rstrip(":")) - 1
    page.locator("#study-view .vw-slice").evaluate(
        "(input, index) => { input.value = String(index);"
        " input.dispatchEvent(new Event('input')); }",
        first_filled,
    )
    expect(page.locator("#study-view .vw-filled")).to_be_visible()
    expect(viewer).to_have_attribute("data-slice-interpolated", "1")
    earlier = page.locator(f'#study-view .sv-others a[href="?study={quote(chest, safe="")}"]')
    expect(earlier).to_have_count(1)
    earlier.click()
    # The link reloads the page with ?study=: the chest opens, and lists the gapped one.
    expect(page.locator("#study-view .sv-title")).to_have_text("chest.zip", timeout=30_000)
    expect(
        page.locator(f'#study-view .sv-others a[href="?study={quote(listed["key"], safe="")}"]')
    ).to_have_count(1)


def triage_shift(
    browser: Browser,
    url: str,
    settings: Settings,
    folder: Path,
    fixtures_dir: Path,
    *,
    chest: str,
    head: str,
) -> None:
    """A radiologist's shift on the real stack, at both screen sizes: the patient in the row
    and the header, a review recorded and audited, a notification when a PATHOLOGY result
    arrives; a technologist is refused another's study; screenshots for the README."""
    chest_task = chest.split(":")[0]
    add_account(settings, "tech-1", Role.TECHNOLOGIST)
    gapped = zip_directory(
        gapped_chest(fixtures_dir, folder / "gapped_chest"), folder / "upload" / "gapped.zip"
    )
    registry = Registry.open(settings)
    try:
        for index, size in enumerate(SIZES):
            shift_at_size(
                browser,
                url,
                registry,
                settings.storage.root,
                folder,
                size,
                chest=chest,
                head=head,
                first=index == 0,
                gapped=gapped,
            )
        (review_row,) = registry.reviews(chest_task)
        assert review_row.agrees is False
        assert review_row.pathology is not None
        assert review_row.findings == {"Lung nodule": True}
        assert review_row.comment == "see S4"
        audited = registry.audit.events(
            AuditQuery(actions=(AuditAction.REVIEW,), task_id=chest_task)
        )
        assert [entry.actor for entry in audited] == ["reader-a"]
        # A technologist sees only the studies they sent: none of reader-a's, and the files
        # of one are refused.
        technologist = browser.new_context(viewport=SIZES[0]).new_page()
        sign_in_page(technologist, url, "tech-1")
        technologist.wait_for_timeout(2000)  # a refresh or two
        assert worklist_rows(technologist) == []
        refused = technologist.request.get(f"{url}/files/{chest_task}/report.json")
        assert refused.status == 403
        technologist.context.close()
    finally:
        registry.close()


def test_stack_from_start_to_stop(
    tmp_path: Path, fixtures_dir: Path, tiny_model_repository: Path
) -> None:
    repository = tiny_model_repository
    storage = tmp_path / "storage"
    uploads = tmp_path / "upload"
    chest = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", uploads / "chest.zip")
    head = zip_directory(fixtures_dir / "head_ct_gantry_tilt", uploads / "head.zip")
    # The hostile description rides on the MR, which reader-a later takes off their list:
    # it is checked as text, and stays out of the README's pictures.
    mr = zip_directory(
        hostile_copy(fixtures_dir / "mr_brain_t1", tmp_path / "mr"), uploads / "mr.zip"
    )
    broken = uploads / "broken.zip"
    broken.write_bytes(chest.read_bytes()[: chest.stat().st_size // 2])
    again = uploads / "again" / "chest.zip"  # the same file once more, later
    again.parent.mkdir()
    again.write_bytes(chest.read_bytes())
    frontend_port, http_port, grpc_port, metrics_port, dicom_port = free_local_ports(5)
    prefix = f"test-e2e-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQSettings(queue_prefix=prefix)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CTS__")}
    # A paging system: each study's first result is POSTed to it, signed.
    webhooks = ExitStack()
    pager = Receiver(WEBHOOK_SECRET)
    webhook_url = webhooks.enter_context(serving(pager, free_local_ports(1)[0]))
    environment["CTS__NOTIFICATIONS__WEBHOOKS"] = json.dumps(
        [{"url": webhook_url, "secret": WEBHOOK_SECRET}]
    )

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
            "--dicom-port",
            str(dicom_port),
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
    dialogs: list[str] = []
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        # The system broker's plugin list stays readable by its own user (start.sh enables
        # plugins as root under its umask 077 otherwise, and the next broker start fails).
        plugins = Path("/etc/rabbitmq/enabled_plugins")
        if plugins.exists():
            assert plugins.stat().st_mode & 0o044, oct(plugins.stat().st_mode)
        assert f"http://127.0.0.1:{frontend_port}" in start.stdout
        assert set(pids) == {"triton", "adapter-1", "adapter-2", "frontend", "dicom-listener"}
        assert consumer_count(broker) == 2  # both adapters are alive (their preparation stages)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=LAPTOP, accept_downloads=True)
            page = context.new_page()

            def on_dialog(dialog: Dialog) -> None:
                dialogs.append(f"{dialog.type}: {dialog.message}")
                dialog.accept()  # the worklist's "remove?" confirmation

            page.on("dialog", on_dialog)
            stack_settings = load_settings(environ={"CTS__STORAGE__ROOT": str(storage)})
            for reader in ("reader-a", "reader-b"):
                add_account(stack_settings, reader, Role.RADIOLOGIST)
            sign_in_page(page, f"http://127.0.0.1:{frontend_port}", "reader-a")
            expect(page.locator("#demo-banner")).to_contain_text("DEMO WEIGHTS")

            upload(page, [chest, head, mr, broken], "Queued 4 studies")
            wait_for(
                lambda: finished_rows(page) == 4,
                120,
                "all four studies finished in the worklist",
                interval_s=0.5,
            )
            # The same file again: already screened, not queued, no second row.
            upload(page, [again], "already screened")
            expect(page.locator("#upload-message")).to_contain_text("not recomputed")
            page.wait_for_timeout(3000)  # a refresh or two: nothing is added
            rows = worklist_rows(page)
            assert len(rows) == 4
            by_file: dict[str, list[dict[str, object]]] = {}
            for row in rows:
                by_file.setdefault(str(row["file"]), []).append(row)
            # Badges: the call for the chest; out of scope (head, MR) is grey "Not analysed",
            # unreadable data red "Failed", each with its reason (never "done").
            assert {row["badge_text"] for row in by_file["chest.zip"]} <= {"PATHOLOGY", "NORMAL"}
            assert len(by_file["chest.zip"]) == 1
            reasons = {"head.zip": "not a chest CT", "mr.zip": "modality MR", "broken.zip": "zip"}
            badges = {"head.zip": "Not analysed", "mr.zip": "Not analysed", "broken.zip": "Failed"}
            for name, reason in reasons.items():
                (row,) = by_file[name]
                assert row["badge_text"] == badges[name], row
                assert reason in str(row["what"]), row
            assert all("done" not in str(row["badge_text"]).lower() for row in rows)
            # DICOM text is shown as text: the hostile description is literal, no element made.
            assert by_file["mr.zip"][0]["description"] == HOSTILE
            assert page.locator("#worklist img").count() == 0
            (chest_row,) = by_file["chest.zip"]
            assert chest_row["date"] == "2007-04-25"
            # At 1280x800 the worklist and each reason are on screen: Failed in red, Not
            # analysed in grey.
            colours = {"Failed": FAILED_RED, "Not analysed": NOT_ANALYSED_GREY}
            for name in reasons:
                reason_cell = page.locator(
                    f'#worklist tr[data-key="{by_file[name][0]["key"]}"] .c-what'
                )
                expect(reason_cell).to_be_in_viewport()
                badge = page.locator(f'#worklist tr[data-key="{by_file[name][0]["key"]}"] .badge')
                colour = badge.evaluate("node => getComputedStyle(node).color")
                assert colour == colours[badges[name]], (name, colour)
            page.screenshot(path=str(tmp_path / "worklist.png"))

            # Click to open the refused head CT: its series is in the viewer, so a reader
            # sees why it was refused.
            page.locator(f'#worklist tr[data-key="{by_file["head.zip"][0]["key"]}"]').click()
            expect(page.locator("#study-view .sv-call")).to_contain_text("not a chest CT")
            expect(page.locator("#study-view .vw")).to_have_attribute(
                "data-ready", "1", timeout=15_000
            )
            before = viewer_state(page)
            page.locator("#study-view .vw-stage").hover()
            for _ in range(3):
                page.mouse.wheel(0, 120)
            wait_for(
                lambda: viewer_state(page)["slice"] != before["slice"],
                10,
                "the slice to change on scrolling",
            )
            assert int(viewer_state(page)["slice"]) == int(before["slice"]) + 3
            lung = canvas_pixels(page)
            page.locator("#study-view [data-preset=bone]").click()
            assert viewer_state(page)["width"] == "2000"
            assert canvas_pixels(page) != lung
            page.locator("#study-view [data-plane=coronal]").click()
            assert viewer_state(page)["plane"] == "coronal"

            # The chest: the call, the findings, the viewer.
            page.locator(f'#worklist tr[data-key="{chest_row["key"]}"]').click()
            expect(page.locator("#study-view .sv-badge")).to_have_text(
                re.compile("PATHOLOGY|NORMAL"), timeout=15_000
            )
            expect(page.locator("#study-view .sv-call")).to_contain_text("P(pathology)")
            expect(page.locator("#study-view .vw")).to_have_attribute(
                "data-ready", "1", timeout=15_000
            )
            page.wait_for_timeout(500)  # the smooth scroll to the study view
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)

            # The MR has no CT series: no viewer, and the page says why; its hostile
            # description is text in the study view too.
            page.locator(f'#worklist tr[data-key="{by_file["mr.zip"][0]["key"]}"]').click()
            expect(page.locator("#study-view .vw-message")).to_contain_text(
                "could be read as a volume", timeout=15_000
            )
            expect(page.locator("#study-view .sv-identity")).to_contain_text(HOSTILE)
            assert page.locator("#study-view img").count() == 0

            # One click downloads the xlsx of the list.
            xlsx = download_all(page, tmp_path / "downloaded.xlsx")

            # A reload (same browser) shows the same worklist and reopens the last study;
            # the guide stays closed (the worklist needs the height).
            page.reload()
            wait_for(lambda: len(worklist_rows(page)) == 4, 30, "the worklist after a reload")
            assert sorted(map(str, worklist_rows(page))) == sorted(map(str, rows))
            expect(page.locator("#study-view .sv-title")).to_have_text("mr.zip", timeout=15_000)
            expect(page.locator("#guide")).not_to_contain_text("The worklist")
            # Take the MR off this reader's list; it stays off after a reload, and another
            # reader still sees it.
            removed_key = by_file["mr.zip"][0]["key"]
            page.locator(f'#worklist tr[data-key="{removed_key}"] .wl-remove').click()
            wait_for(lambda: len(worklist_rows(page)) == 3, 15, "the row removed")
            page.reload()
            wait_for(lambda: len(worklist_rows(page)) == 3, 30, "still removed after a reload")
            other = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            sign_in_page(other, f"http://127.0.0.1:{frontend_port}", "reader-b")
            wait_for(lambda: len(worklist_rows(other)) == 4, 30, "another viewer's full list")
            triage_shift(
                browser,
                f"http://127.0.0.1:{frontend_port}",
                stack_settings,
                tmp_path,
                fixtures_dir,
                chest=str(chest_row["key"]),
                head=str(by_file["head.zip"][0]["key"]),
            )
            browser.close()
        assert [dialog.split(":")[0] for dialog in dialogs] == ["confirm"]  # no alert ran

        # The xlsx: the customer's columns first, one row per study, values as stored.
        sheet = openpyxl.load_workbook(xlsx).active
        header = [cell.value for cell in sheet[1]]
        assert header[:8] == [*REPORT_COLUMNS, "most_dangerous_pathology_type"]
        table = {
            row[0]: dict(zip(header, row, strict=True))
            for row in sheet.iter_rows(min_row=2, values_only=True)
        }
        assert set(table) == {"chest.zip", "head.zip", "mr.zip", "broken.zip"}
        assert sheet.auto_filter.ref
        assert sheet.freeze_panes == "B2"
        assert table["chest.zip"]["processing_status"] == "Success"
        assert table["head.zip"]["processing_status"] == "Failure"
        assert table["head.zip"]["demo_weights"] == 1  # Failure rows carry the flag too
        stored = {}
        for path in (storage / "results").glob("*.json"):
            result = json.loads(path.read_text())
            stored[result["original_filename"]] = result["reports"][0]
        assert table["chest.zip"]["probability_of_pathology"] == pytest.approx(
            stored["chest.zip"]["probability_of_pathology"], abs=1e-9
        )
        assert table["chest.zip"]["study_uid"] == stored["chest.zip"]["study_uid"]
        # The registry holds the four uploads, once each: a frontend restart, or another
        # browser, shows the same studies.
        registry = Registry(
            database_url(load_settings(environ={"CTS__STORAGE__ROOT": str(storage)}))
        )
        try:
            recorded = registry.list_studies(StudyFilter()).items
        finally:
            registry.close()
        uploaded = [record.original_filename for record in recorded if record.door is Door.UPLOAD]
        # The shift's own: the gapped chest it uploaded, the two PATHOLOGY arrivals "from the PACS".
        assert sorted(uploaded) == sorted([*table, "gapped.zip"])
        assert sum(record.door is Door.DICOM for record in recorded) == len(SIZES)
        # The pager was told of the chest's result, signed, with a link and no identity.
        (chest_task,) = {r.task_id for r in recorded if r.original_filename == "chest.zip"}

        def told() -> dict[str, object] | None:
            return next((m for m in pager.accepted if m["task_id"] == chest_task), None)

        message = wait_for(told, 60, "the chest's result told to the pager", interval_s=0.2)
        assert pager.bad_signatures == 0
        assert message["call"] == chest_row["badge_text"]  # the model's call, as the row had it
        assert message["demo_weights"] is True
        assert str(message["link"]).endswith(f"/?study={chest_task}")
        assert message["accession_number"] is None
        told_text = json.dumps(pager.accepted)
        for identity in ("LUNG_DX", "Lung_Dx"):
            assert identity not in told_text
    finally:
        webhooks.close()
        stop = subprocess.run(
            ["bash", str(PROJECT_ROOT / "stop.sh"), "--storage", str(storage)],
            cwd=PROJECT_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        stopped = stop.returncode == 0
        delete_topology(broker)
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
    # Pictures of the worklist and of a study, kept with the test's files (CI artefacts).
    assert (tmp_path / "worklist.png").is_file()
    assert (tmp_path / "study.png").is_file()
